"""Layer extraction: whiteouts honoured by a real overlay mount, and hostile tars rejected with nothing cached."""

from __future__ import annotations

import gzip
import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from dsec.errors import InvalidSpec
from dsec.images.store import LayerStore
from .layers import Entry, layer_tar, oci_layout, sha

BOTTOM = layer_tar([
    Entry("a", kind="dir"), Entry("a/gone", b"1"), Entry("a/kept", b"2"),
    Entry("d", kind="dir"), Entry("d/old1", b"x"), Entry("d/old2", b"y"), Entry("d/sub", kind="dir"), Entry("d/sub/f", b"z"),
])
TOP = layer_tar([
    Entry("a", kind="dir"), Entry("a/.wh.gone"),
    Entry("d", kind="dir"), Entry("d/.wh..wh..opq"), Entry("d/new", b"n"),
])


def test_whiteouts_translate_to_overlay_markers(store: LayerStore, tmp_path: Path) -> None:
    store.import_oci_layout(oci_layout(tmp_path / "l", [BOTTOM, TOP]), tag="wh")
    top = store.resolve("wh").lower_dirs[0]
    st = os.lstat(top / "a/gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(top / "d", "trusted.overlay.opaque") == b"y"
    assert not (top / "a/.wh.gone").exists() and not (top / "d/.wh..wh..opq").exists()


@pytest.mark.timeout(60)
def test_whiteouts_honoured_across_two_layers_by_overlayfs(fmt_store: LayerStore, tmp_path: Path) -> None:
    fmt_store.import_oci_layout(oci_layout(tmp_path / "l", [BOTTOM, TOP]), tag="wh")
    rootfs = fmt_store.resolve("wh")
    upper, work, merged = (tmp_path / n for n in ("upper", "work", "merged"))
    for d in (upper, work, merged):
        d.mkdir()
    lower = ":".join(str(p) for p in rootfs.lower_dirs)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}",
                    str(merged)], check=True)
    try:
        assert sorted(os.listdir(merged / "a")) == ["kept"]
        assert sorted(os.listdir(merged / "d")) == ["new"]  # opaque: old1, old2, sub hidden
        assert (merged / "a/kept").read_bytes() == b"2"
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def _reject(store: LayerStore, tmp_path: Path, raw: bytes, match: str) -> None:
    with pytest.raises(InvalidSpec, match=match):
        store.import_oci_layout(oci_layout(tmp_path / "bad", [raw]), tag="bad")
    assert list(store.layers_dir.iterdir()) == [], "no half layer may be left visible"
    assert list(store.tmp_dir.iterdir()) == []
    assert store.list() == []


@pytest.mark.parametrize(("entries", "match"), [
    ([Entry("../escape", b"x")], r"'\.\.'"),
    ([Entry("a/../../escape", b"x")], r"'\.\.'"),
    ([Entry("/etc/passwd", b"x")], "absolute"),
    ([Entry("evil", kind="hardlink", link="/etc/passwd")], "absolute"),
    ([Entry("evil", kind="hardlink", link="../outside")], r"'\.\.'"),
    ([Entry("evil", kind="hardlink", link="missing")], "outside this layer or at a missing"),
    ([Entry("link", kind="symlink", link="/etc"), Entry("link/passwd", b"owned")], "non-directory"),
    ([Entry("link", kind="symlink", link="../../.."), Entry("link/x", b"owned")], "non-directory"),
    ([Entry("null", kind="chr")], "device node"),
    ([Entry("big", b"x", pax={"comment": "y" * (2 << 20)})], "metadata header"),
], ids=["dotdot", "nested-dotdot", "absolute", "hardlink-absolute", "hardlink-dotdot", "hardlink-missing",
        "symlink-abs-write-through", "symlink-rel-write-through", "device", "huge-header"])
def test_hostile_entries_rejected(store: LayerStore, tmp_path: Path, entries: list[Entry], match: str) -> None:
    _reject(store, tmp_path, layer_tar(entries), match)


def test_symlinks_pointing_outside_are_kept_as_links_not_followed(store: LayerStore, tmp_path: Path) -> None:
    """A symlink to /etc/passwd is legitimate image content (it resolves inside the sandbox), never followed here."""
    store.import_oci_layout(oci_layout(tmp_path / "l", [layer_tar([Entry("p", kind="symlink", link="/etc/passwd")])]), tag="s")
    top = store.resolve("s").lower_dirs[0]
    assert os.readlink(top / "p") == "/etc/passwd"


def test_digest_mismatch_rejected_and_not_cached(store: LayerStore, tmp_path: Path) -> None:
    layout = oci_layout(tmp_path / "l", [layer_tar([Entry("f", b"good")])])
    blob = layout / "blobs" / "sha256" / sha(layer_tar([Entry("f", b"good")]))[7:]
    blob.write_bytes(layer_tar([Entry("f", b"evil")]))  # same size, different bytes
    with pytest.raises(InvalidSpec, match="mismatch"):
        store.import_oci_layout(layout, tag="m")
    assert list(store.layers_dir.iterdir()) == [] and store.list() == []


def test_truncated_and_garbage_layers(store: LayerStore, tmp_path: Path) -> None:
    raw = layer_tar([Entry("f", b"x" * 100_000)])
    _reject(store, tmp_path, raw[:50_000], "not a valid tar|mismatch")
    _reject(store, tmp_path, gzip.compress(raw)[:3000], "not a valid tar|mismatch")


def test_huge_long_name_header_rejected(store: LayerStore, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("d/" * 600_000 + "f")
        tar.addfile(info, io.BytesIO(b""))
    _reject(store, tmp_path, buf.getvalue(), "metadata header")
