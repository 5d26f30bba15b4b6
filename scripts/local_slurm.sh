#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the SLURM tests and CI (run as root):
#
#   scripts/local_slurm.sh start    # install slurm-wlm + munge if missing, write the config, start the daemons
#   scripts/local_slurm.sh status   # `scontrol ping` and the node's state
#   scripts/local_slurm.sh stop     # stop the daemons this script started
#
# The node is this host with the CPUs and memory `slurmd -C` reports, in one default partition, `debug`
# ($LOCAL_SLURM_PARTITION). Starting a running cluster is a no-op. Any failure (no apt, not root) exits
# non-zero with the reason, so CI stops there instead of skipping the SLURM tests.
set -euo pipefail

PARTITION="${LOCAL_SLURM_PARTITION:-debug}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
STATE=/var/spool/slurm-local
LOGS=/var/log/slurm-local
MARK='# Written by scripts/local_slurm.sh'

say() { echo "[local_slurm] $*" >&2; }
die() {
  say "error: $*"
  exit 1
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || die 'installing slurm-wlm and munge needs root (or install them yourself).'
  command -v apt-get >/dev/null || die 'apt-get is not available: install slurm-wlm and munge with your package manager.'
  say 'installing slurm-wlm and munge'
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die 'apt-get update failed.'
  apt-get install -y -qq slurm-wlm munge >/dev/null || die 'apt-get install slurm-wlm munge failed.'
}

write_config() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script: refusing to overwrite a real cluster's config."
  fi
  local host node
  host="$(hostname -s)"
  # 'NodeName=vm CPUs=2 Boards=1 ... RealMemory=24105': the hardware line, minus the uptime line.
  node="$(slurmd -C | grep '^NodeName=')"
  [ -n "$node" ] || die 'slurmd -C printed no NodeName line.'
  mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$LOGS"
  cat >"$CONF.new" <<EOF
$MARK: a one-node cluster for tests.
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# Containers rarely give slurmd its cgroups: track processes by their parents, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Seconds between SIGTERM and SIGKILL when a job is cancelled or requeued: the time a checkpoint has to finish.
KillWait=60
MinJobAge=300
$node State=UNKNOWN
# Jobs may share cores (up to 4 per core): tests running side by side do not queue behind each other.
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
  mv "$CONF.new" "$CONF"
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    return
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null ||
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
  chmod 400 /etc/munge/munge.key
  chmod 755 /run/munge
  runuser -u munge -- munged || die 'munged did not start (see /var/log/munge/munged.log).'
  munge -n </dev/null | unmunge >/dev/null || die 'munge does not answer after starting munged.'
}

wait_for() {  # wait_for <seconds> <command...>: true once the command succeeds
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}

node_idle() { sinfo -h -N -o '%t' | grep -qE '^(idle|mix|alloc)'; }

start() {
  if scontrol ping 2>/dev/null | grep -q 'UP' && node_idle; then
    say 'already running'
    return
  fi
  install_packages
  write_config
  start_munge
  if ! pgrep -x slurmctld >/dev/null; then
    slurmctld || die "slurmctld did not start (see $LOGS/slurmctld.log)."
  fi
  wait_for 30 scontrol ping || die "slurmctld does not answer (see $LOGS/slurmctld.log)."
  if ! pgrep -x slurmd >/dev/null; then
    slurmd || die "slurmd did not start (see $LOGS/slurmd.log)."
  fi
  if ! wait_for 30 node_idle; then
    scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true
    wait_for 15 node_idle || die "the node did not come up: $(sinfo -N 2>&1) (see $LOGS/slurmd.log)."
  fi
  say "up: partition $PARTITION, $(sinfo -h -o '%c CPUs, %m MB' | head -1)"
}

stop() {
  local name pid
  for name in slurmd slurmctld; do
    pid="$(cat "$STATE/$name.pid" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      wait_for 15 bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
    fi
  done
  say 'stopped slurmd and slurmctld (munged keeps running)'
}

status() {
  scontrol ping && sinfo -N
}

main() {
  case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status" ;;
  esac
}

main "$@"
