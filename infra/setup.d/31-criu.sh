#!/usr/bin/env bash
# Container memory pause checkpoints with CRIU. Debian bookworm's CRIU 3.17 cannot parse the vDSO of Linux 6.13+
# ("Failed to fill self vdso symtable"), so when its `criu check` fails we build the CRIU that Debian trixie ships
# (4.1.1, from Debian's own source archive, sha256-checked) into /usr/local/sbin, which precedes /usr/sbin on PATH.
# Idempotent: nothing happens once a `criu check` on PATH passes. If the build fails, setup goes on and the probe
# (dsec/substrates/container/criu.py) says why memory pause is unavailable.
set -euo pipefail
VERSION=4.1.1
SHA256=f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe
URL="http://deb.debian.org/debian/pool/main/c/criu/criu_${VERSION}.orig.tar.xz"
PREFIX=/usr/local/sbin

if command -v criu >/dev/null && criu check >/dev/null 2>&1; then
  exit 0
fi
if [ -x "$PREFIX/criu" ] && "$PREFIX/criu" check >/dev/null 2>&1; then
  exit 0
fi
echo "setup: building CRIU $VERSION from Debian's source (the packaged CRIU cannot checkpoint on $(uname -r))"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! curl -fsSL --retry 3 -o "$work/criu.tar.xz" "$URL"; then
  echo "setup: could not download $URL; container memory pause stays unavailable" >&2
  exit 0
fi
echo "$SHA256  $work/criu.tar.xz" | sha256sum -c --quiet - || {
  echo "setup: $URL does not match its recorded sha256; not building it" >&2; exit 0; }
tar -C "$work" -xf "$work/criu.tar.xz"
if make -C "$work/criu-$VERSION" -j"$(nproc)" criu >"$work/build.log" 2>&1; then
  install -m 0755 "$work/criu-$VERSION/criu/criu" "$PREFIX/criu"
  "$PREFIX/criu" check >/dev/null 2>&1 || echo "setup: CRIU $VERSION built but 'criu check' fails here" >&2
else
  tail -20 "$work/build.log" >&2
  echo "setup: building CRIU $VERSION failed; container memory pause stays unavailable" >&2
fi
