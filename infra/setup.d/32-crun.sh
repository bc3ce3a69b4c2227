#!/usr/bin/env bash
# crun is the default container driver; its memory pause checkpoints through CRIU, which crun reaches through
# libcriu only when built with it. Debian bookworm's crun 1.8.1 is built without (`crun --version` lacks +CRIU),
# so we build the crun that Debian trixie ships (1.21, from Debian's own source archive, sha256-checked) against
# bookworm's libcriu (package criu, 00-apt.sh; its RPC drives the CRIU 4.1 of 31-criu.sh, the `criu` on PATH)
# into /usr/local/bin, which precedes /usr/bin on PATH. Idempotent: nothing happens once the crun on PATH reports
# +CRIU. If the build fails, setup goes on with bookworm's crun and a crun memory pause is refused with the reason
# (dsec/substrates/container/criu.py).
set -euo pipefail
VERSION=1.21
SHA256=4bfb700e764a4804a4de3ecf07753f4c391005356d60356df65d80ae0914c486
URL="http://deb.debian.org/debian/pool/main/c/crun/crun_${VERSION}.orig.tar.gz"
PREFIX=/usr/local

has_criu() { "$1" --version 2>/dev/null | grep -qw -- '+CRIU'; }

if command -v crun >/dev/null && has_criu "$(command -v crun)"; then
  exit 0
fi
if [ -x "$PREFIX/bin/crun" ] && has_criu "$PREFIX/bin/crun"; then
  exit 0
fi
echo "setup: building crun $VERSION with CRIU from Debian's source (the packaged crun has no checkpoint/restore)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! curl -fsSL --retry 3 -o "$work/crun.tar.gz" "$URL"; then
  echo "setup: could not download $URL; crun memory pause stays unavailable" >&2
  exit 0
fi
echo "$SHA256  $work/crun.tar.gz" | sha256sum -c --quiet - || {
  echo "setup: $URL does not match its recorded sha256; not building it" >&2; exit 0; }
tar -C "$work" -xzf "$work/crun.tar.gz"
src="$work/crun-$VERSION"
# the orig tarball ships configure. `make crun` alone makes neither git-version.h (a BUILT_SOURCE) nor, before
# compiling crun.c in parallel, the headers libocispec generates ("unknown type name ..._windows"): both first
if (cd "$src" && ./configure --prefix="$PREFIX" && make git-version.h && make -C libocispec -j"$(nproc)" &&
    make -j"$(nproc)" crun) >"$work/build.log" 2>&1; then
  install -m 0755 "$src/crun" "$PREFIX/bin/crun"
  has_criu "$PREFIX/bin/crun" || echo "setup: crun $VERSION built but '$PREFIX/bin/crun --version' lacks +CRIU" >&2
else
  tail -20 "$work/build.log" >&2
  echo "setup: building crun $VERSION failed; crun memory pause stays unavailable" >&2
fi
