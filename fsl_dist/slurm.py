"""Running `accelerate launch` inside a SLURM job: how many processes, which machine rank, and a
supervisor that turns SLURM's preemption warning into a clean, resumable stop.

The batch scripts in `launch/slurm/` call `launch/sweep.py run` (one array task) or
`launch/multinode.py` (one node of a multi-node job); both build an argv list here and hand it
to `supervise`, which starts the launcher without a shell.

Preemption. `sbatch --signal=B:USR1@N` signals only the batch shell, which passes it on to the
supervisor (srun passes it to every task's processes). The supervisor sends SIGUSR1 to the
training processes themselves, never to the launcher: accelerate's launcher (and torchrun inside
it) has no handler for SIGUSR1 and would die of it, and on SIGTERM torchrun tears its workers
down. The launcher starts with SIGUSR1 ignored, which its workers inherit until the trainer
installs its handler, so an early signal is never fatal; the supervisor tells each training
process once it has that handler. The trainer finishes its step, checkpoints and exits 75.
accelerate's launcher reports any non-zero status as 1, so the supervisor decides: a stop it was
asked for, with a checkpoint in the run folder, is EXIT_RESUMABLE (75), and the batch script
requeues the job on 75.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

# Exit status of a run stopped by a signal after writing its checkpoint (EX_TEMPFAIL), as in
# launch/train.py: the batch scripts requeue on it.
EXIT_RESUMABLE = 75
FORWARDED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


# ---------------------------------------------------------------- how many processes


def visible_gpus(env: Mapping[str, str]) -> Optional[int]:
    """GPUs this job step may use, from SLURM's and CUDA's variables; None when they do not say."""
    if env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return 0
    devices = env.get("CUDA_VISIBLE_DEVICES")
    if devices is not None:
        ids = [d for d in devices.split(",") if d.strip() and d.strip() not in ("-1", "NoDevFiles")]
        return len(ids)
    if env.get("SLURM_GPUS_ON_NODE"):
        return int(env["SLURM_GPUS_ON_NODE"])
    return None


def processes_per_machine(env: Mapping[str, str], cpu_processes: int = 1) -> tuple[int, bool]:
    """(processes, on_gpu): one process per GPU of the allocation, or `cpu_processes` on CPU."""
    gpus = visible_gpus(env)
    if gpus is None:
        import torch  # only when the environment does not say: importing torch takes seconds

        gpus = torch.cuda.device_count()
    if gpus > 0:
        return gpus, True
    return cpu_processes, False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_port(env: Mapping[str, str]) -> int:
    """A rendezvous port every machine of a job computes alike (FSL_MAIN_PORT wins)."""
    if env.get("FSL_MAIN_PORT"):
        return int(env["FSL_MAIN_PORT"])
    return 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000


def _interface_of_ipv4(address: str) -> Optional[str]:
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:  # SIOCGIFADDR: the interface's IPv4 address
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
            if socket.inet_ntoa(raw[20:24]) == address:
                return name
    return None


def _interface_of_ipv6(address: str) -> Optional[str]:
    wanted = socket.inet_pton(socket.AF_INET6, address.split("%")[0]).hex()
    try:
        with open("/proc/net/if_inet6") as fh:
            for line in fh:  # address (hex), index, prefix length, scope, flags, name
                fields = line.split()
                if len(fields) == 6 and fields[0] == wanted:
                    return fields[5]
    except OSError:
        pass
    return None


def interface_towards(address: str) -> Optional[tuple[str, str]]:
    """(interface, local address) through which this machine reaches `address`, as the kernel
    routes it (a UDP socket is connected, nothing is sent); None when it cannot tell.

    gloo picks its network interface from this machine's hostname, and where the hostname
    resolves to 127.0.0.1 (or to an address the other machines cannot reach) every rank
    advertises an address the others cannot connect to and the job hangs in its first
    collective. The interface that leads to the main process's address is the one the other
    machines reach this one through: launch/multinode.py gives it to gloo."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(address, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)
            local = s.getsockname()[0]
        name = (_interface_of_ipv4 if family == socket.AF_INET else _interface_of_ipv6)(local)
    except (OSError, ValueError):
        return None
    return (name, local) if name else None


def gloo_interface(env: Mapping[str, str], main_address: str) -> Optional[str]:
    """GLOO_SOCKET_IFNAME for a machine of a multi-machine job: the user's own setting, else the
    interface towards the main address (None for the loopback interface, where gloo's own
    choice from the hostname already works, or when it cannot be found)."""
    if env.get("GLOO_SOCKET_IFNAME"):
        return env["GLOO_SOCKET_IFNAME"]
    found = interface_towards(main_address)
    if found is None or found[0] == "lo" or found[1].startswith("127.") or found[1] == "::1":
        return None
    return found[0]


