#!/usr/bin/env bash
# The paging profile (issue 13): 4 KiB random page traffic, the mix of a
# swapping guest (page-outs and page-ins, 50/50), at qd1 (paging-qd1) and
# qd32 (paging-qd32), against three targets side by side, alternating
# A B C A B C:
#   paging-2  a 2-copy memory paging LU (lupool paging request; writer n1,
#             copy n2, two lupool processes on loopback)
#   memory-1  a 1-copy memory LU on the same writer n1
#   nbdkit    nbdkit memory (one process, no copy)
# and prints IOPS, latency (p50/p99 of writes) and CPU per I/O of each
# process, then the ratios. Targets of issue 13: paging-2 >= 0.6x memory-1
# at qd32; paging-2 p99 at qd1 <= 2x memory-1.
# Usage: bench/paging.sh [ROUNDS (default 3)] [RUNTIME_SECONDS (default 5)]
# Needs bin/lupool (make build), fio and nbdkit. Stops only what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
runtime=${2:-5}
for tool in fio nbdkit curl python3; do
	command -v "$tool" >/dev/null || { echo "bench/paging.sh: $tool missing; run ./scripts/install-test-deps.sh" >&2; exit 1; }
done
[[ -x bin/lupool ]] || { echo "bench/paging.sh: no bin/lupool; run make build" >&2; exit 1; }

tmp=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$tmp"
}
trap cleanup EXIT
cp bin/lupool "$tmp/lupool"
bin=$tmp/lupool

# port: a free loopback port below the ephemeral range.
port() {
	python3 -c '
import random, socket
while True:
    p = random.randint(20000, 32000)
    try:
        socket.socket().bind(("127.0.0.1", p))
        print(p)
        break
    except OSError:
        pass'
}
# start ID [JOIN_API]: runs a node and sets NODE_NBD, NODE_API, NODE_PID.
start() {
	local id=$1 join=${2:-} flags=()
	if [[ -n $join ]]; then
		flags=(--join "$join" --join-token "$(cli "$join" cluster join-token)")
	fi
	NODE_NBD=127.0.0.1:$(port) NODE_API=127.0.0.1:$(port)
	"$bin" serve --node-id "$id" --data "$tmp/$id" --nbd "$NODE_NBD" --api "$NODE_API" --peer "127.0.0.1:$(port)" \
		"${flags[@]}" >"$tmp/$id.log" 2>&1 &
	NODE_PID=$!
	pids+=("$NODE_PID")
	for _ in $(seq 300); do
		curl -fs "http://$NODE_API/readyz" >/dev/null 2>&1 && break
		sleep 0.1
	done
	curl -fs "http://$NODE_API/readyz" >/dev/null || { echo "node $id did not start:"; cat "$tmp/$id.log"; exit 1; }
}
cli() {
	local api=$1
	shift
	LUPOOL_API=$api LUPOOL_TOKEN_FILE=$tmp/n1/admin.token "$bin" "$@"
}

start n1
nbd1=$NODE_NBD api1=$NODE_API pid1=$NODE_PID
start n2 "$api1"
pid2=$NODE_PID
cli "$api1" paging request bench --size 1G --host n1 >/dev/null
cli "$api1" lu create memory-1 --size 1G --kind memory >/dev/null
cli "$api1" paging list
kport=$(port)
nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$kport" memory 1G &
pidk=$!
pids+=("$pidk")
for _ in $(seq 100); do nbdinfo --size "nbd://127.0.0.1:$kport" >/dev/null 2>&1 && break; sleep 0.1; done
echo "swap safety of n1: $(grep -o 'memory_locked=[a-z]* io_flusher=[a-z]*' "$tmp/n1.log" | head -1)"

declare -A uri=([paging-2]="nbd://$nbd1/paging-bench" [memory-1]="nbd://$nbd1/memory-1" [nbdkit]="nbd://127.0.0.1:$kport")
# Lay out the first 256 MiB of each: the runs measure page traffic on
# swap that is in use, not first allocation.
for t in paging-2 memory-1 nbdkit; do
	fio --ioengine=nbd --uri="${uri[$t]}" --name=fill --rw=write --bs=1M --size=256M --iodepth=8 --output-format=terse >/dev/null
done

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

