#!/usr/bin/env bash
# Start a ONE-NODE SLURM (slurmctld + slurmd + munged) on localhost, for tests and for trying
# out `studios segment --cluster slurm`. Debian's slurm 22.05 and munge, no cgroups, no
# accounting. Everything (munge key and socket, slurm.conf, state, spool, logs, pid files)
# lives in one directory; nothing under /etc is touched.
#
#   usage:  sudo deploy/slurm/start-local-slurm.sh [DIR]
#           eval "$(sudo deploy/slurm/start-local-slurm.sh DIR | grep '^export ')"
#
#   DIR     the state directory: first argument, else $STUDIOS_SLURM_DIR, else
#           ${TMPDIR:-/tmp}/studios-slurm.
#   STUDIOS_SLURMCTLD_PORT / STUDIOS_SLURMD_PORT   TCP ports (default 6817 / 6818).
#   STUDIOS_SLURM_WAIT     seconds to wait for the node to be idle (default 60).
#
# Idempotent: if the daemons of DIR are already running and the node answers, it only prints
# the export line again. The last line on stdout is always `export SLURM_CONF=DIR/slurm.conf`.
# Stop with deploy/slurm/stop-local-slurm.sh DIR. Needs root (slurmd runs jobs as their user,
# munged and slurmd need root for that); install the packages with deploy/ci/system-packages.sh.
set -euo pipefail

die() { echo "start-local-slurm: error: $*" >&2; exit 1; }
note() { echo "start-local-slurm: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  die "must run as root (slurmd and munged start jobs as other users); rerun with sudo"
fi
for bin in slurmctld slurmd sinfo scontrol munged mungekey; do
  command -v "$bin" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin"
  command -v "$bin" >/dev/null 2>&1 \
    || die "'$bin' not found; install slurmctld slurmd slurm-client munge (deploy/ci/system-packages.sh)"
done

DIR="${1:-${STUDIOS_SLURM_DIR:-${TMPDIR:-/tmp}/studios-slurm}}"
CTLD_PORT="${STUDIOS_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${STUDIOS_SLURMD_PORT:-6818}"
WAIT="${STUDIOS_SLURM_WAIT:-60}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd -P)"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"

alive() {  # alive PIDFILE: the process in the pid file exists
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_state() {
  sinfo -h -N -n localhost -o '%T' 2>/dev/null | head -n1 || true
}

if alive "$DIR/munge/munged.pid" && alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid" \
   && [ -n "$(node_state)" ]; then
  note "already running in $DIR (node $(node_state))"
  echo "export SLURM_CONF=$CONF"
  exit 0
fi

# A half-started previous attempt: stop what is left before starting afresh.
for f in "$DIR/run/slurmd.pid" "$DIR/run/slurmctld.pid" "$DIR/munge/munged.pid"; do
  if alive "$f"; then kill "$(cat "$f")" 2>/dev/null || true; fi
done
sleep 0.2

port_busy() {  # port_busy PORT: something listens on 127.0.0.1:PORT or *:PORT
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
for p in "$CTLD_PORT" "$SLURMD_PORT"; do
  if port_busy "$p"; then
    die "port $p is in use (another SLURM?); stop it, or set STUDIOS_SLURMCTLD_PORT / STUDIOS_SLURMD_PORT"
  fi
done

# --- munge: own key (mode 600 in a 700 directory) and a separate socket directory (755) -------
mkdir -p "$DIR/munge" "$DIR/munge-socket" "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
chmod 700 "$DIR/munge"
chmod 755 "$DIR/munge-socket" "$DIR"
if [ ! -s "$DIR/munge/munge.key" ]; then
  mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null
fi
chmod 600 "$DIR/munge/munge.key"
SOCKET="$DIR/munge-socket/munge.socket"
rm -f "$SOCKET" "$SOCKET.lock"
munged --key-file="$DIR/munge/munge.key" --socket="$SOCKET" --pid-file="$DIR/munge/munged.pid" \
  --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" --force \
  || die "munged did not start; see $DIR/log/munged.log"

# --- slurm.conf: node line from `slurmd -C` (CPUs, sockets, cores, threads, RealMemory) -------
hw="$(slurmd -C | head -n1)" || die "slurmd -C failed"
hw="$(echo "$hw" | sed -E 's/^NodeName=[^ ]+ *//')"
echo "$hw" | grep -q 'RealMemory=' || die "slurmd -C printed no RealMemory: $hw"
cat > "$CONF" <<EOF
# Written by deploy/slurm/start-local-slurm.sh: a one-node SLURM on localhost.
ClusterName=studios
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
KillWait=5
MinJobAge=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=localhost NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

t0=$(date +%s)
# -c: start with a clean job state (this SLURM only ever holds test jobs).
slurmctld -c -f "$CONF" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
slurmd -f "$CONF" -N localhost || die "slurmd did not start; see $DIR/log/slurmd.log"

# --- wait until sinfo shows the node idle -----------------------------------------------------
state=""
while :; do
  state="$(node_state)"
  case "$state" in
    idle*) break ;;
    down*|drain*|drained*|fail*)
      scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true ;;
  esac
  if [ $(( $(date +%s) - t0 )) -ge "$WAIT" ]; then
    tail -n 5 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    die "node not idle after ${WAIT}s (state '${state:-no answer}'); see $DIR/log/"
  fi
  sleep 0.5
done
note "one-node SLURM up in $(( $(date +%s) - t0 ))s: node localhost $state ($hw), state in $DIR"
echo "export SLURM_CONF=$CONF"
