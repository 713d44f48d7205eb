#!/usr/bin/env bash
# Issue 15's measurements, side by side, on one loopback node:
#  import: a 1 GiB sparse raw file holding 100 MiB of random data, imported
#          with `lupool image import` and copied with nbdcopy into a plain
#          1 GiB LU; prints the seconds and the bytes allocated of each.
#  clone:  fio 4k randread and randwrite QD32 on a linked clone of that
#          image (reads mostly from the image) against a plain LU holding
#          the same data; prints IOPS and the clone/plain ratio.
# Usage: bench/images.sh
# Needs bin/lupool (make build), fio and nbdcopy. Stops only what it
# started. Every process shares this machine's CPUs: expect noise.
set -euo pipefail
cd "$(dirname "$0")/.."
for t in fio nbdcopy; do
	command -v $t >/dev/null || { echo "bench/images.sh: $t missing; run ./scripts/install-test-deps.sh" >&2; exit 1; }
done
[[ -x bin/lupool ]] || { echo "bench/images.sh: no bin/lupool; run make build" >&2; exit 1; }

tmp=$(mktemp -d)
pid=
cleanup() {
	[[ -n $pid ]] && { kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
	rm -rf "$tmp"
}
trap cleanup EXIT
port=$((30000 + RANDOM % 20000))
nbd=127.0.0.1:$port api=127.0.0.1:$((port + 1))
bin/lupool serve --data "$tmp/data" --nbd "$nbd" --api "$api" --peer "127.0.0.1:$((port + 2))" --log-level warn >"$tmp/n1.log" 2>&1 &
pid=$!
for _ in $(seq 1 150); do curl -sf "http://$api/readyz" >/dev/null && break; sleep 0.2; done
cli() { bin/lupool --api "$api" --token-file "$tmp/data/admin.token" "$@"; }
alloc() { cli lu show "$1" -o json | sed -n 's/.*"allocated_bytes": *\([0-9]*\).*/\1/p' | head -1; }

src=$tmp/disk.raw
truncate -s 1G "$src"
for off in 100 300 600 900; do dd if=/dev/urandom of="$src" bs=1M count=25 seek=$off conv=notrunc status=none; done

t0=$(date +%s.%N)
cli image import base "$src" >/dev/null
t1=$(date +%s.%N)
cli lu create plain --size 1G >/dev/null
t2=$(date +%s.%N)
nbdcopy "$src" "nbd://$nbd/plain"
t3=$(date +%s.%N)
printf 'import  lupool image import: %.2f s, %s bytes allocated\n' "$(echo "$t1 - $t0" | bc)" "$(alloc base/0)"
printf 'import  nbdcopy into a plain LU: %.2f s, %s bytes allocated\n' "$(echo "$t3 - $t2" | bc)" "$(alloc plain)"

cli lu create clone --from base/0 >/dev/null
iops() {
	fio --name=b --ioengine=nbd --uri="nbd://$nbd/$1" --rw="$2" --bs=4k --iodepth=32 --size=1G \
		--runtime=5 --time_based --randseed=7 --output-format=terse --terse-version=3 | grep ';' | tail -1 |
		awk -F';' -v rw="$2" '{ print (rw == "randread") ? $8 : $49 }'
}
for rw in randread randwrite; do
	p=$(iops plain $rw) c=$(iops clone $rw)
	printf 'clone   4k %s QD32: plain %s IOPS, clone %s IOPS, clone/plain %.2f\n' "$rw" "$p" "$c" "$(echo "$c / $p" | bc -l)"
done
