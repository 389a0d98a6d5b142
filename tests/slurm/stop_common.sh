# Sourced by stop_cluster.sh and stop_netns_cluster.sh (the caller defines say()): stop a test
# cluster's daemons by the pid files under its state folder.

# alive PID [COMM]: running (not a zombie) and, if COMM given, /proc/PID/comm matches
# (guards against a stale pid file whose pid now belongs to something else)
alive() {
    local pid="${1:-}" comm="${2:-}"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = Z ] && return 1
    [ -z "$comm" ] || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]
}
pid_of() { [ -f "$1" ] && cat "$1" 2>/dev/null; }
# reap PID NAME N: wait up to N tenths of a second for PID to exit, then TERM, then KILL
reap() {
    local pid="$1" name="$2" n=0
    while alive "$pid" "$name" && [ $n -lt "$3" ]; do sleep 0.1; n=$((n+1)); done
    if alive "$pid" "$name"; then say "$name ($pid) still alive: SIGTERM"; kill -TERM "$pid" 2>/dev/null; sleep 2; fi
    if alive "$pid" "$name"; then say "$name ($pid) still alive: SIGKILL"; kill -KILL "$pid" 2>/dev/null; sleep 0.5; fi
}

# stop_daemons BASE: cancel every job, `scontrol shutdown`, then make sure slurmctld, each slurmd
# (run/slurmd.pid or run/slurmd-<node>.pid) and munged are gone.
stop_daemons() {
    local base="$1" conf="$1/slurm.conf" ctld munge f pid jobs slurmds=()
    ctld="$(pid_of "$base/run/slurmctld.pid")"
    munge="$(pid_of "$base/munge/munged.pid")"
    for f in "$base"/run/slurmd.pid "$base"/run/slurmd-*.pid; do
        [ -f "$f" ] && slurmds+=("$(pid_of "$f")")
    done
    if [ -f "$conf" ] && alive "$ctld" slurmctld; then
        export SLURM_CONF="$conf"
        jobs="$(squeue -h -t PD,R,CG,S -o '%A' 2>/dev/null | sort -u | tr '\n' ' ')"
        if [ -n "${jobs// /}" ]; then
            say "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null
            for _ in $(seq 100); do
                [ -z "$(squeue -h -t PD,R,CG,S -o '%A' 2>/dev/null)" ] && break; sleep 0.1
            done
        fi
        say "scontrol shutdown"
        scontrol shutdown >/dev/null 2>&1
    fi
    for pid in "${slurmds[@]}"; do alive "$pid" slurmd && reap "$pid" slurmd 150; done
    alive "$ctld" slurmctld && reap "$ctld" slurmctld 150
    if alive "$munge" munged; then
        say "stopping munged ($munge)"
        kill -TERM "$munge" 2>/dev/null
        reap "$munge" munged 50
    fi
}
