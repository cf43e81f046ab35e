#!/usr/bin/env bash
# A SLURM cluster on this one machine, for development and CI (not for production).
#
#   slurm/local-cluster.sh start     # install if needed, write the config, start the daemons
#   slurm/local-cluster.sh status    # daemons, sinfo, squeue
#   slurm/local-cluster.sh stop      # stop the daemons (the scratch folder is kept)
#   slurm/local-cluster.sh env       # print `export SLURM_CONF=...` for eval
#
# Needs root (daemons run as root, no systemd). Everything lives under $LSDR_SLURM_DIR
# (default /tmp/lsdr-slurm): munge key and socket, slurm.conf, state, spool, logs, pid files.
# Clients find the cluster through SLURM_CONF=$LSDR_SLURM_DIR/etc/slurm.conf; when
# /etc/slurm/slurm.conf does not exist the script also links it there, so a bare `sbatch` works.
#
# Packages: Debian/Ubuntu `slurmctld slurmd slurm-client munge` (installed with apt-get when
# one is missing). Accounting is off, so `sacct` is unavailable and finished jobs stay visible
# to `scontrol`/`squeue` for MinJobAge seconds.
#
# Nodes: one slurmd per node name, all on this machine (`slurmd -N NAME`, each on its own port),
# each with the CPU layout `slurmd -C` reports (so the nodes share the same cores):
#   partition `debug` (default): $LSDR_SLURM_NODES, default "$(hostname -s) localhost": two names
#       that resolve to this machine, so multi-node jobs (srun across nodes, rendezvous on the
#       first node) run for real;
#   partition `nodns`: `lsdr-nodns` (a name no resolver knows) plus the first node, to see a job
#       fail when its nodes cannot reach the master host. LSDR_SLURM_NODNS=0 leaves it out.
# LSDR_SLURM_NODES="$(hostname -s)" LSDR_SLURM_NODNS=0 gives a plain one-node cluster.
set -euo pipefail

DIR=${LSDR_SLURM_DIR:-/tmp/lsdr-slurm}
CTLD_PORT=${LSDR_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${LSDR_SLURM_SLURMD_PORT:-6818}  # first node's port; the next ones count up
read -r -a NODES <<<"${LSDR_SLURM_NODES:-$(hostname -s) localhost}"
NODNS_NODE=lsdr-nodns
ALL_NODES=("${NODES[@]}")
if [[ ${LSDR_SLURM_NODNS:-1} != 0 ]]; then ALL_NODES+=("$NODNS_NODE"); fi
CONF=$DIR/etc/slurm.conf
SYSTEM_CONF=/etc/slurm/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "local-cluster: error: $*" >&2; exit 1; }
note() { echo "local-cluster: $*" >&2; }

