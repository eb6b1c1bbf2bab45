#!/usr/bin/env bash
# Stops the webdis and nginx/nchan started by start.sh, using their PID files in run/.
# Idempotent: missing or stale PID files are fine. Only those PIDs are signalled.
set -euo pipefail

RUN="$(cd "$(dirname "$0")" && pwd)/run"

stop_pid() {  # name pidfile
  local name=$1 f=$2 pid
  [[ -s $f ]] || { echo "stop.sh: $name not running (no PID file)"; return 0; }
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"  # nginx master: fast shutdown of its workers too; webdis: exits
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    echo "stop.sh: stopped $name (pid $pid)"
  else
    echo "stop.sh: $name not running (stale pid $pid)"
  fi
  rm -f "$f"
}

stop_pid nginx "$RUN/nginx.pid"
stop_pid webdis "$RUN/webdis.pid"
