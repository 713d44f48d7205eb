#!/usr/bin/env bash
# Issue 18's measurements, side by side, on loopback nodes of this machine:
#  storm:   one node, LUs a and s (file). fio 4k randwrite QD1 on a alone;
#           then while a 1 MiB sequential write storm (QD8) runs on s; then
#           with `lu set s --write-bps-limit 50M`. Prints a's IOPS and p99.
#  rebuild: three nodes, LU c (2 copies) under fio 4k randwrite QD1 while
#           `lu add-copy r --node n3` rebuilds 1.5 GiB; once with the
#           background budget off (--background-rate 0), once with its
#           default. Prints c's p99 alone and during, and the rebuild time.
#  scrub:   two nodes, LU g (1 GiB, 2 copies, filled) under fio 4k randwrite
#           QD8, alone and while `lu scrub g` runs. Prints the IOPS of both.
# Usage: bench/qos.sh [storm|rebuild|scrub|all (default)]
# Needs bin/lupool (make build) and fio. Stops only what it started. Every
# process shares this machine's CPUs: expect noise, run it twice.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
command -v fio >/dev/null || { echo "bench/qos.sh: fio missing; run ./scripts/install-test-deps.sh" >&2; exit 1; }
[[ -x bin/lupool ]] || { echo "bench/qos.sh: no bin/lupool; run make build" >&2; exit 1; }

tmp=$(mktemp -d)
pids=()
stop_nodes() {
	for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	pids=()
}
cleanup() {
	stop_nodes
	rm -rf "$tmp"
}
trap cleanup EXIT
cp bin/lupool "$tmp/lupool"
bin=$tmp/lupool
port=$((30000 + RANDOM % 20000))

# start N FLAGS...: nodes n1..nN, n2.. joining n1; sets api1 and nbd1.
start() {
	local n=$1 i
	shift
	rm -rf "$tmp/data"
	for i in $(seq 1 "$n"); do
		local base=$((port + 10 * i)) args
		args=(serve --data "$tmp/data/n$i" --nbd "127.0.0.1:$base" --api "127.0.0.1:$((base + 1))"
			--peer "127.0.0.1:$((base + 2))" --node-id "n$i" --log-level warn "$@")
		if ((i > 1)); then
			args+=(--join "$api1" --join-token "$(cli cluster join-token 2>/dev/null)")
		fi
		"$bin" "${args[@]}" >"$tmp/n$i.log" 2>&1 &
		pids+=($!)
		local ok=0
		for _ in $(seq 1 150); do
			curl -sf "http://127.0.0.1:$((base + 1))/readyz" >/dev/null && { ok=1; break; }
			sleep 0.2
		done
		((ok)) || { echo "bench/qos.sh: n$i did not start:" >&2; cat "$tmp/n$i.log" >&2; exit 1; }
		if ((i == 1)); then
			api1=127.0.0.1:$((base + 1)) nbd1=127.0.0.1:$base
		fi
	done
}
cli() { LUPOOL_API=$api1 LUPOOL_TOKEN_FILE=$tmp/data/n1/admin.token "$bin" "$@"; }

# fiojson ARGS...: fio over NBD, JSON on stdout.
fiojson() {
	local out
	out=$(fio --ioengine=nbd --output-format=json "$@" 2>/dev/null)
	echo "${out#*$'\n'}" | sed -n '/^{/,$p'
}
# summary: reads fio JSON on stdin; IOPS and completion-latency percentiles.
summary() {
	python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
d = j["write"] if j["write"]["iops"] > 0 else j["read"]
p = d["clat_ns"].get("percentile", {})
print("%6.0f IOPS  %5.1f MiB/s  p50 %7.0f us  p99 %7.0f us" % (d["iops"], d["bw"] / 1024,
      p.get("50.000000", 0) / 1000, p.get("99.000000", 0) / 1000))'
}
qd1() { fiojson --name=qd1 --uri="nbd://$nbd1/$1" --rw=randwrite --bs=4k --iodepth=1 --size=256M --time_based --runtime="$2"; }

storm() {
	echo "== storm: LU a 4k randwrite QD1 (10 s) next to a 1 MiB sequential write storm on LU s"
	start 1
	cli lu create a --size 1G >/dev/null
	cli lu create s --size 4G >/dev/null
	echo "a alone:                $(qd1 a 10 | summary)"
	for limit in "" 50M; do
		[[ -n $limit ]] && cli lu set s --write-bps-limit "$limit" >/dev/null
		fiojson --name=storm --uri="nbd://$nbd1/s" --rw=write --bs=1M --iodepth=8 --size=4G --time_based --runtime=13 >"$tmp/storm.json" &
		local fp=$!
		sleep 1.5
		local a
		a=$(qd1 a 10 | summary)
		wait "$fp"
		printf 'a, storm %-14s %s   (storm: %s)\n' "${limit:-unlimited}:" "$a" "$(summary <"$tmp/storm.json")"
	done
	stop_nodes
}

rebuild() {
	for flags in "--background-rate 0" ""; do
		echo "== rebuild of 1.5 GiB onto n3 under LU c 4k randwrite QD1; serve ${flags:-(default background budget)}"
		# shellcheck disable=SC2086
		start 3 $flags
		cli lu create c --size 1G --copies 2 >/dev/null
		cli lu create r --size 2G >/dev/null
		fio --name=fill --ioengine=nbd --uri="nbd://$nbd1/r" --rw=write --bs=1M --iodepth=8 --size=1536M >/dev/null 2>&1
		echo "c alone:          $(qd1 c 8 | summary)"
		local t0 t1
		t0=$(date +%s.%N)
		cli lu add-copy r --node n3 >/dev/null
		qd1 c 10 >"$tmp/during.json" &
		local fp=$!
		for _ in $(seq 1 600); do
			cli lu show r -o json | python3 -c 'import json,sys; sys.exit(0 if [r for r in json.load(sys.stdin)["replicas"] if r["node"]=="n3" and r["state"]=="in-sync"] else 1)' && break
			sleep 0.25
		done
		t1=$(date +%s.%N)
		wait "$fp"
		echo "c during rebuild: $(summary <"$tmp/during.json")   rebuild $(python3 -c "print(round($t1 - $t0, 1))") s"
		stop_nodes
	done
}

scrub() {
	echo "== scrub of LU g (1 GiB, 2 copies) under 4k randwrite QD8 on g"
	start 2
	cli lu create g --size 1G --copies 2 >/dev/null
	fio --name=fill --ioengine=nbd --uri="nbd://$nbd1/g" --rw=write --bs=1M --iodepth=8 --size=1G >/dev/null 2>&1
	load() { fiojson --name=load --uri="nbd://$nbd1/g" --rw=randwrite --bs=4k --iodepth=8 --size=1G --time_based --runtime=8; }
	echo "load alone:        $(load | summary)"
	load >"$tmp/during.json" &
	local fp=$!
	sleep 0.2
	local s
	s=$(cli lu scrub g)
	wait "$fp"
	echo "load during scrub: $(summary <"$tmp/during.json")   $s"
	stop_nodes
}

case $what in
storm | rebuild | scrub) $what ;;
all) storm && rebuild && scrub ;;
*) echo "usage: bench/qos.sh [storm|rebuild|scrub|all]" >&2; exit 2 ;;
esac
