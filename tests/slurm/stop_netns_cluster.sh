#!/usr/bin/env bash
# stop_netns_cluster.sh: stop the two-node cluster of start_netns_cluster.sh and remove its
# network: cancel the jobs, shut the daemons down (killed by their pid files if they do not
# exit), end any process still inside the nodes' namespaces (job steps left behind), delete the
# namespaces, the veth pairs and the bridge. Only names with the cluster's prefix are touched.
# Safe to run when nothing is running. Exits 1 if a namespace or link of the prefix is left.
# State stays in $NETNS_CI_DIR for inspection (start wipes it); --purge deletes it too.
set -uo pipefail

BASE="$(realpath -m "${NETNS_CI_DIR:-${TMPDIR:-/tmp}/fsl_dist-netns-cluster}")"
P="${NETNS_CI_PREFIX:-fslnn}"
QUIET=0; PURGE=0
for a in "$@"; do
    case "$a" in --quiet) QUIET=1 ;; --purge) PURGE=1 ;; esac
done
say() { [ "$QUIET" = 1 ] || echo "[stop_netns_cluster] $*" >&2; }

# shellcheck source=tests/slurm/stop_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/stop_common.sh"
stop_daemons "$BASE"

# Whatever still runs inside the nodes' namespaces was started by this cluster (a job step that
# outlived its slurmd): end it before the namespace goes.
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${P}-(n[0-9]+|probe)$"); do
    pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
    if [ -n "${pids// /}" ]; then
        say "ending processes left in $ns: $pids"
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null; sleep 1
        pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
        # shellcheck disable=SC2086
        [ -n "${pids// /}" ] && kill -KILL $pids 2>/dev/null
    fi
    ip netns del "$ns" 2>/dev/null || say "could not delete namespace $ns"
done
for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 \
              | grep -E "^${P}-(h[0-9]+|br)$"); do
    ip link del "$link" 2>/dev/null
done

# the kernel may remove a deleted namespace's veth peers a moment later
left=""
for _ in $(seq 30); do
    left="$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${P}-" ; \
            ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^${P}-")"
    [ -z "$left" ] && break
    sleep 0.1
done
[ "$PURGE" = 1 ] && rm -rf "$BASE"
if [ -n "$left" ]; then
    echo "[stop_netns_cluster] left behind: $(echo "$left" | tr '\n' ' ')" >&2
    exit 1
fi
say "stopped"
exit 0
