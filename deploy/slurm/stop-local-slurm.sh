#!/usr/bin/env bash
# Stop the one-node SLURM started by start-local-slurm.sh: cancel its jobs, stop slurmd,
# slurmctld and munged (by their pid files in DIR, never by name). Idempotent.
#
#   usage:  sudo deploy/slurm/stop-local-slurm.sh [DIR] [--purge]
#           DIR as for start-local-slurm.sh; --purge also deletes DIR.
set -euo pipefail

die() { echo "stop-local-slurm: error: $*" >&2; exit 1; }

purge=0
args=()
for a in "$@"; do
  case "$a" in
    --purge) purge=1 ;;
    *) args+=("$a") ;;
  esac
done
DIR="${args[0]:-${STUDIOS_SLURM_DIR:-${TMPDIR:-/tmp}/studios-slurm}}"
if [ ! -d "$DIR" ]; then
  echo "stop-local-slurm: nothing to stop ($DIR does not exist)" >&2
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  die "must run as root (the daemons run as root); rerun with sudo"
fi
DIR="$(cd "$DIR" && pwd -P)"
export SLURM_CONF="$DIR/slurm.conf"
PATH="$PATH:/usr/sbin:/sbin"

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$DIR/run/slurmctld.pid" && [ -f "$SLURM_CONF" ]; then
  # Cancel every job of this (private) SLURM so no worker outlives it.
  jobs="$(squeue -h -o '%i' 2>/dev/null || true)"
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 20); do
      [ -z "$(squeue -h -o '%i' 2>/dev/null || true)" ] && break
      sleep 0.5
    done
  fi
fi

stop() {  # stop PIDFILE...: SIGTERM to all, wait up to 10 s, then SIGKILL what is left
  local f pids=()
  for f in "$@"; do
    if alive "$f"; then
      pids+=("$(cat "$f")")
      kill "$(cat "$f")" 2>/dev/null || true
    fi
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 40); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  rm -f "$@"
}
# slurmd and slurmctld together (each takes a few seconds to shut down), munged last.
stop "$DIR/run/slurmd.pid" "$DIR/run/slurmctld.pid"
stop "$DIR/munge/munged.pid"
echo "stop-local-slurm: stopped the one-node SLURM in $DIR" >&2
if [ "$purge" -eq 1 ]; then
  rm -rf "$DIR"
fi
