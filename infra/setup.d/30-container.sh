#!/usr/bin/env bash
# OCI runtimes for the container substrate (crun, runc), the tools its driver calls (unshare, tar) and
# busybox-static for its tests' images; idempotent and quiet. 00-apt.sh normally installs these already.
set -euo pipefail
PACKAGES=(crun runc busybox-static util-linux tar)
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
for tool in crun runc unshare tar; do
  command -v "$tool" >/dev/null || { echo "setup: $tool is missing after install" >&2; exit 1; }
done
# overlayfs backs every sandbox's root filesystem
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || {
  echo "setup: the kernel has no overlayfs; container sandboxes cannot start" >&2; exit 1; }
