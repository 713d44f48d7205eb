#!/usr/bin/env bash
# Installs what lupool's tests and benchmarks need on a fresh Debian 12 machine:
# the real NBD clients and peer servers they drive, and systemd-analyze for
# the unit file check, Chromium for the status page test (headless), and the
# VM that swaps on a paging LU (QEMU, Debian's kernel, busybox-static, gcc and
# libc6-dev for its static test program).
# Idempotent; no prompts.
set -euo pipefail
pkgs=(fio libnbd-bin python3-libnbd qemu-utils nbdkit nbd-client nbd-server gnuplot-nox systemd iproute2 chromium
  qemu-system-x86 linux-image-amd64 busybox-static gcc libc6-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
go mod download
