#!/usr/bin/env bash
# The container substrate's host side: the OCI runtimes and tools its driver calls (installed by 00-apt.sh) must
# be on PATH, and the kernel must have overlayfs and loop devices; idempotent and quiet.
set -euo pipefail
for tool in crun runc tar mkfs.ext4 gcc; do
  command -v "$tool" >/dev/null || { echo "setup: $tool is missing (00-apt.sh installs it)" >&2; exit 1; }
done
# overlayfs backs every sandbox's root filesystem
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || {
  echo "setup: the kernel has no overlayfs; container sandboxes cannot start" >&2; exit 1; }
# each sandbox's disk budget is an ext4 on a loop device
[ -e /dev/loop-control ] || modprobe loop 2>/dev/null || {
  echo "setup: no /dev/loop-control; container sandboxes cannot get a disk" >&2; exit 1; }
# a container's first process joins its cgroups by a cgroup.procs write, which waits for an RCU grace period
# (5-15 ms here) unless cgroup2 is mounted with favordynmods (machine-wide; Linux >= 6.0; the module says why)
"${VENV:-$REPO_ROOT/.venv}/bin/python" -m dsec.substrates.container.cgroup_tuning
