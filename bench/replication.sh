#!/usr/bin/env bash
# Cost of a synchronous copy: the same fio jobs against an LU with 2 copies
# (writer n1, copy n2, two lupool processes on loopback) and an LU with 1
# copy on the same writer, alternating A B A B, then the ratios; for file
# LUs and memory LUs (memory isolates the stream from the second disk
# write). It also measures one loopback TCP round trip between two Go
# processes (bench/cmd/looprtt), the yardstick of the qd1 latency target.
# Usage: bench/replication.sh [ROUNDS (default 3)] [RUNTIME_SECONDS (default 5)]
# With PIN=1 the writer n1 and fio run on CPU 0 and the copy n2 on CPU 1
# (taskset), as if the copy were on another machine: the copy's work no
# longer takes CPU from the writer and its client. Needs 2 CPUs or more.
# Needs bin/lupool (make build), go and fio. Stops only what it started.
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

# port: a free loopback port below the ephemeral range, which the kernel
# does not hand to the nodes' outgoing connections meanwhile.
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
pin1=() pin2=()
if [[ ${PIN:-0} == 1 ]]; then
	(( $(nproc) >= 2 )) || { echo "bench/replication.sh: PIN=1 needs 2 CPUs" >&2; exit 1; }
	pin1=(taskset -c 0) pin2=(taskset -c 1)
	echo "pinned: n1 and fio on CPU 0, n2 on CPU 1"
fi
# start ID DATA PIN [flags...]: runs a node in this shell (not a subshell, so
# its pid is recorded for cleanup) and sets NODE_NBD and NODE_API.
start() {
	local id=$1 data=$2 pin=$3; shift 3
	local pincmd=()
	[[ $pin == 1 ]] && pincmd=("${pin1[@]}")
	[[ $pin == 2 ]] && pincmd=("${pin2[@]}")
	NODE_NBD=127.0.0.1:$(port) NODE_API=127.0.0.1:$(port)
	local peer=127.0.0.1:$(port)
	"${pincmd[@]}" bin/lupool serve --node-id "$id" --data "$data" --nbd "$NODE_NBD" --api "$NODE_API" --peer "$peer" "$@" \
		>"$tmp/$id.log" 2>&1 &
	pids+=($!)
	for _ in $(seq 300); do
		curl -fs "http://$NODE_API/readyz" >/dev/null 2>&1 && break
		sleep 0.1
	done
	curl -fs "http://$NODE_API/readyz" >/dev/null || { echo "node $id did not start:"; cat "$tmp/$id.log"; exit 1; }
}

start n1 "$tmp/n1" 1
nbd1=$NODE_NBD api1=$NODE_API
pid1=${pids[0]}
start n2 "$tmp/n2" 2 --join "$api1"
pid2=${pids[1]}
for kind in file memory; do
	LUPOOL_API=$api1 bin/lupool lu create "$kind-1" --size 1G --copies 1 --kind "$kind" >/dev/null
	LUPOOL_API=$api1 bin/lupool lu create "$kind-2" --size 1G --copies 2 --kind "$kind" >/dev/null
done
LUPOOL_API=$api1 bin/lupool lu list

# Lay out the first 256 MiB of each so that the runs measure overwrites,
# not first allocation.
for lu in file-1 file-2 memory-1 memory-2; do
	fio --ioengine=nbd --uri="nbd://$nbd1/$lu" --name=fill --rw=write --bs=1M --size=256M \
		--iodepth=8 --output-format=terse >/dev/null
done

# One loopback TCP round trip between two Go processes (median of 2000
# 40-byte ping-pongs; bench/cmd/looprtt).
go build -o "$tmp/looprtt" ./bench/cmd/looprtt
rtt_us=$("$tmp/looprtt")
echo "loopback TCP round trip: $rtt_us us (median)"
# With guest halt polling off (0), every wake-up of an idle vCPU is a VM
# exit: tens of microseconds that a qd1 request pays once per process it
# crosses. The kernel's default is 200000.
hp=/sys/module/haltpoll/parameters/guest_halt_poll_ns
[[ -r $hp ]] && echo "guest_halt_poll_ns: $(cat "$hp")"

