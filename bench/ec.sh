#!/usr/bin/env bash
# Issue 16's read comparison, side by side, on three loopback nodes: one
# image imported twice from the same source, once mirrored with
# --copies 2 and once erasure-coded with --ec 2+1 (shard 0 on n1, shard 1
# on n2, parity on n3); fio reads each through n1 (the mirrored image's
# writer, one data shard local) and through n3 (both data shards remote).
#  seq:  1 MiB sequential reads QD8;  rand: 4 KiB random reads QD32;
#  degraded: the same on the EC image with a data-shard node stopped.
# Prints MiB/s or IOPS of each and the EC/mirrored ratio, and the raw bytes
# per usable byte of each image.
# Usage: bench/ec.sh [SIZE_MIB]   (default 512)
# Needs bin/lupool (make build), fio and curl. Stops only what it started.
# Every process shares this machine's CPUs: expect noise.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-512}
for t in fio curl; do
	command -v $t >/dev/null || { echo "bench/ec.sh: $t missing; run ./scripts/install-test-deps.sh" >&2; exit 1; }
done
[[ -x bin/lupool ]] || { echo "bench/ec.sh: no bin/lupool; run make build" >&2; exit 1; }

tmp=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$tmp"
}
trap cleanup EXIT
base=$((30000 + RANDOM % 20000))
declare -A api nbd pid
start() { # start ID INDEX [JOIN_API]
	local id=$1 i=$2 join=${3:-}
	api[$id]=127.0.0.1:$((base + 3 * i + 1)) nbd[$id]=127.0.0.1:$((base + 3 * i))
	local flags=()
	if [[ -n $join ]]; then
		flags=(--join "$join" --join-token "$(cli n1 cluster join-token)")
	fi
	bin/lupool serve --node-id "$id" --data "$tmp/$id" --nbd "${nbd[$id]}" --api "${api[$id]}" \
		--peer "127.0.0.1:$((base + 3 * i + 2))" --log-level warn "${flags[@]}" >"$tmp/$id.log" 2>&1 &
	pid[$id]=$!
	pids+=("$!")
	for _ in $(seq 1 150); do curl -sf "http://${api[$id]}/readyz" >/dev/null && return; sleep 0.2; done
	echo "bench/ec.sh: $id did not start:" >&2; cat "$tmp/$id.log" >&2; exit 1
}
cli() { local id=$1; shift; bin/lupool --api "${api[$id]}" --token-file "$tmp/n1/admin.token" "$@"; }
start n1 0
start n2 1 "${api[n1]}"
start n3 2 "${api[n1]}"

src=$tmp/disk.raw
dd if=/dev/urandom of="$src" bs=1M count="$size_mib" status=none
cli n1 image import mirror "$src" --copies 2 >/dev/null
cli n1 image import coded "$src" --ec 2+1 >/dev/null
cli n1 image show coded -o json >"$tmp/coded.json"

fio_read() { # fio_read NODE EXPORT RW BS QD -> MiB/s (seq) or IOPS (rand)
	fio --name=b --ioengine=nbd --uri="nbd://${nbd[$1]}/$2" --rw="$3" --bs="$4" --iodepth="$5" \
		--size="${size_mib}M" --runtime=5 --time_based --randseed=7 --output-format=terse --terse-version=3 |
		grep ';' | tail -1 | awk -F';' -v rw="$3" '{ if (rw == "randread") print $8; else printf "%.1f\n", $7 / 1024 }'
}
ratio() { echo "$1 / $2" | bc -l; }
for node in n1 n3; do
	m=$(fio_read $node mirror/0 read 1M 8) e=$(fio_read $node coded/0 read 1M 8)
	printf 'via %s  seq 1M QD8:    mirrored %s MiB/s, ec 2+1 %s MiB/s, ec/mirrored %.2f\n' $node "$m" "$e" "$(ratio "$e" "$m")"
	m=$(fio_read $node mirror/0 randread 4k 32) e=$(fio_read $node coded/0 randread 4k 32)
	printf 'via %s  rand 4k QD32:  mirrored %s IOPS, ec 2+1 %s IOPS, ec/mirrored %.2f\n' $node "$m" "$e" "$(ratio "$e" "$m")"
done
# Degraded: stop n2 (it holds data shard 1 of coded/0 and no copy the
# mirrored image needs through n1), read through n1.
kill -TERM "${pid[n2]}"; wait "${pid[n2]}" 2>/dev/null || true
m=$(fio_read n1 mirror/0 read 1M 8) e=$(fio_read n1 coded/0 read 1M 8)
printf 'degraded (n2 down) via n1  seq 1M QD8:   mirrored %s MiB/s, ec 2+1 %s MiB/s, ec/mirrored %.2f\n' "$m" "$e" "$(ratio "$e" "$m")"
m=$(fio_read n1 mirror/0 randread 4k 32) e=$(fio_read n1 coded/0 randread 4k 32)
printf 'degraded (n2 down) via n1  rand 4k QD32: mirrored %s IOPS, ec 2+1 %s IOPS, ec/mirrored %.2f\n' "$m" "$e" "$(ratio "$e" "$m")"
raw=$(sed -n 's/.*"raw_bytes": *\([0-9]*\).*/\1/p' "$tmp/coded.json" | head -1)
usable=$(sed -n 's/.*"usable_bytes": *\([0-9]*\).*/\1/p' "$tmp/coded.json" | head -1)
printf 'space   ec 2+1: %.3f raw bytes per usable byte; mirrored --copies 2: 2.000\n' "$(ratio "$raw" "$usable")"