pid_alive() {  # pid_alive FILE: the pid in FILE names a running process
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
    local bin missing=0
    for bin in slurmctld slurmd sbatch munged; do command -v "$bin" >/dev/null || missing=1; done
    [[ $missing -eq 0 ]] && return
    command -v apt-get >/dev/null || die "slurmctld/slurmd/munge missing and no apt-get to install them"
    note "installing ${PACKAGES[*]} with apt-get"
    # The daemons are started by this script, never by the packages' service scripts.
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

start_munge() {
    local mdir=$DIR/munge
    if pid_alive "$mdir/munged.pid"; then return; fi
    mkdir -p "$mdir"
    chmod 755 "$mdir"  # munged: socket dir searchable by all, writable by munge only
    if [[ ! -s $mdir/munge.key ]]; then
        # A fresh key per cluster: this machine is the whole cluster, nobody else must share it.
        dd if=/dev/urandom of="$mdir/munge.key" bs=1024 count=1 status=none
    fi
    chown -R munge:munge "$mdir"
    chmod 400 "$mdir/munge.key"
    runuser -u munge -- munged \
        --key-file="$mdir/munge.key" --socket="$mdir/munge.socket" \
        --pid-file="$mdir/munged.pid" --log-file="$mdir/munged.log" \
        --seed-file="$mdir/munged.seed"
    for _ in $(seq 50); do
        [[ -S $mdir/munge.socket ]] && return
        sleep 0.1
    done
    die "munged did not create its socket (see $mdir/munged.log)"
}

write_config() {
    local host layout mem_mb i name addr port nodes_csv node_lines=""
    host=$(hostname -s)
    # slurmd -C prints this machine's real layout; slurmd drains a node whose config claims
    # more than it has, so keep the CPUs/sockets/cores it reports. The nodes share the machine:
    # each gets 90% of the memory divided among them.
    layout=$(slurmd -C | head -n 1 | sed 's/^NodeName=[^ ]* //; s/ *RealMemory=[0-9]*//')
    mem_mb=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem_mb=$((mem_mb * 9 / 10 / ${#ALL_NODES[@]}))
    for i in "${!ALL_NODES[@]}"; do
        name=${ALL_NODES[$i]}
        port=$((SLURMD_PORT + i))
        # The machine's own name resolves by itself; the others are reached on the loopback.
        addr=" NodeAddr=127.0.0.1"
        [[ $name == "$host" ]] && addr=""
        node_lines+="NodeName=$name$addr Port=$port $layout RealMemory=$mem_mb State=UNKNOWN"$'\n'
    done
    nodes_csv=$(IFS=,; echo "${NODES[*]}")
    if [[ ${LSDR_SLURM_NODNS:-1} != 0 ]]; then
        node_lines+="PartitionName=nodns Nodes=$NODNS_NODE,${NODES[0]} MaxTime=INFINITE State=UP"$'\n'
    fi
    mkdir -p "$DIR/etc" "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
    cat >"$CONF" <<EOF
# Written by slurm/local-cluster.sh: a development cluster, every node on this machine.
ClusterName=lsdr-local
SlurmctldHost=$host
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again
# (default 120 s; short here so a preemption test resumes within seconds).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups and no systemd in containers/CI: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
# Look at the queue every second: a requeued job starts as soon as it becomes eligible.
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Requeue (scontrol requeue after a preemption checkpoint, node failure) must be allowed.
JobRequeue=1
ReturnToService=2
MaxJobCount=10000
# Finished jobs stay queryable (scontrol show job) this long: there is no accounting database.
MinJobAge=600
# Short timeouts so a test sees failures and cancellations quickly.
SlurmdTimeout=30
SlurmctldTimeout=30
MessageTimeout=10
KillWait=10
InactiveLimit=0
Waittime=0
PartitionName=debug Nodes=$nodes_csv Default=YES MaxTime=INFINITE State=UP
${node_lines}
EOF
}

link_system_conf() {
    # A bare `sbatch` reads /etc/slurm/slurm.conf; link ours there only if nobody else's is.
    if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$CONF" ]]; then return; fi
    if [[ -e $SYSTEM_CONF || -L $SYSTEM_CONF ]]; then
        note "$SYSTEM_CONF exists and is not ours: clients need SLURM_CONF=$CONF"
        return
    fi
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -s "$CONF" "$SYSTEM_CONF"
}

wait_idle() {
    local states="" name pending
    for _ in $(seq 60); do
        states=$(SLURM_CONF=$CONF sinfo -h -N -o '%N=%T' 2>/dev/null | sort -u || true)
        pending=$(grep -vE '=(idle|mixed|allocated)$' <<<"$states" || true)
        if [[ -n $states && -z $pending ]]; then return; fi
        for name in "${ALL_NODES[@]}"; do
            # A node left down or drained by a previous run comes back with an explicit resume.
            if grep -qE "^$name=(down|drain)" <<<"$states"; then
                SLURM_CONF=$CONF scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true
            fi
        done
        sleep 0.5
    done
    die "nodes not idle after 30 s: $(tr '\n' ' ' <<<"$states"); see $DIR/log/"
}

start() {
    [[ $(id -u) -eq 0 ]] || die "run as root (the daemons run as root in this development setup)"
    install_packages
    local name running=1
    pid_alive "$DIR/run/slurmctld.pid" || running=0
    for name in "${ALL_NODES[@]}"; do pid_alive "$DIR/run/slurmd-$name.pid" || running=0; done
    if [[ $running -eq 1 ]]; then
        note "already running ($CONF)"
        wait_idle
        return
    fi
    start_munge
    write_config
    link_system_conf
    export SLURM_CONF=$CONF
    pid_alive "$DIR/run/slurmctld.pid" || slurmctld -i   # -i: ignore state left by a crashed run
    for name in "${ALL_NODES[@]}"; do
        pid_alive "$DIR/run/slurmd-$name.pid" || slurmd -N "$name"
    done
    wait_idle
    note "up: $(sinfo -h -o '%P %D node(s) %N %T' | tr '\n' ';') use SLURM_CONF=$CONF"
}

stop_pidfiles() {  # stop_pidfiles FILE...: TERM every daemon at once, wait, KILL stragglers
    local file pids=() pid
    for file in "$@"; do
        if pid_alive "$file"; then pids+=("$(cat "$file")"); fi
    done
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 100); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive -eq 0 ]] && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            note "pid $pid did not stop on SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$@"
}

stop() {
    # Jobs first, so their processes do not outlive slurmd.
    if pid_alive "$DIR/run/slurmctld.pid"; then
        SLURM_CONF=$CONF scancel --quiet --full --signal=KILL --state=RUNNING 2>/dev/null || true
        SLURM_CONF=$CONF scancel --quiet 2>/dev/null || true
    fi
    shopt -s nullglob
    stop_pidfiles "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid"
    stop_pidfiles "$DIR/munge/munged.pid"
    if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$CONF" ]]; then rm -f "$SYSTEM_CONF"; fi
    note "stopped (state and logs kept in $DIR)"
}

status() {
    local ok=0 entry name file
    for entry in "munged:$DIR/munge/munged.pid" "slurmctld:$DIR/run/slurmctld.pid"; do
        name=${entry%%:*} file=${entry#*:}
        if pid_alive "$file"; then echo "$name: running (pid $(cat "$file"))"
        else echo "$name: not running"; ok=1; fi
    done
    for name in "${ALL_NODES[@]}"; do
        file=$DIR/run/slurmd-$name.pid
        if pid_alive "$file"; then echo "slurmd $name: running (pid $(cat "$file"))"
        else echo "slurmd $name: not running"; ok=1; fi
    done
    if [[ $ok -eq 0 ]]; then
        SLURM_CONF=$CONF sinfo
        SLURM_CONF=$CONF squeue
    fi
    return $ok
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
