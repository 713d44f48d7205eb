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
# With BASELINE=/path/to/old/lupool it also starts a second pair of nodes
# (n1b writer, n2b copy) with that binary and, instead of the 1-copy/2-copy
# comparison, alternates the same 2-copy LUs between the current build and
# the baseline (A B A B) and prints the IOPS ratio current/baseline; the
# target of issue 10 (mutual TLS on the replication path) is >= 0.85. A
# baseline that knows no --join-token (before issue 10) runs without tokens.
# Needs bin/lupool (make build), go and fio. Stops only what it started.
# bin/lupool and the baseline are copied first, so a rebuild during the run
# does not change what is measured.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
runtime=${2:-5}
command -v fio >/dev/null || { echo "bench/replication.sh: fio missing; run ./scripts/install-test-deps.sh" >&2; exit 1; }
[[ -x bin/lupool ]] || { echo "bench/replication.sh: no bin/lupool; run make build" >&2; exit 1; }
baseline=${BASELINE:-}
[[ -z $baseline || -x $baseline ]] || { echo "bench/replication.sh: BASELINE=$baseline is not an executable lupool" >&2; exit 1; }

tmp=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$tmp"
}
trap cleanup EXIT
cp bin/lupool "$tmp/lupool-current"
cur=$tmp/lupool-current
if [[ -n $baseline ]]; then
	cp "$baseline" "$tmp/lupool-baseline"
	baseline=$tmp/lupool-baseline
fi
# tokens BIN: true when BIN has join tokens and an admin token (issue 10).
# (No grep -q in a pipe: under pipefail its early exit fails the pipe.)
tokens() { [[ $("$1" serve -h 2>&1) == *join-token* ]]; }

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
# start BIN ID DATA PIN [JOIN_API]: runs a node in this shell (not a
# subshell, so its pid is recorded for cleanup) and sets NODE_NBD, NODE_API
# and NODE_PID. With JOIN_API it joins that node's cluster; a BIN with
# tokens then gets a join token from that node, whose DATA is $JOIN_DATA.
# $LUPOOL_SERVE_FLAGS (e.g. --debug-pprof=true) go to every node.
start() {
	local bin=$1 id=$2 data=$3 pin=$4 join=${5:-}
	local pincmd=() flags=()
	[[ $pin == 1 ]] && pincmd=("${pin1[@]}")
	[[ $pin == 2 ]] && pincmd=("${pin2[@]}")
	if [[ -n $join ]]; then
		flags=(--join "$join")
		if tokens "$bin"; then
			local jt
			jt=$(cli "$bin" "$join" "$JOIN_DATA" cluster join-token 2>"$tmp/$id.join-token.err") ||
				{ echo "bench/replication.sh: no join token from $join for $id:" >&2; cat "$tmp/$id.join-token.err" >&2; exit 1; }
			flags+=(--join-token "$jt")
		fi
	fi
	NODE_NBD=127.0.0.1:$(port) NODE_API=127.0.0.1:$(port)
	local peer=127.0.0.1:$(port)
	# shellcheck disable=SC2086 # LUPOOL_SERVE_FLAGS is a list of flags
	"${pincmd[@]}" "$bin" serve --node-id "$id" --data "$data" --nbd "$NODE_NBD" --api "$NODE_API" --peer "$peer" \
		"${flags[@]}" ${LUPOOL_SERVE_FLAGS:-} >"$tmp/$id.log" 2>&1 &
	NODE_PID=$!
	pids+=("$NODE_PID")
	for _ in $(seq 300); do
		curl -fs "http://$NODE_API/readyz" >/dev/null 2>&1 && break
		sleep 0.1
	done
	curl -fs "http://$NODE_API/readyz" >/dev/null || { echo "node $id did not start:"; cat "$tmp/$id.log"; exit 1; }
}
# cli BIN API DATA args...: a client command against API; a BIN with tokens
# uses the admin token that the cluster's first node wrote to DATA.
cli() {
	local bin=$1 api=$2 data=$3
	shift 3
	if tokens "$bin"; then
		LUPOOL_API=$api LUPOOL_TOKEN_FILE=$data/admin.token "$bin" "$@"
	else
		LUPOOL_API=$api "$bin" "$@"
	fi
}

start "$cur" n1 "$tmp/n1" 1
nbd1=$NODE_NBD api1=$NODE_API pid1=$NODE_PID
JOIN_DATA=$tmp/n1 start "$cur" n2 "$tmp/n2" 2 "$api1"
pid2=$NODE_PID
luset=(file-1 file-2 memory-1 memory-2)
[[ -n $baseline ]] && luset=(file-2 memory-2)
for lu in "${luset[@]}"; do
	cli "$cur" "$api1" "$tmp/n1" lu create "$lu" --size 1G --copies "${lu##*-}" --kind "${lu%-*}" >/dev/null
done
cli "$cur" "$api1" "$tmp/n1" lu list
if [[ -n $baseline ]]; then
	start "$baseline" n1b "$tmp/n1b" 1
	nbd1b=$NODE_NBD api1b=$NODE_API pid1b=$NODE_PID
	JOIN_DATA=$tmp/n1b start "$baseline" n2b "$tmp/n2b" 2 "$api1b"
	pid2b=$NODE_PID
	for lu in "${luset[@]}"; do
		cli "$baseline" "$api1b" "$tmp/n1b" lu create "$lu" --size 1G --copies 2 --kind "${lu%-*}" >/dev/null
	done
	echo "baseline $BASELINE (tokens: $(tokens "$baseline" && echo yes || echo no)), nodes n1b n2b:"
	cli "$baseline" "$api1b" "$tmp/n1b" lu list
