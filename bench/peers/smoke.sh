#!/usr/bin/env bash
# Usage: smoke.sh REDIS_PORT WEBDIS_PORT NCHAN_PORT   (after start.sh with the same ports)
# End-to-end check of the peers: XADD through webdis lands in the Redis stream; a message published
# to nchan reaches an SSE subscriber and is stored in Redis. Writes only keys named smoke*.
set -euo pipefail
(($# == 3)) || { echo "usage: $0 REDIS_PORT WEBDIS_PORT NCHAN_PORT" >&2; exit 1; }
R=$1 W=http://127.0.0.1:$2 N=http://127.0.0.1:$3
fail() { echo "smoke.sh: FAIL: $*" >&2; exit 1; }

# webdis: PUT /XADD/<stream>/*/data with the JSON payload as the body (stored byte for byte).
payload='{"order": 42, "total": 12.50, "path": "a/b.c"}'
before=$(redis-cli -p "$R" XLEN smoke:webdis)
for _ in 1 2 3; do
  out=$(curl -fsS -X PUT --data-binary "$payload" "$W/XADD/smoke:webdis/*/data")
  [[ $out =~ ^\{\"XADD\":\"[0-9]+-[0-9]+\"\}$ ]] || fail "webdis XADD answered: $out"
done
after=$(redis-cli -p "$R" XLEN smoke:webdis)
((after == before + 3)) || fail "XLEN smoke:webdis went $before -> $after, expected +3"
[[ $(redis-cli -p "$R" XREVRANGE smoke:webdis + - COUNT 1 | tail -n 1) == "$payload" ]] \
  || fail "stored payload differs"
echo "smoke.sh: webdis XADD ok (XLEN smoke:webdis $before -> $after)"

# nchan: SSE subscriber first, then publish, then read what it got.
sse=$(mktemp); trap 'rm -f "$sse"' EXIT
curl -sN -m 3 -H 'Accept: text/event-stream' "$N/sub/smoke" > "$sse" 2>/dev/null &
sub=$!
sleep 0.5
code=$(curl -sS -o /dev/null -w '%{http_code}' -X POST --data-binary "$payload" "$N/pub/smoke")
[[ $code == 201 ]] || fail "nchan publish answered $code (201 expected with a subscriber present)"
wait "$sub" || true   # curl -m ends the stream
grep -qxF "data: $payload" "$sse" || fail "SSE subscriber did not receive the message: $(cat "$sse")"
grep -q '^id: ' "$sse" || fail "no id: line in the SSE stream"
echo "smoke.sh: nchan publish -> SSE ok ($(grep '^id: ' "$sse" | tail -n 1))"
[[ -n $(redis-cli -p "$R" --scan --pattern '{channel:/smoke}*') ]] || fail "no nchan keys in Redis"
echo "smoke.sh: nchan keys in Redis ok: $(redis-cli -p "$R" --scan --pattern '{channel:/smoke}*' | tr '\n' ' ')"
echo "smoke.sh: all ok"
