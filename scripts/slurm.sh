#!/usr/bin/env bash
# A throwaway single-node Slurm (22.05, Debian packages) with accounting, for the Slurm launcher's tests.
#
#   scripts/slurm.sh start    start munged, mariadbd, slurmdbd, slurmctld, slurmd; wait until the node is idle
#   scripts/slurm.sh stop     stop exactly the daemons this script started (by their recorded pids)
#   scripts/slurm.sh status   exit 0 when the node answers sinfo as idle/mixed/allocated, else 1
#   scripts/slurm.sh env      print `export SLURM_CONF=...` for clients (sinfo, sbatch, mpbench)
#
# Installs nothing: needs `slurm-wlm munge slurmdbd mariadb-server` (apt, --no-install-recommends); runs as root
# without systemd. Configs, state, logs and pid files live in $MPBENCH_SLURM_DIR (default /tmp/mpbench-slurm).
# Clients find the config through SLURM_CONF; when /etc/slurm/slurm.conf does not exist, start also links it
# there (stop removes that link). Partitions: `debug` (default, preemptable: PreemptMode=REQUEUE, GraceTime 60 s)
# and `urgent` (higher PriorityTier: its jobs preempt debug's).
set -euo pipefail

DIR=${MPBENCH_SLURM_DIR:-/tmp/mpbench-slurm}
DB_PORT=${MPBENCH_SLURM_DB_PORT:-16306}
CLUSTER=mpbench
ETC_LINK=/etc/slurm/slurm.conf
export SLURM_CONF=$DIR/etc/slurm.conf

die() { echo "slurm.sh: $*" >&2; exit 1; }
alive() { [ -f "$DIR/pids/$1" ] && kill -0 "$(cat "$DIR/pids/$1")" 2>/dev/null; }
node_state() { timeout 5 sinfo -h -N -o %t 2>/dev/null | head -n1; }
is_up() { case "$(node_state)" in idle|mix|alloc|comp) return 0 ;; *) return 1 ;; esac; }

wait_for() {  # wait_for SECONDS WHAT COMMAND...
  local t=$1 what=$2; shift 2
  for _ in $(seq $((t * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "$what did not come up within ${t}s (logs: $DIR/log/)"
}

write_configs() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(awk '/MemAvailable/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
  mkdir -p "$DIR"/{etc,db,run,log,pids,state,spool}
  cat >"$DIR/etc/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SlurmctldParameters=preempt_send_user_signal
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
JobRequeue=1
KillWait=10
ReturnToService=2
MailProg=/bin/true
MpiDefault=none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=60
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi   # a munged already answers
  [ -f /etc/munge/munge.key ] || mungekey --create
  chown munge:munge /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  setpriv --reuid=munge --regid=munge --init-groups munged -F >"$DIR/log/munged.out" 2>&1 &
  echo $! >"$DIR/pids/munged"
  wait_for 15 munged sh -c 'munge -n </dev/null | unmunge'
}

start_mariadb() {
  alive mariadbd && return 0
  if [ ! -d "$DIR/db/mysql" ]; then
    mariadb-install-db --no-defaults --datadir="$DIR/db" --user=root --auth-root-authentication-method=normal \
      --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $DIR/log/mariadb-install.log"
  fi
  mariadbd --no-defaults --datadir="$DIR/db" --user=root --socket="$DIR/run/mysqld.sock" --port="$DB_PORT" \
    --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$DIR/run/mariadbd.pid" \
    --log-error="$DIR/log/mariadb.log" >/dev/null 2>&1 &
  echo $! >"$DIR/pids/mariadbd"
  wait_for 30 mariadbd mariadb --no-defaults -S "$DIR/run/mysqld.sock" -u root -e 'SELECT 1'
  mariadb --no-defaults -S "$DIR/run/mysqld.sock" -u root -e \
    "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
     GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

start_slurmdbd() {
  # slurmdbd has no -f: it reads slurmdbd.conf from the directory of $SLURM_CONF
  alive slurmdbd && return 0
  slurmdbd -D >"$DIR/log/slurmdbd.out" 2>&1 &
  echo $! >"$DIR/pids/slurmdbd"
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
}

start_slurm() {
  if ! alive slurmctld; then
    slurmctld -D -f "$SLURM_CONF" >"$DIR/log/slurmctld.out" 2>&1 &
    echo $! >"$DIR/pids/slurmctld"
  fi
  wait_for 30 slurmctld scontrol ping
  if ! alive slurmd; then
    slurmd -D -f "$SLURM_CONF" -N "$(hostname -s)" >"$DIR/log/slurmd.out" 2>&1 &
    echo $! >"$DIR/pids/slurmd"
  fi
}

cmd_start() {
  [ "$(id -u)" = 0 ] || die "start needs root (it runs munged as user munge and the Slurm daemons as root)"
  for b in munged mariadbd slurmdbd slurmctld slurmd sinfo; do
    command -v "$b" >/dev/null || die "$b not found: apt-get install --no-install-recommends slurm-wlm munge slurmdbd mariadb-server"
  done
  if alive slurmctld && alive slurmd && is_up; then echo "slurm: already running ($DIR)"; return 0; fi
  mkdir -p "$DIR"/{etc,db,run,log,pids,state,spool}
  alive slurmctld || write_configs            # a running controller keeps the config it was started with
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurm
  [ -e "$ETC_LINK" ] || { ln -s "$SLURM_CONF" "$ETC_LINK" && touch "$DIR/pids/etc-link"; }
  for _ in $(seq 300); do is_up && break; sleep 0.2; done
  is_up || die "the node is not idle after 60s (sinfo says '$(node_state)'; logs: $DIR/log/)"
  echo "slurm: up, node $(hostname -s) $(node_state) ($(sinfo -V)); clients need SLURM_CONF=$SLURM_CONF"
}

cmd_stop() {
  local name pid
  for name in slurmd slurmctld slurmdbd mariadbd munged; do
    [ -f "$DIR/pids/$name" ] || continue
    pid=$(cat "$DIR/pids/$name")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$DIR/pids/$name"
  done
  if [ -f "$DIR/pids/etc-link" ]; then
    [ "$(readlink "$ETC_LINK" 2>/dev/null)" = "$SLURM_CONF" ] && rm -f "$ETC_LINK"
    rm -f "$DIR/pids/etc-link"
  fi
  echo "slurm: stopped"
}

cmd_status() {
  command -v sinfo >/dev/null || { echo "slurm: sinfo not installed"; return 1; }
  [ -f "$SLURM_CONF" ] || { echo "slurm: not configured ($SLURM_CONF missing; run scripts/slurm.sh start)"; return 1; }
  if is_up; then echo "slurm: up, node $(node_state) (SLURM_CONF=$SLURM_CONF)"; return 0; fi
  echo "slurm: down (node state '$(node_state)')"; return 1
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
