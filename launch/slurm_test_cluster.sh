#!/usr/bin/env bash
# A real SLURM for the tests (munge, MariaDB, slurmdbd, slurmctld, slurmd), from Debian's packages,
# without systemd or cgroups. Usage: launch/slurm_test_cluster.sh install|start|stop|status [--hosts N]
#
# Without --hosts: one node, this machine (127.0.0.1). With --hosts N: N test hosts node1..nodeN, each a
# network namespace with its own hostname (a UTS namespace) and address 10.231.0.K on one bridge
# (as2br0, 10.231.0.254 on this machine's side), named in /etc/hosts, one slurmd each; slurmctld and
# slurmdbd run here. The two kinds can be up at once: each has its own state folder, ports and database,
# munge is shared. `stop` removes every namespace, link, /etc/hosts line and daemon it made; `start`
# first removes what a crashed run left (with --hosts it always starts a fresh cluster: no jobs or
# accounting records carried over). State lives in $AUTOSAM2_SLURM_DIR (default
# /tmp/autosam2-slurm, or /tmp/autosam2-slurm-hosts with --hosts); needs root.
set -euo pipefail

HOSTS=0
ACTION=${1:-}
shift || true
while [ $# -gt 0 ]; do
  case "$1" in
    --hosts) HOSTS=$2; shift 2 ;;
    *) echo "usage: $0 install|start|stop|status [--hosts N]" >&2; exit 2 ;;
  esac
done
if [ "$HOSTS" -gt 0 ]; then
  DIR=${AUTOSAM2_SLURM_DIR:-/tmp/autosam2-slurm-hosts}
  CTLD_PORT=6827 DBD_PORT=6829 DB_PORT=3316 DB_NAME=slurm_acct_db_hosts CLUSTER=autosam2hosts
else
  DIR=${AUTOSAM2_SLURM_DIR:-/tmp/autosam2-slurm}
  CTLD_PORT=6817 DBD_PORT=6819 DB_PORT=3306 DB_NAME=slurm_acct_db CLUSTER=autosam2test
fi
NODE=$(hostname -s)
CPUS=${AUTOSAM2_SLURM_CPUS:-8}
PACKAGES="slurm-wlm slurm-client munge slurmdbd mariadb-server iproute2"  # iproute2: the --hosts namespaces
SUBNET=10.231.0
BRIDGE=as2br0
MARK="# autosam2-test-hosts"