fi
echo "current: $PWD/bin/lupool (tokens: $(tokens "$cur" && echo yes || echo no)), nodes n1 n2"

# Lay out the first 256 MiB of each so that the runs measure overwrites,
# not first allocation.
for lu in "${luset[@]}"; do
	for nbd in "$nbd1" ${baseline:+"$nbd1b"}; do
		fio --ioengine=nbd --uri="nbd://$nbd/$lu" --name=fill --rw=write --bs=1M --size=256M \
			--iodepth=8 --output-format=terse >/dev/null
	done
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

# job LU IODEPTH [NBD WRITER_PID COPY_PID (default: n1's, n1, n2)]
#   -> "iops p50_us p99_us cpu_us_per_write(writer) (copy) (fio)"
job() {
	local a1 a2 b1 b2 nbd=${3:-$nbd1} p1=${4:-$pid1} p2=${5:-$pid2}
	a1=$(cpu "$p1") a2=$(cpu "$p2")
	"${pin1[@]}" fio --ioengine=nbd --uri="nbd://$nbd/$1" --name=b --rw=randwrite --bs=4k --size=256M \
		--iodepth="$2" --time_based --runtime="$runtime" --output-format=json \
		--output="$tmp/fio.json" >/dev/null
	b1=$(cpu "$p1") b2=$(cpu "$p2")
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
if [[ -n $baseline ]]; then
	echo "load before: $(uptime)"
	for kind in file memory; do
		for qd in 32 1; do
			for r in $(seq "$rounds"); do
				for build in current baseline; do
					if [[ $build == current ]]; then
						out=$(job "$kind-2" "$qd")
					else
						out=$(job "$kind-2" "$qd" "$nbd1b" "$pid1b" "$pid2b")
					fi
					res[$kind,$build,$qd]+="$out;"
					echo "round $r $kind qd$qd 2 copies $build: iops p50_us p99_us cpu_us/write(writer copy fio) = $out"
				done
			done
		done
	done
	echo "load after: $(uptime)"
	python3 - "${res[file,current,32]}" "${res[file,baseline,32]}" "${res[file,current,1]}" "${res[file,baseline,1]}" \
		"${res[memory,current,32]}" "${res[memory,baseline,32]}" "${res[memory,current,1]}" "${res[memory,baseline,1]}" <<'EOF'
import os, statistics, sys
def parse(s): return [tuple(map(float, x.split())) for x in s.strip(";").split(";")]
rows = list(map(parse, sys.argv[1:]))
med = lambda r, i: statistics.median(x[i] for x in r)
span = lambda r, i, f: (f + "-" + f) % (min(x[i] for x in r), max(x[i] for x in r))
print()
# paired: each round's current run against the baseline run right after
# it, so that load from other processes that changes between rounds cancels.
paired = lambda c, b, i: sorted(x[i] / y[i] for x, y in zip(c, b))
pspan = lambda p: "%.2f-%.2f" % (p[0], p[-1])
print("| LU kind (2 copies) | workload | current (mutual TLS) | baseline | current / baseline | per-round ratio | target |")
print("|---|---|---|---|---|---|---|")
for kind, (c32, b32, c1, b1) in (("file", rows[0:4]), ("memory", rows[4:8])):
    ratio = med(c32, 0) / med(b32, 0)
    p = paired(c32, b32, 0)
    print("| %s | 4K randwrite qd32 IOPS | %.0f (%s) | %.0f (%s) | %.2f | %.2f (%s) | >= 0.85: %s |" % (
        kind, med(c32, 0), span(c32, 0, "%.0f"), med(b32, 0), span(b32, 0, "%.0f"), ratio,
        statistics.median(p), pspan(p), "met" if ratio >= 0.85 else "MISSED"))
    p = paired(c1, b1, 0)
    print("| %s | 4K randwrite qd1 IOPS | %.0f (%s) | %.0f (%s) | %.2f | %.2f (%s) | |" % (
        kind, med(c1, 0), span(c1, 0, "%.0f"), med(b1, 0), span(b1, 0, "%.0f"), med(c1, 0) / med(b1, 0),
        statistics.median(p), pspan(p)))
    print("| %s | 4K randwrite qd1 p50 latency | %.1f us (%s) | %.1f us (%s) | %+.1f us | | |" % (
        kind, med(c1, 1), span(c1, 1, "%.1f"), med(b1, 1), span(b1, 1, "%.1f"), med(c1, 1) - med(b1, 1)))
    cpu = lambda r: (med(r, 3), med(r, 4), med(r, 5), med(r, 3) + med(r, 4) + med(r, 5))
    pc = sorted((x[3] + x[4]) / (y[3] + y[4]) for x, y in zip(c32, b32))
    print("| %s | CPU per write at qd32 (writer + copy + fio) | %.1f+%.1f+%.1f = %.1f us | %.1f+%.1f+%.1f = %.1f us | %.2fx | writer+copy %.2fx (%s) | |" % (
        (kind,) + cpu(c32) + cpu(b32) + (cpu(c32)[3] / cpu(b32)[3], statistics.median(pc), pspan(pc))))
print("(median (min-max) of %d alternating rounds each; per-round ratio: median (min-max) of each round's current run over the baseline run after it;" % len(rows[0]))
print(" both pairs of nodes and fio share this machine's %s cores; the target is on the ratio of medians)" % os.cpu_count())
EOF
	exit 0
fi
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
