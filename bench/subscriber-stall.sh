#!/usr/bin/env bash
# 4 KiB random writes with and without a registered caller that stopped
# reading (issue 14: a dead subscriber never slows the data path), side by
# side, alternating. LU changes churn the event log in both runs, so the
# primary has events to push at the stuck caller the whole time.
#
#   bench/subscriber-stall.sh [BIN] [ROUNDS] [SECONDS]
set -euo pipefail
bin=${1:-bin/lupool}
rounds=${2:-2}
secs=${3:-10}
work=$(mktemp -d)
api=127.0.0.1:23810 nbd=127.0.0.1:23809 peer=127.0.0.1:23811 stuck=23999
"$bin" serve --data "$work/d" --api $api --nbd $nbd --peer $peer >"$work/serve.log" 2>&1 &
serve=$!
python3 -c "
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', $stuck)); s.listen(16)
conns = []
while True:
    c, _ = s.accept(); c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096); conns.append(c)  # never read
" &
stuckpid=$!
cleanup() { kill "$churnpid" 2>/dev/null || true; kill "$stuckpid" "$serve" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
churnpid=
trap cleanup EXIT
export LUPOOL_API=$api LUPOOL_TOKEN_FILE=$work/d/admin.token
for _ in $(seq 100); do "$bin" lu create w --size 1G >/dev/null 2>&1 && break; sleep 0.2; done
fio --name=prefill --ioengine=nbd --uri=nbd://$nbd/w --rw=write --bs=1M --size=256M --output=/dev/null
(i=0; while true; do "$bin" lu create "c$i" --size 1M >/dev/null 2>&1; "$bin" lu delete "c$i" >/dev/null 2>&1; i=$((i+1)); done) &
churnpid=$!
run() {
  fio --name="$1" --ioengine=nbd --uri=nbd://$nbd/w --rw=randwrite --bs=4k --iodepth=32 --size=256M \
    --time_based --runtime="$secs" --output-format=json 2>&1 | python3 -c '
import json, sys; t = sys.stdin.read(); j = json.loads(t[t.index("{"):])["jobs"][0]["write"]
print("%-22s %9.0f IOPS  p99 %7.0f us" % (sys.argv[1], j["iops"], j["clat_ns"]["percentile"]["99.000000"] / 1000))' "$1"
}
for r in $(seq "$rounds"); do
  run "no-subscriber-$r"
  "$bin" events subscribe --id stuck --to tcp://127.0.0.1:$stuck >/dev/null
  sleep 1
  run "stuck-subscriber-$r"
  "$bin" events subscribers | sed -n '2p' | awk '{print "  subscriber:", $0}'
  "$bin" events unsubscribe stuck >/dev/null
done
echo "events in the log: $("$bin" events watch --tail 1 --follow=false -o json | python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["seq"])')"
