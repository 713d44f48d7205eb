#!/usr/bin/env bash
# Server CPU per request: the bare NBD engine over an lu file volume, from
# two builds (baseline and current nbdbench binaries), against nbdkit's file
# plugin, fio --ioengine=nbd, rounds alternating the three servers. CPU is
# the server process's user+system time over the run (/proc/PID/stat), so
# it moves less with the load of a shared machine than IOPS do.
# Usage: bench/cpu-per-request.sh ROUNDS BASE_NBDBENCH NEW_NBDBENCH
# (build one with: go build -o /tmp/nbdbench ./bench/cmd/nbdbench).
# Stops only what it started.
set -euo pipefail
rounds=$1 base=$2 new=$3
for tool in fio nbdkit python3; do
	command -v "$tool" >/dev/null || { echo "bench/cpu-per-request.sh: $tool missing" >&2; exit 1; }
done
d=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$d"
}
trap cleanup EXIT
"$base" nbdbench-engine --listen 127.0.0.1:21001 --kind file --size 1073741824 --path "$d/base.raw" >"$d/base.log" 2>&1 &
pids+=($!)
"$new" nbdbench-engine --listen 127.0.0.1:21002 --kind file --size 1073741824 --path "$d/new.raw" >"$d/new.log" 2>&1 &
pids+=($!)
truncate -s 1G "$d/nk.raw"
nbdkit -f -i 127.0.0.1 -p 21003 file "$d/nk.raw" >"$d/nk.log" 2>&1 &
pids+=($!)
sleep 1

# jobfile PORT RW BS IODEPTH [RUNTIME]: writes the fio job (time based
# when RUNTIME is given, else one pass over 1 GiB).
jobfile() {
	printf '[j]\nioengine=nbd\nuri=nbd://127.0.0.1:%s/bench\nsize=1073741824\nrw=%s\nbs=%s\niodepth=%s\nrandrepeat=1\nnorandommap=1\n' \
		"$1" "$2" "$3" "$4" >"$d/job.fio"
	if [[ $# -gt 4 ]]; then printf 'runtime=%s\ntime_based=1\n' "$5" >>"$d/job.fio"; fi
}
# iops PORT RW BS IODEPTH RUNTIME: the IOPS of one fio run.
iops() {
	jobfile "$@"
	fio --output-format=json "$d/job.fio" 2>/dev/null | grep -v '^fio:' |
		python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(int(j["read"]["iops"]+j["write"]["iops"]))'
}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

for port in 21001 21002 21003; do # prefill, as bench/run.sh does
	jobfile "$port" write 1m 8
	fio "$d/job.fio" >/dev/null 2>&1
done
hz=$(getconf CLK_TCK)
names=(base new nbdkit)
echo "workload server iops cpu_us_per_request"
for w in "randread 4k 32" "read 1m 8" "write 1m 8" "randwrite 4k 32"; do
	for _ in $(seq "$rounds"); do
		for i in 0 1 2; do
			port=$((21001 + i)) pid=${pids[$i]}
			t0=$(ticks "$pid")
			n=$(iops "$port" $w 2s)
			t1=$(ticks "$pid")
			python3 -c "print('${w// /-} ${names[$i]} $n %.1f' % (($t1 - $t0) / $hz * 1e6 / ($n * 2)))"
		done
	done
done
