#!/usr/bin/env bash
# A real single-node SLURM for the tests (munge, MariaDB, slurmdbd, slurmctld, slurmd), from Debian's
# packages, without systemd or cgroups. Usage: launch/slurm_test_cluster.sh install|start|stop|status
# State lives in $AUTOSAM2_SLURM_DIR (default /tmp/autosam2-slurm); needs root.
set -euo pipefail

DIR=${AUTOSAM2_SLURM_DIR:-/tmp/autosam2-slurm}
NODE=$(hostname -s)
CPUS=${AUTOSAM2_SLURM_CPUS:-8}
PACKAGES="slurm-wlm slurm-client munge slurmdbd mariadb-server"

log() { echo "slurm-test-cluster: $*" >&2; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v munged >/dev/null && command -v mariadbd >/dev/null; then
    return 0
  fi
  log "installing $PACKAGES"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q $PACKAGES >/dev/null
}

wait_for() {  # wait_for SECONDS COMMAND...
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then log "timed out waiting for: $*"; return 1; fi
    sleep 0.3
  done
}

write_configs() {
  mkdir -p "$DIR"/{state,spool,log,mysql,run}
  chmod 755 "$DIR"
  # the node name must resolve: slurmd finds itself by it
  getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >> /etc/hosts
  local mem
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  cat > "$DIR/slurm.conf" <<EOF
ClusterName=autosam2test
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
KillWait=5
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  cat > "$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
EOF
  chmod 600 "$DIR/slurmdbd.conf"
}

start_munge() {
  if pgrep -x munged >/dev/null; then return 0; fi
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
  chmod 400 /etc/munge/munge.key
  runuser -u munge -- munged
  wait_for 10 munge -n
}

start_mariadb() {
  if ! pgrep -x mariadbd >/dev/null && ! pgrep -x mysqld >/dev/null; then
    if [ ! -d "$DIR/mysql/mysql" ]; then
      mariadb-install-db --user=root --datadir="$DIR/mysql" --auth-root-authentication-method=socket >/dev/null
    fi
    mariadbd --user=root --datadir="$DIR/mysql" --socket="$DIR/run/mysqld.sock" --pid-file="$DIR/run/mysqld.pid" \
      --bind-address=127.0.0.1 --port=3306 --log-error="$DIR/log/mysqld.log" >/dev/null 2>&1 &
    wait_for 60 mariadb --socket="$DIR/run/mysqld.sock" -e "select 1"
  fi
  local sql=""
  for host in localhost 127.0.0.1; do
    sql+="CREATE USER IF NOT EXISTS 'slurm'@'$host' IDENTIFIED BY 'slurm'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'$host'; "
  done
  mariadb --socket="$DIR/run/mysqld.sock" -e "$sql FLUSH PRIVILEGES;"
}

start() {
  install
  write_configs
  export SLURM_CONF="$DIR/slurm.conf"
  start_munge
  start_mariadb
  pgrep -x slurmdbd >/dev/null || slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
  wait_for 30 sacctmgr -i list cluster
  sacctmgr -i add cluster autosam2test >/dev/null 2>&1 || true
  pgrep -x slurmctld >/dev/null || slurmctld -f "$DIR/slurm.conf"
  wait_for 30 scontrol ping
  pgrep -x slurmd >/dev/null || slurmd -f "$DIR/slurm.conf"
  wait_for 30 bash -c "sinfo -h -o %t | grep -Eq '^(idle|mix|alloc)'"
  log "up: node $NODE, $CPUS CPUs; export SLURM_CONF=$DIR/slurm.conf"
}

stop() {
  export SLURM_CONF="$DIR/slurm.conf"
  if pgrep -x slurmctld >/dev/null; then
    scancel --full --quiet -u root 2>/dev/null || true
    wait_for 30 bash -c "[ -z \"\$(squeue -h)\" ]" || true
  fi
  for daemon in slurmd slurmctld slurmdbd; do pkill -x "$daemon" 2>/dev/null || true; done
  wait_for 15 bash -c "! pgrep -x slurmd && ! pgrep -x slurmctld && ! pgrep -x slurmdbd" || true
  if [ -f "$DIR/run/mysqld.pid" ]; then kill "$(cat "$DIR/run/mysqld.pid")" 2>/dev/null || true; fi
  wait_for 30 bash -c "! pgrep -x mariadbd" || true
  pkill -x munged 2>/dev/null || true
  log "stopped"
}

status() {
  export SLURM_CONF="$DIR/slurm.conf"
  sinfo && squeue
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