# job TARGET IODEPTH -> "iops p50_write_us p99_write_us cpu_us_per_io(first second fio)"
# first/second: n1 and n2 for the lupool targets, nbdkit and nothing for nbdkit.
job() {
	local t=$1 qd=$2 p1=$pid1 p2=$pid2 a1 a2 b1 b2
	[[ $t == nbdkit ]] && p1=$pidk p2=$pidk
	a1=$(cpu "$p1") a2=$(cpu "$p2")
	fio --ioengine=nbd --uri="${uri[$t]}" --name=paging --rw=randrw --rwmixread=50 --bs=4k --size=256M \
		--iodepth="$qd" --time_based --runtime="$runtime" --output-format=json --output="$tmp/fio.json" >/dev/null
	b1=$(cpu "$p1") b2=$(cpu "$p2")
	[[ $t == nbdkit ]] && b2=$a2
	python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
r, w = j["read"], j["write"]; p = w["clat_ns"]["percentile"]
ops = max(r["total_ios"] + w["total_ios"], 1)
hz, d1, d2 = float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
fio_cpu_s = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["elapsed"]
print("%.0f %.1f %.1f %.1f %.1f %.1f" % (r["iops"] + w["iops"], p["50.000000"]/1e3, p["99.000000"]/1e3,
      d1 / hz / ops * 1e6, d2 / hz / ops * 1e6, fio_cpu_s / ops * 1e6))' "$tmp/fio.json" "$hz" $((b1 - a1)) $((b2 - a2))
}

declare -A res
echo "load before: $(uptime)"
for qd in 32 1; do
	for r in $(seq "$rounds"); do
		for t in paging-2 memory-1 nbdkit; do
			out=$(job "$t" "$qd")
			res[$t,$qd]+="$out;"
			echo "round $r paging-qd$qd $t: iops p50_w_us p99_w_us cpu_us/io(server copy fio) = $out"
		done
	done
done
echo "load after: $(uptime)"

python3 - "${res[paging-2,32]}" "${res[memory-1,32]}" "${res[nbdkit,32]}" "${res[paging-2,1]}" "${res[memory-1,1]}" "${res[nbdkit,1]}" <<'EOF'
import os, statistics, sys
def parse(s): return [tuple(map(float, x.split())) for x in s.strip(";").split(";")]
p32, m32, k32, p1, m1, k1 = map(parse, sys.argv[1:])
med = lambda r, i: statistics.median(x[i] for x in r)
cpu = lambda r: "%.1f+%.1f+%.1f = %.1f us" % (med(r, 3), med(r, 4), med(r, 5), med(r, 3) + med(r, 4) + med(r, 5))
print()
print("| workload | paging-2 (2-copy memory paging LU) | memory-1 (1-copy memory LU) | nbdkit memory | paging-2 / memory-1 | paging-2 / nbdkit | target |")
print("|---|---|---|---|---|---|---|")
for name, (p, m, k) in (("paging-qd32", (p32, m32, k32)), ("paging-qd1", (p1, m1, k1))):
    target = ">= 0.6x" if name == "paging-qd32" else ""
    print("| %s IOPS (4K randrw 50/50) | %.0f | %.0f | %.0f | %.2fx | %.2fx | %s |" % (name, med(p, 0), med(m, 0), med(k, 0),
          med(p, 0) / med(m, 0), med(p, 0) / med(k, 0), target))
    print("| %s write p50 | %.1f us | %.1f us | %.1f us | %.2fx | %.2fx | |" % (name, med(p, 1), med(m, 1), med(k, 1),
          med(p, 1) / med(m, 1), med(p, 1) / med(k, 1)))
    print("| %s write p99 | %.1f us | %.1f us | %.1f us | %.2fx | %.2fx | %s |" % (name, med(p, 2), med(m, 2), med(k, 2),
          med(p, 2) / med(m, 2), med(p, 2) / med(k, 2), "<= 2x" if name == "paging-qd1" else ""))
    print("| %s CPU per I/O (server + copy + fio) | %s | %s | %s | | | |" % (name, cpu(p), cpu(m), cpu(k)))
print("(median of %d alternating rounds each; the nodes, nbdkit and fio share this machine's %s cores)" % (len(p32), os.cpu_count()))
EOF
