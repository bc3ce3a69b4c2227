"""Idmapped mounts (idmap.c's `dsec-idmap`): the shared image layers, volumes and a sandbox's writable layer
seen with the ids shifted between the host range of a user-namespaced sandbox and the ids stored on disk.

Why idmapped mounts rather than chowning: the layer store is shared by every sandbox and each sandbox has its
own host range, so a chowned copy per sandbox would cost a full copy of the image per create. An idmapped
mount costs a few µs per layer and changes nothing on disk. Why done on the host rather than by the runtime:
runc 1.1.5 has no idmapped mounts and crun 1.8.1 only for bind mounts, and the overlay's lower layers have to
be idmapped before overlayfs stacks them (kernel >= 5.19; erofs layers included).

Directions, as `dsec-idmap` takes them (INSIDE OUTSIDE COUNT, like a uid_map line): a mount shows a file stored
with id INSIDE+k as OUTSIDE+k.
- image layers and volumes, stored with the sandbox's own ids: 0 → base (what the sandbox's root is on the host);
- the sandbox's writable layer, stored with host ids, read or written as the sandbox's own ids (snapshots,
  restores, image build steps): base → 0.
"""

from __future__ import annotations

import contextlib
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

from dsec.errors import RuntimeFailure
from dsec.substrates.container.helper_build import helper_binary
from dsec.substrates.container.rootfs import unmount
from dsec.substrates.container.userns import IDS

SOURCE = Path(__file__).with_name("idmap.c")
BINARY_NAME = "dsec-idmap"
HELPER_TIMEOUT_S = 60.0


def _run(bin_dir: Path, args: list[str], what: str) -> None:
    """Run dsec-idmap; its failure becomes an OSError carrying the errno it names (so callers can branch on it)."""
    try:
        proc = subprocess.run(
            [str(helper_binary(SOURCE, BINARY_NAME, bin_dir)), *args],
            capture_output=True, stdin=subprocess.DEVNULL, timeout=HELPER_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise RuntimeFailure(f"{what}: dsec-idmap did not finish within {HELPER_TIMEOUT_S:.0f}s") from exc
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip()
        name = message.partition(":")[0]
        raise OSError(getattr(errno, name, errno.EIO), f"{what}: {message}")


def mount_overlay(bin_dir: Path, lower_dirs: list[Path], options: str, target: Path, base: int) -> None:
    """Mount an overlay on `target` whose lower layers show as the host range from `base`; `options` names the
    upper and work dirs. Raises OSError (errno of the failing step)."""
    _run(
        bin_dir,
        ["overlay", "0", str(base), str(IDS), str(target), options, *(str(p) for p in lower_dirs)],
        f"overlay mount on {target}",
    )


def bind(bin_dir: Path, source: Path, target: Path, inside: int, outside: int, readonly: bool = False) -> None:
    """Bind `source` on `target` (created if missing) showing ids `inside`+k as `outside`+k."""
    target.mkdir(parents=True, exist_ok=True)
    args = ["bind", str(inside), str(outside), str(IDS), str(source), str(target)]
    try:
        _run(bin_dir, args + (["ro"] if readonly else []), f"idmapped bind of {source}")
    except OSError as exc:
        raise RuntimeFailure(str(exc)) from exc


@contextlib.contextmanager
def own_ids_view(bin_dir: Path, upper: Path, base: int, at: Path) -> Iterator[Path]:
    """`upper` (stored with host ids from `base`) mounted at `at` with the sandbox's own ids (0 = its root), for
    tar or a layer export; unmounted on exit. Files stored outside the range show as the overflow id 65534."""
    bind(bin_dir, upper, at, base, 0)
    try:
        yield at
    finally:
        unmount(at)
        at.rmdir()
