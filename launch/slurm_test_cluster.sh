#!/usr/bin/env bash
# A real SLURM for the tests (munge, MariaDB, slurmdbd, slurmctld, slurmd), from Debian's packages,
# without systemd or cgroups. Usage: launch/slurm_test_cluster.sh install|start|stop|status [--hosts N]
#
# Without --hosts: one node, this machine (127.0.0.1). With --hosts N: N test hosts node1..nodeN, each a
# network namespace with its own hostname (a UTS namespace) and address 10.231.0.K on one bridge
# (as2br0, 10.231.0.254 on this machine's side), named in /etc/hosts, one slurmd each; slurmctld and
# slurmdbd run here. The two kinds can be up at once.
#
# Everything a cluster has lives in its state folder, $AUTOSAM2_SLURM_DIR (default /tmp/autosam2-slurm,
# or /tmp/autosam2-slurm-hosts with --hosts; needs root): slurm.conf and slurmdbd.conf, SLURM's state,
# spool, logs and pid files, its own munged (socket, key, pid in munge/), its own MariaDB (data in mysql/,
# socket in run/), and `ports`. The four TCP ports (slurmctld, slurmd, slurmdbd, MariaDB) are chosen free
# at a fresh start, in $AUTOSAM2_SLURM_PORTS (default 10000-19999: below the kernel's ephemeral ports and
# the jobs' rendezvous ports 20000-39999), never SLURM's or MariaDB's defaults. Commands reach the
# cluster through SLURM_CONF=$AUTOSAM2_SLURM_DIR/slurm.conf (`status` prints it).
#
# A daemon is this cluster's when its pid file in the state folder names a live process of the daemon's
# name whose command line (slurmdbd: whose SLURM_CONF) names the state folder. `start` reuses and `stop`
# stops only those: a SLURM, munged or database of the machine's own, or of another state folder, is
# left alone. `stop` removes every namespace, link and /etc/hosts line it made; `start` first removes
# what a crashed run left (with --hosts it always starts a fresh cluster: no jobs or accounting records
# carried over), and fails in one line where the namespaces or bridge are another cluster's.
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
  DB_NAME=slurm_acct_db_hosts CLUSTER=autosam2hosts
else
  DIR=${AUTOSAM2_SLURM_DIR:-/tmp/autosam2-slurm}
  DB_NAME=slurm_acct_db CLUSTER=autosam2test
fi
DIR=$(realpath -m "$DIR")  # the one spelling the daemons' command lines are matched against
MUNGE=$DIR/munge
PORT_RANGE=${AUTOSAM2_SLURM_PORTS:-10000-19999}
DEFAULT_PORTS="6817 6818 6819 3306"  # SLURM's and MariaDB's own: never taken
NODE=$(hostname -s)
CPUS=${AUTOSAM2_SLURM_CPUS:-8}
PACKAGES="slurm-wlm slurm-client munge slurmdbd mariadb-server iproute2"  # iproute2: ss, the --hosts namespaces
SUBNET=10.231.0
BRIDGE=as2br0
MARK="# autosam2-test-hosts"

log() { echo "slurm-test-cluster: $*" >&2; }
fail() { log "$*"; exit 1; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v munged >/dev/null && command -v mariadbd >/dev/null && command -v ip >/dev/null && command -v ss >/dev/null; then
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

ours() {  # ours PIDFILE NAME: the pid file names a live NAME process of this state folder
  local pid cmdline environ
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
  cmdline=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null) || return 1
  if [[ "$cmdline" == *"$DIR/"* ]]; then return 0; fi
  environ=$(tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null) || return 1
  grep -qxF "SLURM_CONF=$DIR/slurm.conf" <<< "$environ"
}

daemon_of() {  # the process name of a pid file of the state folder
  case "$(basename "$1")" in
    slurmd.pid | slurmd-*.pid) echo slurmd ;;
    mysqld.pid) echo mariadbd ;;
    *) basename "$1" .pid ;;
  esac
}