# cpu PID: user+system clock ticks the process has used.
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

job() { # lu iodepth -> "iops p50_us p99_us cpu_us_per_write(n1) (n2) (fio)"
	local a1 a2 b1 b2
	a1=$(cpu "$pid1") a2=$(cpu "$pid2")
	"${pin1[@]}" fio --ioengine=nbd --uri="nbd://$nbd1/$1" --name=b --rw=randwrite --bs=4k --size=256M \
		--iodepth="$2" --time_based --runtime="$runtime" --output-format=json \
		--output="$tmp/fio.json" >/dev/null
	b1=$(cpu "$pid1") b2=$(cpu "$pid2")
	python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
w = j["write"]; p = w["clat_ns"]["percentile"]
ops = max(w["total_ios"], 1)
hz, d1, d2 = float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
fio_cpu_s = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["elapsed"]
print("%.0f %.1f %.1f %.1f %.1f %.1f" % (w["iops"], p["50.000000"]/1e3, p["99.000000"]/1e3,
      d1 / hz / ops * 1e6, d2 / hz / ops * 1e6, fio_cpu_s / ops * 1e6))' "$tmp/fio.json" "$hz" $((b1 - a1)) $((b2 - a2))
}

declare -A res
for kind in file memory; do
	for qd in 32 1; do
		for r in $(seq "$rounds"); do
			for copies in 1 2; do
				out=$(job "$kind-$copies" "$qd")
				res[$kind,$copies,$qd]+="$out;"
				echo "round $r $kind qd$qd copies=$copies: iops p50_us p99_us cpu_us/write(n1 n2 fio) = $out"
			done
		done
	done
done

python3 - "$rtt_us" "${res[file,1,32]}" "${res[file,2,32]}" "${res[file,1,1]}" "${res[file,2,1]}" \
	"${res[memory,1,32]}" "${res[memory,2,32]}" "${res[memory,1,1]}" "${res[memory,2,1]}" <<'EOF'
import statistics, sys
rtt = float(sys.argv[1])
def parse(s): return [tuple(map(float, x.split())) for x in s.strip(";").split(";")]
rows = list(map(parse, sys.argv[2:]))
med = lambda r, i: statistics.median(x[i] for x in r)
print()
print("| LU kind | workload | 1 copy | 2 copies | 2 copies vs 1 | target |")
print("|---|---|---|---|---|---|")
for kind, (o32, t32, o1, t1) in (("file", rows[0:4]), ("memory", rows[4:8])):
    print("| %s | 4K randwrite qd32 IOPS | %.0f | %.0f | %.2fx | >= 0.7x |" % (kind, med(o32,0), med(t32,0), med(t32,0)/med(o32,0)))
    print("| %s | 4K randwrite qd1 p50 latency | %.1f us | %.1f us | +%.1f us | <= +%.1f us (RTT %.1f + 50) |" % (
        kind, med(o1,1), med(t1,1), med(t1,1)-med(o1,1), rtt+50, rtt))
    print("| %s | 4K randwrite qd1 p99 latency | %.1f us | %.1f us | +%.1f us | |" % (kind, med(o1,2), med(t1,2), med(t1,2)-med(o1,2)))
    cpu = lambda r: (med(r,3), med(r,4), med(r,5), med(r,3)+med(r,4)+med(r,5))
    print("| %s | CPU per write at qd32 (writer + copy + fio) | %.1f+%.1f+%.1f = %.1f us | %.1f+%.1f+%.1f = %.1f us | %.2fx | |" % ((kind,) + cpu(o32) + cpu(t32) + (cpu(t32)[3]/cpu(o32)[3],)))
print("(median of %d alternating rounds each; both nodes and fio share this machine's %s cores)" % (len(rows[0]), __import__("os").cpu_count()))
EOF
