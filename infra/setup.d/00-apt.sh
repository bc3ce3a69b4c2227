#!/usr/bin/env bash
# Debian packages dsec runs on (OCI runtimes, Docker Engine, QEMU, image and registry tools, PostgreSQL).
set -euo pipefail
PACKAGES=(crun runc docker.io busybox-static debootstrap erofs-utils skopeo umoci docker-registry
          qemu-system-x86 qemu-utils postgresql iproute2 gcc libc6-dev e2fsprogs cpio kmod xz-utils zstd tar
          libfuse3-3)  # libfuse3-3: tests/durability's fault-injecting FUSE layer (mfusepy)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
