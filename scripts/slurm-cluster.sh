#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for CI and for tests that submit real jobs.
#
#   scripts/slurm-cluster.sh install   # apt packages (skipped when already installed)
#   scripts/slurm-cluster.sh install start   # several verbs run in order
#   scripts/slurm-cluster.sh start     # munged, mariadbd, slurmdbd, slurmctld, slurmd n1 + n2; waits until idle
#   scripts/slurm-cluster.sh status    # sinfo + daemons; non-zero exit when unhealthy
#   scripts/slurm-cluster.sh stop      # cancel jobs, stop every daemon started here
#
# Needs root, no systemd (daemons are started by hand). Everything lives in ${TUNEFORGE_SLURM_DIR:-/tmp/tuneforge-slurm},
# recreated on each start (so job ids restart at 1: use a fresh submitit folder per test run).
# /etc/slurm/slurm.conf is a symlink to the state dir's copy so plain `sbatch`/`squeue`/`sacct` work.
# Both nodes run on this host: n1/n2 resolve to 127.0.0.11/.12 (via /etc/hosts), each slurmd on its own port.
set -euo pipefail

DIR=${TUNEFORGE_SLURM_DIR:-/tmp/tuneforge-slurm}
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
DAEMONS=(slurmd-n1 slurmd-n2 slurmctld slurmdbd mariadbd munged)   # stop order; start is the reverse
DB_SOCKET=/run/mysqld/mysqld.sock   # libmariadb's default: slurmdbd has no option for another socket
export SLURM_CONF=$DIR/slurm.conf   # the daemons read this; clients fall back to /etc/slurm/slurm.conf

log() { echo "slurm-cluster: $*"; }
die() { echo "slurm-cluster: ERROR: $*" >&2; exit 1; }
pidfile() { echo "$DIR/run/$1.pid"; }
alive() { local f; f=$(pidfile "$1"); [[ -s $f ]] && kill -0 "$(cat "$f")" 2>/dev/null; }

