#!/usr/bin/env bash
# Cost of a synchronous copy: the same fio jobs against an LU with 2 copies
# (writer n1, copy n2, two lupool processes on loopback) and an LU with 1
# copy on the same writer, alternating A B A B, then the ratios.
# Usage: bench/replication.sh [ROUNDS (default 3)] [RUNTIME_SECONDS (default 5)]
# Needs bin/lupool (make build) and fio. Stops only what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
runtime=${2:-5}
command -v fio >/dev/null || { echo "bench/replication.sh: fio missing; run ./scripts/install-test-deps.sh" >&2; exit 1; }
[[ -x bin/lupool ]] || { echo "bench/replication.sh: no bin/lupool; run make build" >&2; exit 1; }

tmp=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$tmp"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
start() { # id data extra...
	local id=$1 data=$2; shift 2
	local nbd api peer
	nbd=127.0.0.1:$(port) api=127.0.0.1:$(port) peer=127.0.0.1:$(port)
	bin/lupool serve --node-id "$id" --data "$data" --nbd "$nbd" --api "$api" --peer "$peer" "$@" \
		>"$tmp/$id.log" 2>&1 &
	pids+=($!)
	for _ in $(seq 300); do
		curl -fs "http://$api/readyz" >/dev/null 2>&1 && break
		sleep 0.1
	done
	curl -fs "http://$api/readyz" >/dev/null || { echo "node $id did not start:"; cat "$tmp/$id.log"; exit 1; }
	echo "$nbd $api"
}

read -r nbd1 api1 < <(start n1 "$tmp/n1")
read -r _ _ < <(start n2 "$tmp/n2" --join "$api1")
LUPOOL_API=$api1 bin/lupool lu create one --size 1G --copies 1 >/dev/null
LUPOOL_API=$api1 bin/lupool lu create two --size 1G --copies 2 >/dev/null
LUPOOL_API=$api1 bin/lupool lu show two

# Lay out the first 256 MiB of both so that the runs measure overwrites,
# not first allocation.
for lu in one two; do
	fio --ioengine=nbd --uri="nbd://$nbd1/$lu" --name=fill --rw=write --bs=1M --size=256M \
		--iodepth=8 --output-format=terse >/dev/null
done

job() { # lu name iodepth -> "iops p50_us p99_us"
	fio --ioengine=nbd --uri="nbd://$nbd1/$1" --name=b --rw=randwrite --bs=4k --size=256M \
		--iodepth="$2" --time_based --runtime="$runtime" --ramp_time=1 --output-format=json \
		--output="$tmp/fio.json" >/dev/null
	python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]["write"]; p=j["clat_ns"]["percentile"]; print("%.0f %.1f %.1f" % (j["iops"], p["50.000000"]/1e3, p["99.000000"]/1e3))' "$tmp/fio.json"
}

declare -A res
for qd in 32 1; do
	for r in $(seq "$rounds"); do
		for lu in one two; do
			out=$(job "$lu" "$qd")
			res[$lu,$qd]+="$out;"
			echo "round $r qd$qd $lu copies: iops p50_us p99_us = $out"
		done
	done
done

python3 - "${res[one,32]}" "${res[two,32]}" "${res[one,1]}" "${res[two,1]}" <<'EOF'
import statistics, sys
def parse(s): return [tuple(map(float, x.split())) for x in s.strip(";").split(";")]
one32, two32, one1, two1 = map(parse, sys.argv[1:])
med = lambda rows, i: statistics.median(r[i] for r in rows)
print()
print("| workload | 1 copy | 2 copies | ratio (2/1) |")
print("|---|---|---|---|")
print("| 4K randwrite qd32 IOPS | %.0f | %.0f | %.2f |" % (med(one32,0), med(two32,0), med(two32,0)/med(one32,0)))
print("| 4K randwrite qd1 IOPS | %.0f | %.0f | %.2f |" % (med(one1,0), med(two1,0), med(two1,0)/med(one1,0)))
print("| 4K randwrite qd1 p50 latency us | %.1f | %.1f | +%.1f us |" % (med(one1,1), med(two1,1), med(two1,1)-med(one1,1)))
print("| 4K randwrite qd1 p99 latency us | %.1f | %.1f | +%.1f us |" % (med(one1,2), med(two1,2), med(two1,2)-med(one1,2)))
print("(median of %d alternating rounds each)" % len(one32))
EOF
