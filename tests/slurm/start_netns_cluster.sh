#!/usr/bin/env bash
# start_netns_cluster.sh: start a throwaway two-node SLURM cluster on this machine in which each
# node is its own Linux network namespace with its own address, so a multi-node job crosses real
# (virtual) network interfaces instead of meeting at 127.0.0.1.
#
#   host namespace: bridge ${PREFIX}-br 10.231.0.1/24, munged, slurmctld (SlurmctldHost address)
#   ${PREFIX}-n1:   veth ${PREFIX}-v1 10.231.0.11/24 (peer ${PREFIX}-h1 on the bridge), slurmd ${PREFIX}1
#   ${PREFIX}-n2:   veth ${PREFIX}-v2 10.231.0.12/24 (peer ${PREFIX}-h2 on the bridge), slurmd ${PREFIX}2
#
# Everything it creates carries the prefix and is removed by stop_netns_cluster.sh (which this
# script also runs first, and on failure). It adds one route to the host, the bridge's own
# 10.231.0.0/24, and refuses to start if that range is already in use on the host. No iptables
# rules, no sysctls, no /etc changes: the nodes share the host's /etc/hosts and hostname, and
# the slurm.conf is reached through SLURM_CONF only (a single-node cluster from start_cluster.sh
# keeps /etc/slurm/slurm.conf and its ports). munge's socket is a file, reachable from every
# namespace. Jobs started by a slurmd run in its namespace (only the network one is its own).
#
# Root only. Tested on Debian 12 (slurmd 22.05.8, munge 0.5.15, iproute2 6.1) under gVisor (runsc),
# whose network stack has namespaces, veth pairs and bridges; starts in under 1 s once installed.
# Installs slurmctld slurmd slurm-client munge iproute2 with apt-get when missing.
#
# Afterwards:  source "$NETNS_CI_DIR/slurm.env"   (exports SLURM_CONF)
#
# Environment knobs (all optional):
#   NETNS_CI_DIR       state/log/config folder         (default ${TMPDIR:-/tmp}/fsl_dist-netns-cluster)
#   NETNS_CI_PREFIX    name prefix of namespaces, links and nodes (default fslnn, <= 8 characters)
#   NETNS_CI_NET       the /24, first three octets     (default 10.231.0)
#   NETNS_CI_CTLD_PORT / NETNS_CI_SLURMD_PORT          (default 6837 / 6838: not the single-node
#                      cluster's 6817 / 6818, so both can run at once)
#   NETNS_CI_NO_INSTALL=1   never run apt-get
#   NETNS_CI_TIMEOUT   seconds to wait for both nodes to become idle (default 90)
#   NETNS_CI_SMOKE=0   skip the two-node srun smoke test at the end
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BASE="$(realpath -m "${NETNS_CI_DIR:-${TMPDIR:-/tmp}/fsl_dist-netns-cluster}")"  # absolute: daemons chdir to /
P="${NETNS_CI_PREFIX:-fslnn}"
NET="${NETNS_CI_NET:-10.231.0}"
CTLD_PORT="${NETNS_CI_CTLD_PORT:-6837}"
SLURMD_PORT="${NETNS_CI_SLURMD_PORT:-6838}"
TIMEOUT="${NETNS_CI_TIMEOUT:-90}"
CTLD_ADDR="${NET}.1"
NODES=(1 2)
T0=$(date +%s%N)

