#!/usr/bin/env bash
# The idle cost of many LUs with copies (issue 20): starts NODES lupool
# nodes on loopback (default 2), creates N LUs of 1 MiB with --copies 2
# through the CLI on n1 (n1 is their writer), one after another, and prints
#   - create time p50 / p99 / max per block of 1000 creates and overall,
#   - per node, IDLE_SECONDS (default 10) after the last create: CPU over
#     IDLE_SECONDS (from /proc/PID/stat), resident memory (VmRSS), OS
#     threads, goroutines (go_goroutines from /metrics) and open files
#     (/proc/PID/fd), and the resident memory per LU.
# Usage: bench/scale.sh N [NODES (2 or 3)]
# Environment: IDLE_SECONDS (default 10); LUPOOL (default bin/lupool);
# LUPOOL_SERVE_FLAGS (extra flags for every node). Needs bin/lupool (make
# build), curl and python3. Stops only what it started. The binary is
# copied first, so a rebuild during the run does not change what is measured.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:?usage: bench/scale.sh N [NODES]}
nodes=${2:-2}
idle=${IDLE_SECONDS:-10}
bin=${LUPOOL:-bin/lupool}
[[ $n =~ ^[0-9]+$ && $n -ge 1 ]] || { echo "bench/scale.sh: N must be a positive count, not $n" >&2; exit 2; }
[[ $nodes == 2 || $nodes == 3 ]] || { echo "bench/scale.sh: NODES must be 2 or 3, not $nodes" >&2; exit 2; }
[[ -x $bin ]] || { echo "bench/scale.sh: no $bin; run make build" >&2; exit 1; }

tmp=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$tmp"
}
trap cleanup EXIT
cp "$bin" "$tmp/lupool"
bin=$tmp/lupool
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

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
cli() { LUPOOL_API=$api1 LUPOOL_TOKEN_FILE=$tmp/n1/admin.token "$bin" "$@"; }
apis=() npids=()
# start ID [JOIN_API]: runs a node; records its API address and pid.
start() {
	local id=$1 join=${2:-} flags=()
	if [[ -n $join ]]; then
		flags=(--join "$join" --join-token "$(cli cluster join-token 2>/dev/null)")
	fi
	local api=127.0.0.1:$(port)
	# shellcheck disable=SC2086 # LUPOOL_SERVE_FLAGS is a list of flags
	"$bin" serve --node-id "$id" --data "$tmp/$id" --nbd "127.0.0.1:$(port)" --api "$api" \
		--peer "127.0.0.1:$(port)" --overcommit 100000 "${flags[@]}" ${LUPOOL_SERVE_FLAGS:-} >"$tmp/$id.log" 2>&1 &
	pids+=("$!")
	npids+=("$!")
	apis+=("$api")
	for _ in $(seq 300); do
		curl -fs "http://$api/readyz" >/dev/null 2>&1 && return
		sleep 0.1
	done
	echo "bench/scale.sh: node $id did not start:" >&2
	cat "$tmp/$id.log" >&2
	exit 1
}
start n1
api1=${apis[0]}
for i in $(seq 2 "$nodes"); do start "n$i" "$api1"; done

echo "scale: $n LUs of 1 MiB, --copies 2, $nodes nodes, created on n1; $(nproc) CPUs; load before: $(uptime | sed 's/.*load/load/')"
# Create one at a time, timing each CLI call (a process start included,
# as a user's script pays it).
: >"$tmp/create_ms"
for i in $(seq "$n"); do
	t0=$(date +%s%N)
	# A create whose outcome is unknown (the metadata leader changed while
	# it committed) is retried as a user would, up to 3 times; the time
	# counts the retries.
	for try in 1 2 3 4; do
		cli lu create "s$i" --size 1M --copies 2 >/dev/null 2>"$tmp/create.err" && break
		if [[ $try == 4 ]] || ! grep -qiE 'outcome unknown|leader' "$tmp/create.err"; then
			echo "bench/scale.sh: create s$i failed after $((i - 1)) LUs:" >&2
			cat "$tmp/create.err" >&2
			exit 1
		fi
		retries=$((${retries:-0} + 1))
		echo "create s$i: $(cat "$tmp/create.err"); retrying" >&2
		sleep 1
		cli lu show "s$i" >/dev/null 2>&1 && break
	done
	echo $((($(date +%s%N) - t0) / 1000)) >>"$tmp/create_ms"
done
python3 - "$tmp/create_ms" <<'EOF'
import statistics, sys
us = [int(l) / 1000 for l in open(sys.argv[1])]
def q(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(p * len(v)))]
for start in range(0, len(us), 1000):
    b = us[start:start + 1000]
    print("create ms, LUs %5d-%5d: p50 %6.1f  p99 %6.1f  max %6.1f" % (start + 1, start + len(b), q(b, .5), q(b, .99), max(b)))
print("create ms, all %11d: p50 %6.1f  p99 %6.1f  total %.1f s" % (len(us), q(us, .5), q(us, .99), sum(us) / 1000))
EOF

echo "create retries (outcome unknown, leader changed): ${retries:-0}"
sleep "$idle"
hz=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A c0
for p in "${npids[@]}"; do c0[$p]=$(cpu "$p"); done
sleep "$idle"
printf '%-4s %9s %9s %12s %8s %10s %10s\n' node "cpu_%" rss_MiB rss_KiB/LU threads goroutines open_files
for i in "${!npids[@]}"; do
	p=${npids[$i]}
	c1=$(cpu "$p")
	rss_kib=$(awk '/^VmRSS/ {print $2}' "/proc/$p/status")
	threads=$(awk '/^Threads/ {print $2}' "/proc/$p/status")
	gor=$(curl -fs "http://${apis[$i]}/metrics" | awk '/^go_goroutines / {print $2}')
	files=$(find "/proc/$p/fd" -mindepth 1 -maxdepth 1 | wc -l)
	python3 -c 'import sys
hz, dc, idle, rss, n = map(float, sys.argv[1:6])
print("%-4s %9.1f %9.0f %12.1f %8s %10s %10s" % (sys.argv[6], dc / hz / idle * 100, rss / 1024, rss / n, sys.argv[7], sys.argv[8] or "?", sys.argv[9]))' \
		"$hz" $((c1 - c0[$p])) "$idle" "$rss_kib" "$n" "n$((i + 1))" "$threads" "$gor" "$files"
done
echo "load after: $(uptime | sed 's/.*load/load/')"
