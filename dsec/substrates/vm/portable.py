"""A VM snapshot on another node: what travels with it, and how a pulled one is pointed at this node's files.

A VM snapshot's `meta.json` names the guest kernel, the initramfs and the base disk by absolute path, and its qcow2
overlay names the base disk in its header. On another node (another `$DSEC_HOME`) those paths are absent or, worse,
hold a different build of the same name (an image's base disk is not byte-reproducible: mkfs picks UUIDs), and an
overlay over the wrong base disk is a corrupt disk. So the kernel travels with the snapshot (the initramfs and the
base disk already are in it), and a pulled snapshot's files are linked under this node's VM directory by a name
derived from their content (`content_ids`: the artifact's chunk digests), never by their old names.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from dsec.errors import RuntimeFailure
from dsec.substrates.vm.driver import SNAPSHOT_BASE, SNAPSHOT_INITRD, SNAPSHOT_META
from dsec.substrates.vm.machine import DISK

KERNEL = "vmlinuz"  # the guest kernel's copy inside a pushed VM snapshot
PULLED = "pulled"  # under the VM root: where pulled snapshots' files are linked by content (collected by pulled_gc.py)


def _meta(data: Path) -> dict | None:
    """The VM snapshot's own metadata, or None when `data` is another substrate's snapshot."""
    try:
        meta = json.loads((data / SNAPSHOT_META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("machine"), dict) else None


def extra_files(data: Path) -> dict[str, Path]:
    """Files outside the snapshot directory that a VM snapshot needs elsewhere, by the name they travel under."""
    meta = _meta(data)
    return {} if meta is None else {KERNEL: Path(meta["machine"]["kernel"])}


def _link(source: Path, dest: Path) -> None:
    """`dest` as a hard link of `source` (a copy across filesystems); an existing `dest` has the same content. An
    existing one is touched: the pulled-file GC (pulled_gc.py) spares a file whose inode changed within its grace,
    and this pull's metadata, which will name it, is not written yet."""
    if dest.exists():
        os.utime(dest)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, dest)


def localize(data: Path, vm_root: Path, content_ids: dict[str, str]) -> None:
    """Point a pulled VM snapshot in `data` at files under this node's `vm_root`; `content_ids` maps each file
    name in `data` to an id of its content. Other substrates' snapshots are left as they are."""
    meta = _meta(data)
    if meta is None:
        return
    machine = meta["machine"]
    kernel = vm_root / PULLED / f"{content_ids[KERNEL]}.vmlinuz"
    initrd = vm_root / PULLED / f"{content_ids[SNAPSHOT_INITRD]}.initrd.img"
    base = vm_root / PULLED / f"{content_ids[SNAPSHOT_BASE]}.base.raw"
    for name, dest in ((KERNEL, kernel), (SNAPSHOT_INITRD, initrd), (SNAPSHOT_BASE, base)):
        _link(data / name, dest)
    (data / KERNEL).unlink()  # restore reads it from `kernel`; the snapshot keeps what the driver put there
    overlay = data / DISK
    done = subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay)],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeFailure(f"cannot point the pulled VM disk at {base}: {done.stderr.strip()[-300:]}")
    meta["machine"] = {**machine, "kernel": str(kernel), "initrd": str(initrd)}
    meta["base_disk"] = str(base)
    (data / SNAPSHOT_META).write_text(json.dumps(meta))
