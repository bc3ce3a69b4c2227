"""Collect what pulled VM snapshots left under `<vm root>/pulled` once no snapshot and no VM uses it.

Why: a pulled VM snapshot's kernel, initramfs and base disk are linked under `pulled/` by content (portable.py),
outside the snapshot's own directory, so deleting the snapshot (by hand or by the snapshot GC) left them behind:
a node that pulls snapshots for training filled its disk with base disks nobody used.

Who uses such a file: a snapshot's VM metadata (`meta.json`: machine kernel and initrd, base disk), and a VM
sandbox's machine record (`vm.json`: the same three, read by re-adoption; its overlay's header names the base
disk), whatever its state (running, paused to disk, or left by a dead server and not yet re-adopted). The caller
says where those files are (the server knows its snapshot store and run directories). A file nobody names is
removed once its inode has been unchanged for a grace period: linking it or finding it there to reuse (a pull in
progress, whose metadata is not written yet; portable._link touches a reused file) and unlinking another name of
it (its snapshot's own copy going away) all reset that clock.
"""

from __future__ import annotations

import json
import logging
import stat
import time
from collections.abc import Iterable
from pathlib import Path

from dsec.substrates.vm.portable import PULLED

log = logging.getLogger("dsec.vm.pulled_gc")

PULLED_GRACE_S = 600.0


def _used_inodes(metadata: Iterable[Path]) -> set[tuple[int, int]]:
    """(device, inode) of each kernel, initrd and base disk a VM snapshot `meta.json` or machine record `vm.json`
    in `metadata` names: by inode, however a user spells the path (symlinks, relative roots). Files that are not
    VM metadata, or vanish while read, name nothing; a named file that is gone is nobody's to keep."""
    used = set()
    for path in metadata:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        machine = data.get("machine") if isinstance(data, dict) else None
        if not isinstance(machine, dict):
            continue
        for value in (machine.get("kernel"), machine.get("initrd"), data.get("base_disk")):
            if not isinstance(value, str) or not value:
                continue
            try:
                info = Path(value).stat()
            except OSError:
                continue
            used.add((info.st_dev, info.st_ino))
    return used


def collect_pulled(vm_root: Path, metadata: Iterable[Path], now: float | None = None,
                   grace_s: float = PULLED_GRACE_S) -> list[Path]:
    """Remove the files under `vm_root/pulled` that no file in `metadata` names and whose inode changed last
    more than `grace_s` ago; the removed paths."""
    pulled = vm_root / PULLED
    if not pulled.is_dir():
        return []
    used = _used_inodes(metadata)
    now = time.time() if now is None else now
    removed = []
    for entry in sorted(pulled.iterdir()):
        try:
            info = entry.lstat()
            if not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino) in used or now - info.st_ctime < grace_s:
                continue
            entry.unlink()
        except FileNotFoundError:
            continue
        removed.append(entry)
    if removed:
        log.info("removed %d pulled VM files nothing uses: %s", len(removed), ", ".join(p.name for p in removed))
    return removed
