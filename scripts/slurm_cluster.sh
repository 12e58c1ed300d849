#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests and for trying the SLURM path on a
# workstation: munged, slurmctld and slurmd (as root), config and state in one private folder.
#
#   scripts/slurm_cluster.sh start [DIR]    # starts it (or says it runs already), prints the export line
#   scripts/slurm_cluster.sh status [DIR]   # exit 0 when it answers
#   scripts/slurm_cluster.sh stop [DIR]     # stops what start started and keeps DIR's logs
#   export SLURM_CONF=DIR/slurm.conf        # then sbatch, squeue, scontrol and hydra/launcher=slurm use it
#
# DIR defaults to $XRAY_CLS_SLURM_DIR or /tmp/xray_cls_slurm. Ports: $SLURMCTLD_PORT (6817) and
# $SLURMD_PORT (6818). The node is this host with all its CPUs (or $SLURM_NODE_CPUS, to run more
# one-CPU jobs at once than there are cores) in one default partition, `debug`.
# Needs Debian's slurm-wlm and munge packages (apt-get install slurm-wlm munge) and root.
set -euo pipefail

command_name=${1:-}
dir=$(realpath -m "${2:-${XRAY_CLS_SLURM_DIR:-/tmp/xray_cls_slurm}}")
ctld_port=${SLURMCTLD_PORT:-6817}
slurmd_port=${SLURMD_PORT:-6818}
export SLURM_CONF=$dir/slurm.conf
node=$(hostname -s)

die() { echo "slurm_cluster: $*" >&2; exit 1; }

answers() { [ -f "$SLURM_CONF" ] && timeout 5 scontrol ping 2>/dev/null | grep -q "is UP"; }

node_ready() { sinfo -h -n "$node" -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc)'; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_config() {
    local cpus memory_mb
    cpus=${SLURM_NODE_CPUS:-$(nproc)}
    memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    mkdir -p "$dir/state" "$dir/spool" "$dir/munge" "$dir/log"
    chmod 700 "$dir" "$dir/munge"
    cat > "$SLURM_CONF" <<CONF
# Written by scripts/slurm_cluster.sh: a one-node cluster for tests and trials.
ClusterName=xray-cls-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
CommunicationParameters=NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmdParameters=config_overrides
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=600
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null \
        || die "slurmctld or munged not found; install them with: apt-get install slurm-wlm munge"
    [ "$EUID" -eq 0 ] || die "the daemons run as root here; run this as root"
    if answers && node_ready; then
        echo "slurm_cluster: already running in $dir"
        echo "export SLURM_CONF=$SLURM_CONF"
        return
    fi
    write_config
    if ! pid_alive "$dir/munge/munged.pid"; then
        [ -f "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key" >/dev/null 2>&1 \
            || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$dir/munge/munge.key"
        munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
            --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
    fi
    pid_alive "$dir/slurmctld.pid" || slurmctld -f "$SLURM_CONF" || die "slurmctld did not start; see $dir/log/slurmctld.log"
    pid_alive "$dir/slurmd.pid" || slurmd -f "$SLURM_CONF" -N "$node" || die "slurmd did not start; see $dir/log/slurmd.log"
    for _ in $(seq 60); do
        if answers && node_ready; then
            echo "slurm_cluster: running in $dir (node $node, ${SLURM_NODE_CPUS:-$(nproc)} CPUs, partition debug)"
            echo "export SLURM_CONF=$SLURM_CONF"
            return
        fi
        # A node left down or drained by an earlier run of this folder is put back into service.
        answers && scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
        sleep 0.5
    done
    die "the cluster did not come up within 30 s; see $dir/log/"
}

stop_daemon() {  # pid file, name
    pid_alive "$1" || return 0
    local pid
    pid=$(cat "$1")
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    echo "slurm_cluster: $2 (pid $pid) did not stop within 10 s; killing it" >&2
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    if answers; then  # jobs still running would outlive slurmd
        squeue -h -o %A | sort -u | xargs -r scancel >/dev/null 2>&1 || true
    fi
    stop_daemon "$dir/slurmd.pid" slurmd
    stop_daemon "$dir/slurmctld.pid" slurmctld
    stop_daemon "$dir/munge/munged.pid" munged
    echo "slurm_cluster: stopped ($dir)"
}

status() {
    if answers; then
        sinfo -N -o "%N %P %t %C"
    else
        echo "slurm_cluster: not running ($dir)"
        return 3
    fi
}

case "$command_name" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status [DIR]" ;;
esac
