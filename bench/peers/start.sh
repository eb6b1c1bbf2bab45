#!/usr/bin/env bash
# Usage: start.sh REDIS_PORT WEBDIS_PORT NCHAN_PORT
# Starts the benchmark peers against the Redis at 127.0.0.1:REDIS_PORT (which must be running):
#   webdis        on 127.0.0.1:WEBDIS_PORT  (config from webdis.json.template)
#   nginx + nchan on 127.0.0.1:NCHAN_PORT   (config from nchan.conf.template, Redis storage)
# Both daemonize; configs, PID files and logs go to bench/peers/run/. Stop with stop.sh.
# Tunables (env): WEBDIS_THREADS (2), WEBDIS_POOL_SIZE (20), NCHAN_WORKERS (auto), WAIT_SECS (15).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
RUN="$HERE/run"

die() { echo "start.sh: $*" >&2; exit 1; }
(($# == 3)) || die "usage: $0 REDIS_PORT WEBDIS_PORT NCHAN_PORT"
REDIS_PORT=$1 WEBDIS_PORT=$2 NCHAN_PORT=$3
for p in "$REDIS_PORT" "$WEBDIS_PORT" "$NCHAN_PORT"; do
  [[ $p =~ ^[0-9]+$ ]] && ((p > 0 && p < 65536)) || die "not a port number: $p"
done
[[ $REDIS_PORT != 6379 ]] || echo "start.sh: warning: using the Redis on 6379" >&2

# webdis: 2 HTTP threads = one per core (its built-in default is 4, Debian's sample config 2);
# 20 Redis connections per thread as in upstream's sample webdis.json (built-in default 2), so
# 50 keep-alive clients never queue behind a couple of Redis sockets.
WEBDIS_THREADS=${WEBDIS_THREADS:-2}
WEBDIS_POOL_SIZE=${WEBDIS_POOL_SIZE:-20}
# nginx: one worker per core (see nchan.conf.template).
NCHAN_WORKERS=${NCHAN_WORKERS:-auto}
NCHAN_MODULE=/usr/lib/nginx/modules/ngx_nchan_module.so
WAIT_SECS=${WAIT_SECS:-15}

command -v webdis >/dev/null && command -v nginx >/dev/null && [[ -f $NCHAN_MODULE ]] \
  || die "webdis/nginx/nchan missing: run $HERE/install.sh"

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
if alive "$RUN/webdis.pid" || alive "$RUN/nginx.pid"; then die "already running: run $HERE/stop.sh first"; fi
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
listening "$REDIS_PORT" || die "no Redis listening on 127.0.0.1:$REDIS_PORT"
for p in "$WEBDIS_PORT" "$NCHAN_PORT"; do
  if listening "$p"; then die "port 127.0.0.1:$p is already in use"; fi
done

# Fresh run directory with the generated configs.
rm -rf "$RUN" && mkdir -p "$RUN/nginx"
fill() {
  sed -e "s|@REDIS_PORT@|$REDIS_PORT|g" -e "s|@WEBDIS_PORT@|$WEBDIS_PORT|g" \
      -e "s|@NCHAN_PORT@|$NCHAN_PORT|g" -e "s|@RUN_DIR@|$RUN|g" \
      -e "s|@WEBDIS_THREADS@|$WEBDIS_THREADS|g" -e "s|@WEBDIS_POOL_SIZE@|$WEBDIS_POOL_SIZE|g" \
      -e "s|@NCHAN_WORKERS@|$NCHAN_WORKERS|g" -e "s|@NCHAN_MODULE@|$NCHAN_MODULE|g" "$1" > "$2"
}
fill "$HERE/webdis.json.template" "$RUN/webdis.json"
fill "$HERE/nchan.conf.template" "$RUN/nchan.conf"

fail() {
  echo "start.sh: $*" >&2
  for f in "$RUN/webdis.log" "$RUN/nginx-error.log"; do
    [[ -s $f ]] && { echo "--- tail $f" >&2; tail -n 20 "$f" >&2; }
  done
  "$HERE/stop.sh" >&2 || true
  exit 1
}

# webdis daemonizes itself and writes run/webdis.pid.
webdis "$RUN/webdis.json" || fail "webdis failed to start"
# nginx: -p prefix (temp dirs) and -c conf under run/, -e so nothing is opened in /var/log/nginx.
NGX=(nginx -p "$RUN/nginx/" -c "$RUN/nchan.conf" -e "$RUN/nginx-error.log")
"${NGX[@]}" -t -q || fail "nginx config test failed"
"${NGX[@]}" || fail "nginx failed to start"

# Wait until both answer: webdis relays PING to Redis; nchan's status page reports its Redis link.
deadline=$((SECONDS + WAIT_SECS)) w_ok= n_ok=
while ((SECONDS < deadline)); do
  [[ -n $w_ok ]] || { curl -fsS -m 2 "http://127.0.0.1:$WEBDIS_PORT/PING" 2>/dev/null | grep -q PONG && w_ok=1; } || true
  [[ -n $n_ok ]] || { curl -fsS -m 2 "http://127.0.0.1:$NCHAN_PORT/nchan_status" 2>/dev/null \
    | grep -Eq '^redis connected servers: [1-9]' && n_ok=1; } || true
  [[ -n $w_ok && -n $n_ok ]] && break
  sleep 0.2
done
[[ -n $w_ok ]] || fail "webdis did not answer GET http://127.0.0.1:$WEBDIS_PORT/PING within ${WAIT_SECS}s"
[[ -n $n_ok ]] || fail "nchan not ready on http://127.0.0.1:$NCHAN_PORT/nchan_status (Redis link) within ${WAIT_SECS}s"

echo "start.sh: webdis http://127.0.0.1:$WEBDIS_PORT (pid $(cat "$RUN/webdis.pid"), threads $WEBDIS_THREADS, pool $WEBDIS_POOL_SIZE)"
echo "start.sh: nchan  http://127.0.0.1:$NCHAN_PORT (pid $(cat "$RUN/nginx.pid"), workers $NCHAN_WORKERS)"
echo "start.sh: both use Redis 127.0.0.1:$REDIS_PORT; stop with $HERE/stop.sh"
