#!/usr/bin/env bash
# Side-by-side fio benchmark of lupool against nbdkit and qemu-nbd.
# Usage: bench/run.sh [--quick|--full] [nbdbench flags...]   (see bench/README.md)
# Builds bench/cmd/nbdbench into a temp dir and runs it from the repo root;
# nbdbench starts and stops the servers itself. Results go to bench/results
# unless --out DIR is given.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in fio nbdkit qemu-nbd gnuplot; do
	command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
	echo "bench/run.sh: missing ${missing[*]}; run ./scripts/install-test-deps.sh" >&2
	exit 1
fi
if [[ ! -x bin/lupool ]]; then
	echo "bench/run.sh: no bin/lupool (make build): the lupool servers will be skipped" >&2
fi

tmp=$(mktemp -d)
pid=
cleanup() {
	# Stop only the runner this script started; it stops its own servers
	# on SIGTERM, and the kernel's parent-death signal catches the rest.
	if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	fi
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

go build -o "$tmp/nbdbench" ./bench/cmd/nbdbench
"$tmp/nbdbench" "$@" &
pid=$!
wait "$pid"
status=$?
pid=
exit "$status"
