#!/usr/bin/env bash
# local-cluster.sh start|stop [--purge] - a real one-node SLURM cluster (munged, slurmctld, slurmd) on
# this machine, for trying train.sbatch and sweep.sbatch and for the tests. No systemd or cgroups.
#   start          install Debian's slurmctld slurmd slurm-client munge if missing, write a one-node
#                  slurm.conf, start the daemons, wait until the node is idle. Idempotent.
#   stop [--purge] stop them by PID (never by name); --purge also deletes state, logs and slurm.conf.
# Needs root: it writes /etc/slurm/slurm.conf and /run/munge. Learned on Debian 12 with slurm 22.05:
# AuthInfo=cred_expire=10, or a requeued job waits about 2.5 minutes before it may start again; and a
# scheduling pass every few seconds, or it then waits for the next one (by default backfill runs every 30 s,
# the main loop every 60 s).
set -euo pipefail

BASE=${SLURM_LOCAL_DIR:-/tmp/slurm-local}          # state, spool, logs, pids
CONF=${SLURM_LOCAL_CONF:-/etc/slurm/slurm.conf}    # where sbatch/sinfo look by default
NODE=$(hostname -s)
WAIT=${SLURM_LOCAL_WAIT:-60}                        # seconds to wait for node 'idle'

die() { echo "local-cluster: $*" >&2; exit 1; }
log() { echo "local-cluster: $*"; }

start() {
[ "$(id -u)" = 0 ] || die "must run as root"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  if [ "${SLURM_LOCAL_INSTALL:-1}" = 1 ] && command -v apt-get >/dev/null; then
    log "installing slurmctld slurmd slurm-client munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null
  else
    die "slurmctld/slurmd/munged not found"
  fi
fi

# alive PIDFILE NAME -> true if the pid in PIDFILE is running and is NAME
alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

mkdir -p "$BASE"/{state,spool,log,run} "$(dirname "$CONF")"

# ---------------------------------------------------------------- munge
MUNGE_KEY=/etc/munge/munge.key
if [ ! -s "$MUNGE_KEY" ]; then
  log "creating munge key"
  mkdir -p /etc/munge
  if command -v mungekey >/dev/null; then mungekey --create --keyfile="$MUNGE_KEY" --force
  else dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none; fi
fi
chown munge:munge /etc/munge "$MUNGE_KEY"; chmod 0700 /etc/munge; chmod 0400 "$MUNGE_KEY"
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
if alive /run/munge/munged.pid munged; then
  log "munged already running (pid $(cat /run/munge/munged.pid))"
else
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  runuser -u munge -- /usr/sbin/munged
  log "munged started (pid $(cat /run/munge/munged.pid))"
fi
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || die "munge does not work"

# ---------------------------------------------------------------- slurm.conf
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}; [ "$CPUS" -ge 2 ] || CPUS=2
MEM_MB=$(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo)
REALMEM=${SLURM_LOCAL_MEM_MB:-$(( MEM_MB * 9 / 10 ))}
TMP_CONF=$(mktemp)
cat >"$TMP_CONF" <<EOF
# written by local-cluster.sh - single node test cluster, no systemd/cgroups
ClusterName=local
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=${SLURM_LOCAL_CRED_EXPIRE:-10}
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldPort=${SLURM_LOCAL_CTLD_PORT:-6817}
SlurmdPort=${SLURM_LOCAL_SLURMD_PORT:-6818}
StateSaveLocation=${BASE}/state
SlurmdSpoolDir=${BASE}/spool
SlurmctldPidFile=${BASE}/run/slurmctld.pid
SlurmdPidFile=${BASE}/run/slurmd.pid
SlurmctldLogFile=${BASE}/log/slurmctld.log
SlurmdLogFile=${BASE}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
Waittime=0
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} Boards=1 SocketsPerBoard=1 CoresPerSocket=${CPUS} ThreadsPerCore=1 RealMemory=${REALMEM} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
CONF_CHANGED=0
if ! cmp -s "$TMP_CONF" "$CONF"; then
  install -m 0644 "$TMP_CONF" "$CONF"; CONF_CHANGED=1
  log "wrote $CONF"
fi
rm -f "$TMP_CONF"
export SLURM_CONF="$CONF"

# ---------------------------------------------------------------- slurmctld
if alive "$BASE/run/slurmctld.pid" slurmctld; then
  log "slurmctld already running (pid $(cat "$BASE/run/slurmctld.pid"))"
  [ "$CONF_CHANGED" = 0 ] || scontrol reconfigure || true
else
  slurmctld -f "$CONF" -i
  log "slurmctld started"
fi
for _ in $(seq $(( WAIT * 5 ))); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping | grep -q UP || { tail -20 "$BASE/log/slurmctld.log" >&2; die "slurmctld not answering"; }

# ---------------------------------------------------------------- slurmd
if alive "$BASE/run/slurmd.pid" slurmd; then
  log "slurmd already running (pid $(cat "$BASE/run/slurmd.pid"))"
else
  slurmd -f "$CONF"
  log "slurmd started"
fi

# ---------------------------------------------------------------- wait for idle
state=""
for i in $(seq $(( WAIT * 5 ))); do
  state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1)
  case "$state" in
    idle|mixed|allocated|completing) break ;;
    drain*|down*|fail*) [ $(( i % 25 )) = 1 ] && scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.2
done
case "$state" in
  idle|mixed|allocated|completing) ;;
  *) tail -20 "$BASE/log/slurmd.log" >&2; scontrol show node "$NODE" >&2 || true
     die "node $NODE is '$state', not idle" ;;
esac
log "ready: node $NODE is $state (SLURM_CONF=$CONF)"
sinfo
}

stop() {
# pid_of PIDFILE NAME -> prints the pid if it is alive and really NAME
pid_of() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ] && echo "$pid"
}

# stop_all NAME:PIDFILE... : SIGTERM them together, wait up to 15 s, then SIGKILL
stop_all() {
  local spec name file pid pids=() names=()
  for spec in "$@"; do
    name=${spec%%:*}; file=${spec#*:}
    if pid=$(pid_of "$file" "$name"); then
      kill -TERM "$pid" && pids+=("$pid") && names+=("$name")
    else
      echo "local-cluster: $name not running"
    fi
    rm -f "$file"
  done
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    for _ in $(seq 150); do [ -d "/proc/$pid" ] || break; sleep 0.05; done
    if [ -d "/proc/$pid" ]; then kill -KILL "$pid"; echo "local-cluster: killed ${names[$i]} ($pid)"
    else echo "local-cluster: stopped ${names[$i]} ($pid)"; fi
  done
}

# slurmd kills any running job steps on SIGTERM; munge goes last
stop_all "slurmd:$BASE/run/slurmd.pid" "slurmctld:$BASE/run/slurmctld.pid"
stop_all "munged:/run/munge/munged.pid"

if [ "${1:-}" = "--purge" ]; then
  rm -rf "$BASE"
  if [ -f "$CONF" ] && head -n1 "$CONF" | grep -q 'written by local-cluster.sh'; then rm -f "$CONF"; fi
  echo "local-cluster: purged $BASE and $CONF"
fi
}

case "${1:-}" in
  start) start ;;
  stop) shift; set +e; stop "${1:-}" ;;
  *) sed -n '2,8p' "$0"; exit 2 ;;
esac
