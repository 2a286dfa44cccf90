#!/usr/bin/env bash
# Stop everything deploy/up.sh started: each process group named by a PID
# file in PD_RUN_DIR, in reverse start order (prefiller, decoder, pd-proxy,
# lmcache, mooncake_master). SIGTERM, wait up to PD_STOP_TIMEOUT seconds,
# then SIGKILL. Idempotent: with nothing running it says so and exits 0.
# Logs stay in PD_RUN_DIR. Exits 1 only if a group survived SIGKILL.
#
#   deploy/down.sh
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=pd.env
. "$here/pd.env"

say() { echo "down.sh: $*"; }

if [ ! -d "$PD_RUN_DIR" ]; then
  say "nothing to stop ($PD_RUN_DIR does not exist)"
  exit 0
fi

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

# Reverse start order first, then any other PID file found there.
ordered=(prefiller decoder pd-proxy lmcache mooncake_master)
names=()
for name in "${ordered[@]}"; do
  [ -f "$PD_RUN_DIR/$name.pid" ] && names+=("$name")
done
for pidfile in "$PD_RUN_DIR"/*.pid; do
  [ -e "$pidfile" ] || continue
  name=$(basename "$pidfile" .pid)
  case " ${ordered[*]} " in *" $name "*) ;; *) names+=("$name") ;; esac
done
if [ ${#names[@]} -eq 0 ]; then
  say "nothing to stop (no PID files in $PD_RUN_DIR)"
  exit 0
fi

stop_group() { # name pgid
  local name=$1 pgid=$2 waited=0
  if ! group_alive "$pgid"; then
    say "$name (group $pgid) already stopped"
    return 0
  fi
  kill -TERM -- "-$pgid" 2>/dev/null || true
  while group_alive "$pgid" && [ "$waited" -lt "$((PD_STOP_TIMEOUT * 5))" ]; do
    sleep 0.2
    waited=$((waited + 1))
  done
  if group_alive "$pgid"; then
    say "$name (group $pgid) still running after ${PD_STOP_TIMEOUT}s: SIGKILL"
    kill -KILL -- "-$pgid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      group_alive "$pgid" || break
      sleep 0.1
    done
  fi
  if group_alive "$pgid"; then
    say "$name (group $pgid) survived SIGKILL" >&2
    return 1
  fi
  say "stopped $name (group $pgid)"
}

rc=0
for name in "${names[@]}"; do
  pidfile="$PD_RUN_DIR/$name.pid"
  pgid=$(cat "$pidfile" 2>/dev/null || true)
  if ! [[ "$pgid" =~ ^[0-9]+$ ]] || [ "$pgid" -le 1 ]; then
    say "ignoring $pidfile (no process id in it)"
    rm -f "$pidfile"
    continue
  fi
  if stop_group "$name" "$pgid"; then
    rm -f "$pidfile"
  else
    rc=1
  fi
done
exit "$rc"