log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[start_netns_cluster %3d.%03ds] %s\n' $((ms/1000)) $((ms%1000)) "$*" >&2; }
die() {
    log "ERROR: $*"
    for f in "$BASE"/log/*.log; do [ -f "$f" ] && { echo "---- $f (tail)" >&2; tail -n 30 "$f" >&2; }; done
    NETNS_CI_DIR="$BASE" NETNS_CI_PREFIX="$P" bash "$HERE/stop_netns_cluster.sh" --quiet || true
    exit 1
}

if [ "$(id -u)" -ne 0 ]; then
    echo "start_netns_cluster.sh must run as root (network namespaces; slurmd launches jobs)" >&2
    exit 1
fi
[ "${#P}" -le 8 ] || { echo "NETNS_CI_PREFIX must have at most 8 characters (link names)" >&2; exit 1; }

# ---------------------------------------------------------------- 1. packages
missing=()
for b in munged mungekey slurmctld slurmd sbatch srun scontrol; do
    command -v "$b" >/dev/null 2>&1 || missing=(slurmctld slurmd slurm-client munge)
done
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
if [ "${#missing[@]}" -gt 0 ]; then
    [ "${NETNS_CI_NO_INSTALL:-0}" = 1 ] && die "missing ${missing[*]} and NETNS_CI_NO_INSTALL=1"
    log "installing ${missing[*]} via apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---------------------------------------------------------------- 2. stop an old one, checks
NETNS_CI_DIR="$BASE" NETNS_CI_PREFIX="$P" bash "$HERE/stop_netns_cluster.sh" --quiet || true
if (exec 3<>"/dev/tcp/127.0.0.1/$CTLD_PORT") 2>/dev/null; then
    echo "start_netns_cluster.sh: port $CTLD_PORT is in use (set NETNS_CI_CTLD_PORT)" >&2
    exit 1
fi
if [ -n "$(ip -o -4 addr show to "${NET}.0/24")" ] || ip -4 route show | grep -q "^${NET}\.0/24 "; then
    echo "start_netns_cluster.sh: ${NET}.0/24 is already in use on this host (set NETNS_CI_NET)" >&2
    exit 1
fi
rm -rf "$BASE"
mkdir -p "$BASE"/{munge,state,log,run,jobs}
chmod 755 "$BASE" "$BASE/munge"   # munged insists the socket dir is world-executable
chmod 1777 "$BASE/jobs"

# ---------------------------------------------------------------- 3. the network
ip netns add "${P}-probe" 2>/dev/null && ip netns del "${P}-probe" \
    || die "network namespaces are unavailable here ('ip netns add' failed)"
ip link add "${P}-br" type bridge || die "cannot create a bridge"
ip addr add "${CTLD_ADDR}/24" dev "${P}-br"
ip link set "${P}-br" up
for i in "${NODES[@]}"; do
    ns="${P}-n$i"
    ip netns add "$ns"
    ip link add "${P}-h$i" type veth peer name "${P}-v$i" netns "$ns" || die "cannot create a veth pair"
    ip link set "${P}-h$i" master "${P}-br"
    ip link set "${P}-h$i" up
    ip -n "$ns" addr add "${NET}.1$i/24" dev "${P}-v$i"
    ip -n "$ns" link set "${P}-v$i" up
    ip -n "$ns" link set lo up
done
# every node reaches the controller and the other node
for i in "${NODES[@]}"; do
    for target in "$CTLD_ADDR" "${NET}.11" "${NET}.12"; do
        ok=0
        for _ in $(seq 50); do
            ip netns exec "${P}-n$i" ip route get "$target" >/dev/null 2>&1 && { ok=1; break; }
            sleep 0.1
        done
        [ "$ok" = 1 ] || die "${P}-n$i has no route to $target"
    done
done
log "network up: bridge ${P}-br ${CTLD_ADDR}, nodes ${NET}.11 (${P}-n1) and ${NET}.12 (${P}-n2)"

# ---------------------------------------------------------------- 4. munge
MUNGE_DIR="$BASE/munge"
MUNGE_SOCK="$MUNGE_DIR/munge.socket"
if ! mungekey --create --keyfile="$MUNGE_DIR/munge.key" 2>/dev/null; then
    dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1 count=1024 status=none
fi
chmod 600 "$MUNGE_DIR/munge.key"
munged --socket="$MUNGE_SOCK" --key-file="$MUNGE_DIR/munge.key" \
       --pid-file="$MUNGE_DIR/munged.pid" --log-file="$BASE/log/munged.log" \
       --seed-file="$MUNGE_DIR/munged.seed" || die "munged failed to start"
for _ in $(seq 50); do [ -S "$MUNGE_SOCK" ] && break; sleep 0.1; done
munge -n -S "$MUNGE_SOCK" | unmunge -S "$MUNGE_SOCK" >/dev/null || die "munge round-trip failed"

# ---------------------------------------------------------------- 5. slurm.conf
# Each node gets half of the machine's cores and memory (config_overrides: the hardware each
# slurmd sees is the whole machine).
HW="$(slurmd -C | head -n1)"
getv() { echo "$HW" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
CPUS="$(getv CPUs)"; MEM="$(getv RealMemory)"
[ -n "$CPUS" ] && [ -n "$MEM" ] || die "could not parse 'slurmd -C': $HW"
NODE_CPUS=$(( CPUS / 2 > 0 ? CPUS / 2 : 1 ))
NODE_MEM=$(( MEM * 45 / 100 ))
CONF="$BASE/slurm.conf"
cat > "$CONF" <<EOF
# generated by start_netns_cluster.sh: two nodes, each in its own network namespace
ClusterName=netns
SlurmctldHost=$(hostname -s)(${CTLD_ADDR})
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${MUNGE_SOCK}

StateSaveLocation=${BASE}/state
SlurmdSpoolDir=${BASE}/spool/%n
SlurmctldPidFile=${BASE}/run/slurmctld.pid
SlurmdPidFile=${BASE}/run/slurmd-%n.pid
SlurmctldLogFile=${BASE}/log/slurmctld.log
SlurmdLogFile=${BASE}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides

ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${BASE}/log/jobcomp.log
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true

SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
KillWait=5
InactiveLimit=0
SlurmdTimeout=300
MessageTimeout=30

NodeName=${P}1 NodeAddr=${NET}.11 CPUs=${NODE_CPUS} SocketsPerBoard=1 CoresPerSocket=${NODE_CPUS} ThreadsPerCore=1 RealMemory=${NODE_MEM} State=UNKNOWN
NodeName=${P}2 NodeAddr=${NET}.12 CPUs=${NODE_CPUS} SocketsPerBoard=1 CoresPerSocket=${NODE_CPUS} ThreadsPerCore=1 RealMemory=${NODE_MEM} State=UNKNOWN
PartitionName=netns Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
echo "export SLURM_CONF=${CONF}" > "$BASE/slurm.env"
export SLURM_CONF="$CONF"

# ---------------------------------------------------------------- 6. daemons
slurmctld -f "$CONF" || die "slurmctld failed to start"
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
scontrol ping | grep -q 'is UP' || die "slurmctld did not answer pings"
log "slurmctld up (pid $(cat "$BASE/run/slurmctld.pid")) on ${CTLD_ADDR}:${CTLD_PORT}"
for i in "${NODES[@]}"; do
    mkdir -p "$BASE/spool/${P}$i"
    # nsenter, not `ip netns exec`: that also remounts /sys for the namespace, without the
    # cgroup filesystem slurmd's cgroup plugin insists on
    nsenter --net="/run/netns/${P}-n$i" slurmd -f "$CONF" -N "${P}$i" \
        || die "slurmd ${P}$i failed to start"
done
for i in "${NODES[@]}"; do
    for _ in $(seq 50); do [ -s "$BASE/run/slurmd-${P}$i.pid" ] && break; sleep 0.1; done
    pid="$(cat "$BASE/run/slurmd-${P}$i.pid" 2>/dev/null || true)"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || die "slurmd ${P}$i exited after starting"
done
log "slurmd ${P}1 and ${P}2 started in ${P}-n1 and ${P}-n2"

deadline=$(( $(date +%s) + TIMEOUT ))
while :; do
    states="$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)"
    ready=$(echo "$states" | grep -cE ' (idle|mixed|allocated)$' || true)
    [ "$ready" -ge 2 ] && break
    [ "$(date +%s)" -lt "$deadline" ] || { scontrol show nodes >&2 || true; die "nodes not ready: $states"; }
    for n in $(echo "$states" | awk '$2 ~ /drain|down|invalid|fail/ {print $1}'); do
        scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true
    done
    sleep 0.3
done
log "both nodes idle"

# ---------------------------------------------------------------- 7. smoke test
# one task per node: each must report its own node name and see its own address only
if [ "${NETNS_CI_SMOKE:-1}" = 1 ]; then
    out="$(timeout 60 srun -N2 --ntasks-per-node=1 -l bash -c \
        'echo "$SLURMD_NODENAME $(ip -o -4 addr show scope global | awk "{print \$4}")"' 2>&1)" \
        || die "smoke test: srun across both nodes failed: $out"
    echo "$out" | grep -q "${P}1 ${NET}.11/24" && echo "$out" | grep -q "${P}2 ${NET}.12/24" \
        || die "smoke test: unexpected nodes or addresses: $out"
    log "smoke test passed: $(echo "$out" | tr '\n' ';')"
fi
log "cluster ready: nodes ${P}1 ${NET}.11, ${P}2 ${NET}.12; SLURM_CONF=$CONF"
echo "$CONF"