def machine_of(env: Mapping[str, str]) -> tuple[int, int]:
    """(machine_rank, num_machines) of this srun task: one task per machine (node), so the
    task's rank is the machine's rank. SLURM_PROCID rather than SLURM_NODEID: with
    `--ntasks-per-node=1` they are equal, and two tasks on one node (a test of the multi-node
    path) still get distinct ranks."""
    try:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    except KeyError as missing:
        raise RuntimeError(f"{missing.args[0]} is not set: run this through srun inside a "
                           "SLURM job") from None


# ---------------------------------------------------------------- the launcher's argv


def accelerate_command(script: str | Path, script_args: Sequence[str], *, processes: int,
                       on_gpu: bool, num_machines: int = 1, machine_rank: int = 0,
                       main_address: Optional[str] = None, main_port: Optional[int] = None,
                       python: str = sys.executable, base_env: Optional[Mapping[str, str]] = None,
                       ) -> tuple[list[str], dict]:
    """argv and environment of `accelerate launch` for `processes` per machine. Every flag is
    explicit, so no accelerate config file on the cluster changes the run; precision comes from
    the fsl_dist config. On CPU, several processes are gloo ranks (`--multi_gpu` with
    ACCELERATE_USE_CPU=1, see fsl_dist/distributed.py)."""
    total = processes * num_machines
    argv = [python, "-m", "accelerate.commands.launch",
            "--num_machines", str(num_machines), "--num_processes", str(total),
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "--quiet"]  # a stop (exit 75) is not a crash: no launcher traceback for it
    if total > 1:
        argv.append("--multi_gpu")
    if num_machines > 1:
        if not main_address:
            raise ValueError("several machines need the main process address")
        argv += ["--machine_rank", str(machine_rank), "--main_process_ip", main_address,
                 "--main_process_port", str(main_port or 29500)]
    elif total > 1:
        argv += ["--main_process_port", str(main_port or free_port())]
    argv += [str(script), *script_args]
    env = dict(os.environ if base_env is None else base_env)
    if not on_gpu:
        env["ACCELERATE_USE_CPU"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return argv, env


# ---------------------------------------------------------------- the supervisor


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # the name may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    return children


def worker_pids(launcher_pid: int, script: str | Path) -> list[int]:
    """Descendants of the launcher that run `script` (the training processes), not the launcher
    itself nor helpers such as W&B's service process."""
    children, found, todo = _children_map(), [], [launcher_pid]
    script = str(script)
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            try:
                with open(f"/proc/{child}/cmdline", "rb") as fh:
                    argv = fh.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            if script in argv:
                found.append(child)
    return found


def _ignore_usr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has installed a handler for `sig` (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


def supervise(argv: Sequence[str], env: Mapping[str, str], *, script: str | Path,
              run_dir: Optional[Path], log=print) -> int:
    """Run the launcher to its end, passing SIGUSR1, SIGTERM and SIGINT (Ctrl-C) on to the
    training processes as SIGUSR1, the trainer's stop request (finish the step, checkpoint).
    Returns 0 when training finished, EXIT_RESUMABLE when it stopped on request and `run_dir`
    holds a checkpoint, else the launcher's status."""
    requested: list[int] = []
    told: set[int] = set()
    launcher = None

    def tell_workers() -> None:
        # Each training process is told once, as soon as it has its handler: the flag it sets
        # stays set, and a second signal could arrive while Python shuts down (it resets its
        # handlers to the default then) and end a process that has already stopped cleanly.
        for pid in worker_pids(launcher.pid, script):
            if pid not in told and catches(pid, signal.SIGUSR1):
                try:
                    os.kill(pid, signal.SIGUSR1)
                except ProcessLookupError:
                    continue
                told.add(pid)
                log(f"fsl_dist: stop requested (signal {requested[0]}); asked training process "
                    f"{pid} to checkpoint and stop", flush=True)

    def on_signal(signum, _frame) -> None:
        requested.append(signum)
        if launcher is not None:
            tell_workers()  # at once: the sooner, the smaller the step the run finishes

    previous = {sig: signal.signal(sig, on_signal) for sig in FORWARDED}
    try:
        # Own session: a terminal's Ctrl-C reaches only this supervisor, which turns it into a
        # clean stop (the launcher would otherwise pass SIGINT on and the workers would die).
        launcher = subprocess.Popen(list(argv), env=dict(env), preexec_fn=_ignore_usr1,
                                    start_new_session=True)
        while True:
            try:
                status = launcher.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                pass
            if requested:
                tell_workers()  # processes that started, or installed their handler, since
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return outcome(status, bool(requested), run_dir)


def outcome(status: int, stop_requested: bool, run_dir: Optional[Path]) -> int:
    """The job's verdict from the launcher's status (which reports 75 from train.py as 1)."""
    if status in (0, EXIT_RESUMABLE):
        return status
    from fsl_dist.checkpoint import latest_checkpoint  # imports torch: only when needed

    if stop_requested and run_dir is not None and latest_checkpoint(run_dir) is not None:
        return EXIT_RESUMABLE
    return status if status > 0 else 128 - status  # killed by a signal: the shell's convention
