#!/usr/bin/env bash
# OCI runtimes for the container substrate (crun, runc), the tools its driver calls (tar, mkfs.ext4, gcc for its
# small helper), busybox-static for its tests' images, and overlayfs + loop devices; idempotent and quiet.
set -euo pipefail
PACKAGES=(crun runc busybox-static tar e2fsprogs gcc libc6-dev)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing container runtime packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
for tool in crun runc tar mkfs.ext4 gcc; do
  command -v "$tool" >/dev/null || { echo "setup: $tool is missing after install" >&2; exit 1; }
done
# overlayfs backs every sandbox's root filesystem
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || {
  echo "setup: the kernel has no overlayfs; container sandboxes cannot start" >&2; exit 1; }
# each sandbox's disk budget is an ext4 on a loop device
[ -e /dev/loop-control ] || modprobe loop 2>/dev/null || {
  echo "setup: no /dev/loop-control; container sandboxes cannot get a disk" >&2; exit 1; }