install() {
  local p missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q ' installed$' || missing+=("$p")
  done
  if [[ ${#missing[@]} -eq 0 ]]; then log "packages already installed"; return 0; fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
}

# Healthy = every daemon alive, both nodes schedulable, accounting answering (submitit's job.state needs sacct).
healthy() {
  local d
  for d in "${DAEMONS[@]}"; do alive "$d" || return 1; done
  [[ $(timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE '^n[12] (idle|mix|alloc)$') -eq 2 ]] || return 1
  timeout 5 sacct -n -X -S now >/dev/null 2>&1
}

write_configs() {
  local host mem
  host=$(hostname -s)
  # Two emulated nodes share the machine's memory; keep ~4 GB for the OS and the daemons.
  mem=$(( ($(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo) - 4000) / 2 ))
  (( mem >= 500 )) || mem=500
  cat >"$DIR/slurm.conf" <<EOF
ClusterName=tuneforge
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# Short credential lifetime: otherwise a requeued job waits ~120 s before it may start again.
AuthInfo=cred_expire=10
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Schedule every 2 s so tests do not wait on the default 60 s backfill / scheduling passes.
SchedulerParameters=sched_interval=2,bf_interval=2
JobAcctGatherType=jobacct_gather/none
# Without slurmdbd, sacct fails: submitit's job.state stays UNKNOWN and result() of a cancelled job hangs.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
MpiDefault=none
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.11 Port=17001 CPUs=2 RealMemory=$mem State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.12 Port=17002 CPUs=2 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
  # slurmdbd refuses a config that others can read (it holds the DB password).
  (umask 077; cat >"$DIR/slurmdbd.conf" <<EOF
DbdHost=localhost
SlurmUser=root
AuthType=auth/munge
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=tuneforge
StorageLoc=slurm_acct_db
PidFile=$(pidfile slurmdbd)
LogFile=$DIR/log/slurmdbd.log
EOF
  )
  mkdir -p /etc/slurm
  if [[ -f /etc/slurm/slurm.conf && ! -L /etc/slurm/slurm.conf ]]; then
    mv /etc/slurm/slurm.conf /etc/slurm/slurm.conf.before-tuneforge   # keep someone's own config
  fi
  ln -sfn "$DIR/slurm.conf" /etc/slurm/slurm.conf
}

# Wait up to $1 seconds for command "${@:2}" to succeed.
wait_for() {
  local t=$1 i; shift
  for ((i = 0; i < t * 5; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}

start() {
  [[ $EUID -eq 0 ]] || die "must run as root"
  command -v slurmctld >/dev/null || die "slurm is not installed: run '$0 install' first"
  if healthy; then log "already running and healthy ($DIR)"; return 0; fi
  stop quiet   # half-running or stale: start over from nothing
  local t0=$SECONDS
  # Fresh state every start, except the cached empty MariaDB data dir (initialising one costs 1-5 s).
  # The marker file guards against wiping a directory that is not ours (TUNEFORGE_SLURM_DIR=$HOME...).
  mkdir -p "$DIR"
  [[ -e $DIR/.tuneforge-slurm || -z $(ls -A "$DIR") ]] || die "$DIR is not empty and not a tuneforge-slurm dir"
  touch "$DIR/.tuneforge-slurm"
  find "$DIR" -mindepth 1 -maxdepth 1 ! -name cache ! -name .tuneforge-slurm -exec rm -rf {} +
  mkdir -p "$DIR"/{run,log,state,spool/n1,spool/n2,munge,cache} /run/munge /run/mysqld
  chown munge:munge /run/munge "$DIR/munge"
  # Node names must resolve to their NodeAddr: tasks use them as MASTER_ADDR (gloo). Append only:
  # /etc/hosts may be a bind mount that cannot be replaced.
  grep -qE '^127\.0\.0\.11[[:space:]]+n1$' /etc/hosts || echo "127.0.0.11 n1" >>/etc/hosts
  grep -qE '^127\.0\.0\.12[[:space:]]+n2$' /etc/hosts || echo "127.0.0.12 n2" >>/etc/hosts
  write_configs

  runuser -u munge -- /usr/sbin/munged --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
    --seed-file="$DIR/munge/munged.seed"
  ln -sf "$DIR/munge/munged.pid" "$(pidfile munged)"
  wait_for 10 bash -c 'munge -n | unmunge' || die "munged did not start (see $DIR/munge/munged.log)"

  # MariaDB only backs slurmdbd: fresh data dir, no TCP, own pid/log; setsid detaches it from this shell.
  # Small InnoDB log and buffer pool: the DB holds a few test jobs (default log file is 96 MB).
  local dbopts=(--no-defaults --user=root --innodb-log-file-size=4M)
  if [[ ! -d $DIR/cache/db-template ]]; then
    rm -rf "$DIR/cache/db-tmp"
    mariadb-install-db "${dbopts[@]}" --datadir="$DIR/cache/db-tmp" --skip-test-db \
      --auth-root-authentication-method=socket >"$DIR/log/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed (see $DIR/log/mariadb-install.log)"
    mv "$DIR/cache/db-tmp" "$DIR/cache/db-template"
  fi
  cp -a "$DIR/cache/db-template" "$DIR/db"
  setsid /usr/sbin/mariadbd "${dbopts[@]}" --datadir="$DIR/db" --skip-networking --socket="$DB_SOCKET" \
    --pid-file="$(pidfile mariadbd)" --log-error="$DIR/log/mariadbd.log" --innodb-buffer-pool-size=64M \
    </dev/null >/dev/null 2>&1 &
  wait_for 30 mariadb --no-defaults -S "$DB_SOCKET" -u root -e 'SELECT 1' \
    || die "mariadbd did not start (see $DIR/log/mariadbd.log)"
  mariadb --no-defaults -S "$DB_SOCKET" -u root -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' \
    IDENTIFIED BY 'tuneforge'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

  # slurmdbd must answer before slurmctld starts, so the cluster registers itself in accounting.
  slurmdbd
  wait_for 30 sacctmgr -n list cluster || die "slurmdbd did not start (see $DIR/log/slurmdbd.log)"
  slurmctld
  slurmd -N n1
  slurmd -N n2
  wait_for 60 healthy || { sinfo -N >&2 || true; die "nodes not idle after 60 s (see $DIR/log)"; }
  log "up in $((SECONDS - t0)) s: partition 'debug', nodes n1,n2 ($(sinfo -h -N -o '%N:%t' | paste -sd' ')), state $DIR"
}

stop() {
  # End jobs first so no task outlives the daemons. A plain scancel sends SIGTERM, which submitit tasks ignore,
  # and slurmd sends the SIGKILL only KillWait (30 s) later. So SIGKILL each step (a job id alone reaches only
  # the batch shell; scancel rejects "N.batch"), then cancel the jobs themselves.
  local ids=() steps=()
  alive slurmctld && mapfile -t ids < <(timeout 5 squeue -h -o %i 2>/dev/null)
  if [[ ${#ids[@]} -gt 0 ]]; then
    mapfile -t steps < <(timeout 5 squeue -h -s -o %i | grep -E '^[0-9]+\.[0-9]+$')
    [[ ${#steps[@]} -eq 0 ]] || timeout 5 scancel --signal=KILL "${steps[@]}" 2>/dev/null || true
    timeout 5 scancel "${ids[@]}" 2>/dev/null || true
    # shellcheck disable=SC2016  # expanded by the inner bash, on every try
    wait_for 15 bash -c '[[ -z $(squeue -h -o %i) ]]' || log "jobs still listed; stopping anyway"
  fi
  # Each daemon takes ~2 s to exit: stop them in two parallel waves (slurm, then what slurm needed).
  stop_wave slurmd-n1 slurmd-n2 slurmctld slurmdbd
  stop_wave mariadbd munged
  [[ ${1:-} == quiet ]] || log "stopped"
}

# SIGTERM the given daemons together, wait up to 10 s, then SIGKILL what is left.
stop_wave() {
  local d pids=() i
  for d in "$@"; do alive "$d" && pids+=("$(cat "$(pidfile "$d")")"); done
  [[ ${#pids[@]} -gt 0 ]] || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do any_alive "${pids[@]}" || return 0; sleep 0.1; done
  for i in "${pids[@]}"; do kill -0 "$i" 2>/dev/null && { log "pid $i ignored SIGTERM: killing"; kill -9 "$i"; }; done
  return 0
}
any_alive() { local p; for p; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }

status() {
  local d rc=0
  if alive slurmctld; then timeout 5 sinfo -N 2>&1 || rc=1; fi
  for d in "${DAEMONS[@]}"; do
    if alive "$d"; then echo "$d: running (pid $(cat "$(pidfile "$d")"))"; else echo "$d: NOT running"; rc=1; fi
  done
  healthy || rc=1
  echo "cluster: $([[ $rc -eq 0 ]] && echo healthy || echo UNHEALTHY) ($DIR)"
  return $rc
}

# Several verbs run in order: `install start` installs, then starts.
[[ $# -gt 0 ]] || { echo "usage: $0 install|start|stop|status [more verbs, run in order]" >&2; exit 2; }
for verb in "$@"; do
  case $verb in install | start | stop | status) ;; *) echo "usage: $0 install|start|stop|status ..." >&2; exit 2 ;; esac
done
if [[ -z ${_TUNEFORGE_SLURM_LOCKED:-} ]] && [[ " $* " == *" start "* || " $* " == *" stop "* ]]; then
  # One start/stop at a time (CI and parallel test workers may both call start). flock -o: the daemons
  # started below must not inherit the lock's file descriptor, or it would stay held while they run.
  exec env _TUNEFORGE_SLURM_LOCKED=1 flock -o -w 120 /run/tuneforge-slurm-cluster.lock "$0" "$@"
fi
for verb in "$@"; do
  "$verb"
done
