#!/usr/bin/env bash
# Every Debian package dsec and its tests need, in one idempotent install (the later setup.d scripts only
# configure); quiet when all are there. Grouped by who needs them.
set -euo pipefail
PACKAGES=(
  # container substrate (30-container.sh): the OCI runtimes, the tar and mkfs.ext4 its driver calls, gcc and
  # libc.a for the static agent (20-agent.sh) and the driver's small helper, kmod for modprobe
  crun runc tar e2fsprogs gcc libc6-dev kmod
  docker.io                      # the Docker driver's own engine (35-docker.sh)
  criu                           # container memory pause; its probe says why it cannot run (docs/lifecycle.md)
  # CRIU 4.1 built from Debian trixie's source when bookworm's 3.17 cannot read this kernel's vDSO (31-criu.sh)
  libbsd-dev libcap-dev libgnutls28-dev libnet1-dev libnftables-dev libnl-3-dev libprotobuf-c-dev libprotobuf-dev
  pkgconf protobuf-c-compiler protobuf-compiler uuid-dev python3-protobuf make
  # crun 1.21 with CRIU (libcriu from package criu) built from Debian trixie's source (32-crun.sh)
  autoconf automake libtool gperf libseccomp-dev libsystemd-dev libyajl-dev python3
  iproute2 nftables              # network allowlists: netns, veths and per-sandbox tables (36-network.sh)
  # images (40-images.sh): busybox and debootstrap'd base images, erofs layers, OCI interop and a test registry
  busybox-static debootstrap erofs-utils skopeo umoci docker-registry
  qemu-system-x86 qemu-utils cpio xz-utils zstd  # VM substrates: QEMU, the guest initramfs (70-vm.sh)
  postgresql                     # the PostgreSQL trajectory log and its tests
  libfuse3-3                     # tests/durability's fault-injecting FUSE layer (mfusepy)
)
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