pidfiles() { ls "$DIR"/run/*.pid "$MUNGE/munged.pid" 2>/dev/null || true; }

any_ours() {  # is a daemon of this state folder alive
  local file
  for file in $(pidfiles); do
    if ours "$file" "$(daemon_of "$file")"; then return 0; fi
  done
  return 1
}

stop_pid() {  # TERM a daemon, KILL it after 15 s, and wait until it is gone: a start right after finds none
  local pid=$1
  kill "$pid" 2>/dev/null || true
  if ! wait_for 15 bash -c "! kill -0 $pid"; then
    kill -9 "$pid" 2>/dev/null || true
    wait_for 15 bash -c "! kill -0 $pid" || log "pid $pid outlived SIGKILL"
  fi
}

stop_pidfile() {  # the daemon of a pid file if it is this state folder's, then the file
  local file=$1
  if ours "$file" "$(daemon_of "$file")"; then stop_pid "$(cat "$file")"; fi
  rm -f "$file"
}

used_ports() {  # every local TCP port in use on this machine, listening or connected
  ss -Htan | awk '{print $4}' | sed 's/.*://' | sort -un
}

choose_ports() {  # four free ports of $PORT_RANGE, from a random place in it, into $DIR/ports
  local low=${PORT_RANGE%-*} high=${PORT_RANGE#*-} used chosen=() span k port
  [[ "$low" =~ ^[0-9]+$ && "$high" =~ ^[0-9]+$ && "$low" -le "$high" ]] \
    || fail "AUTOSAM2_SLURM_PORTS=$PORT_RANGE: not a range LOW-HIGH"
  used=" $(used_ports | tr '\n' ' ') $DEFAULT_PORTS "
  span=$((high - low + 1))
  local first=$((RANDOM % span))
  for ((k = 0; k < span && ${#chosen[@]} < 4; k++)); do
    port=$((low + (first + k) % span))
    [[ "$used" == *" $port "* ]] || chosen+=("$port")
  done
  [ ${#chosen[@]} -eq 4 ] \
    || fail "fewer than 4 free TCP ports in $PORT_RANGE (AUTOSAM2_SLURM_PORTS) for slurmctld, slurmd, slurmdbd and MariaDB"
  printf 'CTLD_PORT=%s\nSLURMD_PORT=%s\nDBD_PORT=%s\nDB_PORT=%s\n' "${chosen[@]}" > "$DIR/ports"
}

munge_answers() {
  timeout 5 munge -S "$MUNGE/munge.socket" -n 2>/dev/null | timeout 5 unmunge -S "$MUNGE/munge.socket" >/dev/null 2>&1
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
  # shellcheck source=/dev/null
  source "$DIR/ports"
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
AuthInfo=cred_expire=10,socket=$MUNGE/munge.socket
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE/munge.socket
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# a requeued job is held about 10 s (its BeginTime), then starts at the next scheduling pass: every 1-2 s
# here rather than SLURM's 30 s (backfill) and 60 s (main loop)
SchedulerParameters=bf_interval=1,sched_interval=2
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
SlurmdPort=$SLURMD_PORT
KillWait=$killwait
SlurmdTimeout=$slurmd_timeout
MinJobAge=300
$(node_lines "$mem")
EOF
  cat > "$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE/munge.socket
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

start_munge() {  # this cluster's own munged: its key, socket, pid, log and seed in $MUNGE
  # judged by its socket, not by its name: a munged still exiting (or hung) answers nothing
  if ours "$MUNGE/munged.pid" munged && munge_answers; then return 0; fi
  stop_pidfile "$MUNGE/munged.pid"
  mkdir -p "$MUNGE"
  if [ ! -s "$MUNGE/munge.key" ]; then
    dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
  fi
  chown -R munge:munge "$MUNGE"
  chmod 755 "$MUNGE"
  chmod 400 "$MUNGE/munge.key"
  # --force: past the socket and lock a killed munged left
  runuser -u munge -- munged --force --socket="$MUNGE/munge.socket" --key-file="$MUNGE/munge.key" \
    --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed"
  wait_for 10 munge_answers
}

sql() { mariadb --no-defaults --socket="$DIR/run/mysqld.sock" "$@"; }

start_mariadb() {  # --no-defaults: none of the machine's MariaDB settings (its datadir, socket, port)
  if ! ours "$DIR/run/mysqld.pid" mariadbd; then
    if [ ! -d "$DIR/mysql/mysql" ]; then
      mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql" --auth-root-authentication-method=socket >/dev/null
    fi
    mariadbd --no-defaults --user=root --datadir="$DIR/mysql" --socket="$DIR/run/mysqld.sock" \
      --pid-file="$DIR/run/mysqld.pid" --bind-address=127.0.0.1 --port="$DB_PORT" \
      --log-error="$DIR/log/mysqld.log" >/dev/null 2>&1 &
    wait_for 60 sql -e "select 1"
  fi
  local statements="" host
  for host in localhost 127.0.0.1; do
    statements+="CREATE USER IF NOT EXISTS 'slurm'@'$host' IDENTIFIED BY 'slurm'; GRANT ALL ON $DB_NAME.* TO 'slurm'@'$host'; "
  done
  sql -e "$statements FLUSH PRIVILEGES;"
}

hosts_up() {  # the bridge, one namespace per host with its veth, the /etc/hosts lines
  local k
  echo "$HOSTS" > "$DIR/hosts"  # first: a run that stops half-way is still cleaned up as this one's
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
}

our_namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^as2-node[0-9]+$' || true; }

hosts_free() {  # the bridge and namespaces exist only where this state folder made them
  if [ -f "$DIR/hosts" ]; then return 0; fi
  if ip link show "$BRIDGE" >/dev/null 2>&1 || [ -n "$(our_namespaces)" ]; then
    fail "the bridge $BRIDGE or namespaces as2-node* exist and $DIR/hosts does not name them: another test cluster's (stop it with its AUTOSAM2_SLURM_DIR), or remove them (ip link del $BRIDGE; ip netns del as2-nodeK)"
  fi
}

hosts_down() {  # whatever a run of --hosts left: processes in the namespaces, namespaces, links, lines
  local ns link
  for ns in $(our_namespaces); do
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
    ours "$DIR/run/slurmd.pid" slurmd || slurmd -f "$DIR/slurm.conf"
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

stop_daemons() {  # this state folder's daemons, its munged last
  local file
  export SLURM_CONF="$DIR/slurm.conf"
  if ours "$DIR/run/slurmctld.pid" slurmctld; then
    scancel --full --quiet -u root 2>/dev/null || true
    wait_for 30 bash -c "[ -z \"\$(squeue -h)\" ]" || true
  fi
  for file in "$DIR"/run/slurmd.pid "$DIR"/run/slurmd-*.pid; do
    if [ -e "$file" ]; then stop_pidfile "$file"; fi
  done
  stop_pidfile "$DIR/run/slurmctld.pid"
  stop_pidfile "$DIR/run/slurmdbd.pid"
  stop_pidfile "$DIR/run/mysqld.pid"
  stop_pidfile "$MUNGE/munged.pid"
}

settle() {  # a crashed run's leftovers gone, and the ports: those of the daemons up, else free ones
  mkdir -p "$DIR/run"
  if [ "$HOSTS" -gt 0 ]; then  # what a crashed run left goes first, its jobs' records too: a fresh cluster
    hosts_free
    stop_daemons
    hosts_down
    rm -rf "${DIR:?}"/{state,spool,log,mysql,run,munge}
    mkdir -p "$DIR/run"
  fi
  if any_ours && [ -f "$DIR/ports" ]; then return 0; fi
  stop_daemons  # a partial cluster without recorded ports
  choose_ports
}

start() {
  install
  settle
  write_configs
  export SLURM_CONF="$DIR/slurm.conf"
  # the bridge first: until 10.231.0.254 exists, its traffic takes the default route off the machine
  if [ "$HOSTS" -gt 0 ]; then hosts_up; fi
  start_munge
  start_mariadb
  ours "$DIR/run/slurmdbd.pid" slurmdbd || slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
  wait_for 30 sacctmgr -i list cluster
  sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
  ours "$DIR/run/slurmctld.pid" slurmctld || slurmctld -f "$DIR/slurm.conf"
  wait_for 30 scontrol ping
  start_slurmds
  if [ "$HOSTS" -gt 0 ]; then
    log "up: hosts node1..node$HOSTS ($SUBNET.1-$HOSTS), $CPUS CPUs each; $(placement)"
  else
    log "up: node $NODE, $CPUS CPUs; $(placement)"
  fi
}

placement() {  # where the cluster is: its ports and how to reach it
  # shellcheck source=/dev/null
  source "$DIR/ports"
  echo "ports slurmctld $CTLD_PORT, slurmd $SLURMD_PORT, slurmdbd $DBD_PORT, MariaDB $DB_PORT; export SLURM_CONF=$DIR/slurm.conf"
}

stop() {
  stop_daemons
  if [ -f "$DIR/hosts" ]; then hosts_down; fi
  log "stopped"
}

status() {
  export SLURM_CONF="$DIR/slurm.conf"
  [ -f "$DIR/ports" ] || fail "no test cluster in $DIR"
  log "$(placement)"
  sinfo && squeue
}

case "$ACTION" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status [--hosts N]" >&2; exit 2 ;;
esac