log() { echo "slurm-test-cluster: $*" >&2; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v munged >/dev/null && command -v mariadbd >/dev/null && command -v ip >/dev/null; then
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

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pid() {  # TERM a daemon, KILL it after 15 s, and wait until it is gone: a start right after finds none
  local pid=$1
  kill "$pid" 2>/dev/null || true
  if ! wait_for 15 bash -c "! kill -0 $pid"; then
    kill -9 "$pid" 2>/dev/null || true
    wait_for 15 bash -c "! kill -0 $pid" || log "pid $pid outlived SIGKILL"
  fi
}

stop_pidfile() {  # the daemon of a pid file, then the file
  local file=$1
  if alive "$file"; then stop_pid "$(cat "$file")"; fi
  rm -f "$file"
}

munge_answers() { timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; }

stop_munge() {  # every munged, each waited for
  local pid
  for pid in $(pgrep -x munged || true); do stop_pid "$pid"; done
}

node_lines() {  # the NodeName lines of slurm.conf, and the partition over them
  local mem=$1 k
  if [ "$HOSTS" -gt 0 ]; then
    for k in $(seq 1 "$HOSTS"); do
      echo "NodeName=node$k NodeAddr=$SUBNET.$k CPUs=$CPUS RealMemory=$((mem / HOSTS)) State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=node[1-$HOSTS] Default=YES MaxTime=INFINITE State=UP"
  else
    echo "NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN"
    echo "PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP"
  fi
}

write_configs() {
  mkdir -p "$DIR"/{state,spool,log,mysql,run}
  chmod 755 "$DIR"
  # the node name must resolve: slurmd finds itself by it
  getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >> /etc/hosts
  local mem controller=$NODE spool=$DIR/spool pidfile=$DIR/run/slurmd.pid logfile=$DIR/log/slurmd.log
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  # KillWait: seconds between SIGTERM and SIGKILL when a job is cancelled or requeued
  local killwait=5 slurmd_timeout=300
  if [ "$HOSTS" -gt 0 ]; then  # the hosts reach slurmctld over the bridge; a spool, pid and log each
    controller="$NODE($SUBNET.254)" spool=$DIR/spool/%n pidfile=$DIR/run/slurmd-%n.pid logfile=$DIR/log/slurmd-%n.log
    # SLURM's default grace (a rank checkpoints at its next step), and a dead host declared DOWN, its
    # job requeued, within 15 s rather than 5 minutes
    killwait=30 slurmd_timeout=15
  fi
  cat > "$DIR/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$controller
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
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$pidfile
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$logfile
SlurmctldPort=$CTLD_PORT
SlurmdPort=6818
KillWait=$killwait
SlurmdTimeout=$slurmd_timeout
MinJobAge=300
$(node_lines "$mem")
EOF
  cat > "$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=$DB_NAME
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
EOF
  chmod 600 "$DIR/slurmdbd.conf"
}

start_munge() {
  # judged by its socket, not by its name: a munged still exiting (or hung) answers nothing
  if munge_answers; then return 0; fi
  stop_munge
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
  chmod 400 /etc/munge/munge.key
  runuser -u munge -- munged --force  # --force: past the socket and lock a killed munged left
  wait_for 10 munge_answers
}

start_mariadb() {
  if ! alive "$DIR/run/mysqld.pid"; then
    if [ ! -d "$DIR/mysql/mysql" ]; then
      mariadb-install-db --user=root --datadir="$DIR/mysql" --auth-root-authentication-method=socket >/dev/null
    fi
    mariadbd --user=root --datadir="$DIR/mysql" --socket="$DIR/run/mysqld.sock" --pid-file="$DIR/run/mysqld.pid" \
      --bind-address=127.0.0.1 --port="$DB_PORT" --log-error="$DIR/log/mysqld.log" >/dev/null 2>&1 &
    wait_for 60 mariadb --socket="$DIR/run/mysqld.sock" -e "select 1"
  fi
  local sql="" host
  for host in localhost 127.0.0.1; do
    sql+="CREATE USER IF NOT EXISTS 'slurm'@'$host' IDENTIFIED BY 'slurm'; GRANT ALL ON $DB_NAME.* TO 'slurm'@'$host'; "
  done
  mariadb --socket="$DIR/run/mysqld.sock" -e "$sql FLUSH PRIVILEGES;"
}

hosts_up() {  # the bridge, one namespace per host with its veth, the /etc/hosts lines
  local k
  ip link add "$BRIDGE" type bridge
  ip addr add "$SUBNET.254/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for k in $(seq 1 "$HOSTS"); do
    ip netns add "as2-node$k"
    ip link add "as2v$k" type veth peer name eth0 netns "as2-node$k"
    ip link set "as2v$k" master "$BRIDGE" up
    ip netns exec "as2-node$k" ip addr add "$SUBNET.$k/24" dev eth0
    ip netns exec "as2-node$k" ip link set eth0 up
    ip netns exec "as2-node$k" ip link set lo up
    echo "$SUBNET.$k node$k $MARK" >> /etc/hosts
  done
  echo "$HOSTS" > "$DIR/hosts"
}

hosts_down() {  # whatever a run of --hosts left: processes in the namespaces, namespaces, links, lines
  local ns link
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^as2-node[0-9]+$' || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E '^as2v[0-9]+$' || true); do
    ip link del "$link" 2>/dev/null || true
  done
  if grep -q "$MARK\$" /etc/hosts; then
    # /etc/hosts may be a bind mount: rewrite it in place rather than replace the file
    grep -v "$MARK\$" /etc/hosts > "$DIR/hosts.clean" || true
    cat "$DIR/hosts.clean" > /etc/hosts
    rm -f "$DIR/hosts.clean"
  fi
  rm -f "$DIR/hosts"
}

start_slurmds() {
  local k
  if [ "$HOSTS" -eq 0 ]; then
    alive "$DIR/run/slurmd.pid" || slurmd -f "$DIR/slurm.conf"
    wait_for 30 bash -c "sinfo -h -o %t | grep -Eq '^(idle|mix|alloc)'"
    return
  fi
  for k in $(seq 1 "$HOSTS"); do
    mkdir -p "$DIR/spool/node$k"
    # its own hostname (a UTS namespace) inside its network namespace; the ranks it starts inherit both
    # nsenter, not ip netns exec: that remounts /sys for the namespace, without the cgroup file system
    nsenter --net="/run/netns/as2-node$k" unshare --uts sh -c "hostname node$k && exec slurmd -N node$k -f '$DIR/slurm.conf'"
  done
  wait_for 60 bash -c "[ \$(sinfo -h -N -o %t | grep -Ec '^(idle|mix|alloc)') -ge $HOSTS ]"
}

stop_daemons() {
  local file
  export SLURM_CONF="$DIR/slurm.conf"
  if alive "$DIR/run/slurmctld.pid"; then
    scancel --full --quiet -u root 2>/dev/null || true
    wait_for 30 bash -c "[ -z \"\$(squeue -h)\" ]" || true
  fi
  for file in "$DIR"/run/slurmd*.pid; do
    if [ -e "$file" ]; then stop_pidfile "$file"; fi
  done
  stop_pidfile "$DIR/run/slurmctld.pid"
  stop_pidfile "$DIR/run/slurmdbd.pid"
  stop_pidfile "$DIR/run/mysqld.pid"
}

start() {
  install
  if [ "$HOSTS" -gt 0 ]; then  # what a crashed run left goes first, its jobs' records too: a fresh cluster
    mkdir -p "$DIR/run"
    stop_daemons
    hosts_down
    rm -rf "${DIR:?}"/{state,spool,log,mysql,run}
  fi
  write_configs
  export SLURM_CONF="$DIR/slurm.conf"
  # the bridge first: until 10.231.0.254 exists, its traffic takes the default route off the machine
  if [ "$HOSTS" -gt 0 ]; then hosts_up; fi
  start_munge
  start_mariadb
  alive "$DIR/run/slurmdbd.pid" || slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
  wait_for 30 sacctmgr -i list cluster
  sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
  alive "$DIR/run/slurmctld.pid" || slurmctld -f "$DIR/slurm.conf"
  wait_for 30 scontrol ping
  start_slurmds
  if [ "$HOSTS" -gt 0 ]; then
    log "up: hosts node1..node$HOSTS ($SUBNET.1-$HOSTS), $CPUS CPUs each; export SLURM_CONF=$DIR/slurm.conf"
  else
    log "up: node $NODE, $CPUS CPUs; export SLURM_CONF=$DIR/slurm.conf"
  fi
}

stop() {
  stop_daemons
  if [ "$HOSTS" -gt 0 ] || [ -f "$DIR/hosts" ]; then hosts_down; fi
  # munge is shared by both kinds of cluster: it goes with the last slurmctld
  if ! pgrep -x slurmctld >/dev/null; then stop_munge; fi
  log "stopped"
}

status() {
  export SLURM_CONF="$DIR/slurm.conf"
  sinfo && squeue
}

case "$ACTION" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status [--hosts N]" >&2; exit 2 ;;
esac
