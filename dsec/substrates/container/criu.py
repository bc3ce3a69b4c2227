"""Whether CRIU can checkpoint a container's processes on this host, and why not when it cannot.

`pause(kind="memory")` of a container needs CRIU (through runc's or crun's checkpoint/restore). CRIU depends on
the kernel in ways a package version alone does not tell: CRIU 3.17 (Debian bookworm) cannot even start on Linux 6.13+,
whose x86 vDSO gained a `[vvar_vclock]` mapping (kernel commit e93d2521b27f; CRIU learned it in 4.1,
checkpoint-restore/criu#2532; infra/setup.d/31-criu.sh builds 4.1.1 where bookworm's cannot run). So the verdict
comes from running `criu check` once per process, and every refusal carries its reason.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import struct
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

CHECK_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class CriuVerdict:
    """The probe's answer: `works`, the CRIU binary and version found, and a reason a person can act on."""

    works: bool
    version: str
    reason: str
    path: str = ""


def _explain(output: str) -> str:
    """Turn `criu check`'s failure into a reason; the vDSO case is the one this project's hosts hit."""
    errors = [line.strip() for line in output.splitlines() if "Error" in line]
    detail = "; ".join(errors[-3:]) or output.strip()[-300:] or "no output"
    if "vdso" in output.lower():
        return (
            "criu cannot parse this kernel's vDSO layout (Linux 6.13+ splits [vvar] into [vvar] + [vvar_vclock]; "
            f"CRIU understands it from 4.1, checkpoint-restore/criu#2532): {detail}"
        )
    return f"criu check failed: {detail}"


def _version(criu: str) -> str:
    try:
        proc = subprocess.run([criu, "--version"], capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    first = proc.stdout.strip().splitlines()
    return first[0].removeprefix("Version:").strip() if first else ""


@functools.cache
def criu_probe() -> CriuVerdict:
    """Run `criu check` once per process (it costs ~50 ms and the answer only changes with the kernel or the
    package) and keep the verdict with its reason."""
    criu = shutil.which("criu")
    if criu is None:
        return CriuVerdict(False, "", "criu is not installed: run infra/setup.d/00-apt.sh (Debian package criu)")
    version = _version(criu)
    try:
        proc = subprocess.run([criu, "check"], capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return CriuVerdict(False, version, f"criu check did not finish within {CHECK_TIMEOUT_S:.0f}s", criu)
    if proc.returncode != 0:
        return CriuVerdict(False, version, f"criu {version}: {_explain(proc.stdout + proc.stderr)}", criu)
    return CriuVerdict(True, version, f"criu {version} ({criu}): criu check passed", criu)


@functools.cache
def runtime_criu_refusal(runtime: str, binary: str | None) -> str:
    """Why OCI runtime `runtime` (at `binary`) cannot checkpoint through CRIU ("" when it can). runc always links
    CRIU support in; crun only when built with libcriu, which its `--version` feature list tells (`+CRIU`):
    Debian bookworm's crun 1.8.1 is built without, setup's crun 1.21 (infra/setup.d/32-crun.sh) with."""
    if runtime == "runc":
        return ""
    if binary is None:
        return f"{runtime} is not installed"
    try:
        proc = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"'{binary} --version' failed: {exc}"
    if "+CRIU" in proc.stdout.split():
        return ""
    version = proc.stdout.splitlines()[0] if proc.stdout else runtime
    return (f"{binary} ({version}) is built without CRIU ('--version' lacks +CRIU; infra/setup.d/32-crun.sh builds "
            "one with it); create it with driver='runc'")


# ---- a checkpoint restored into another user-namespace id range (forks) ------------------------------------
# CRIU restores a user namespace with the id maps it dumped (userns-<id>.img: UsernsEntry{repeated UidGidExtent
# uid_map = 1, gid_map = 2}, UidGidExtent{first = 1, lower_first = 2, count = 3}, all varints). A fork runs in a
# host id range of its own (userns.py), so its copy of the images gets the maps moved to that range; the other
# images hold ids as seen inside the namespace and need nothing.
_IMAGE_HEAD = 8  # two u32 magics, then entries of u32 little-endian length + protobuf message


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of a protobuf message whose fields are varints or length-delimited."""
    fields: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
            fields.append((number, wire, value))
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            fields.append((number, wire, data[pos : pos + size]))
            pos += size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} in a CRIU userns image")
    return fields


def _encode(fields: list[tuple[int, int, int | bytes]]) -> bytes:
    out = bytearray()
    for number, wire, value in fields:
        out += _varint(number << 3 | wire)
        out += _varint(value) if isinstance(value, int) else _varint(len(value)) + value
    return bytes(out)


def _moved_extent(extent: bytes, old_base: int, new_base: int, size: int) -> bytes:
    moved = [
        (n, w, v - old_base + new_base if n == 2 and isinstance(v, int) and old_base <= v < old_base + size else v)
        for n, w, v in _fields(extent)
    ]
    return _encode(moved)


def move_userns_maps(image_dir: Path, old_base: int, new_base: int, size: int) -> int:
    """Rewrite the id maps of the user namespaces in a CRIU image dir from host range `old_base` to `new_base`
    (`size` ids each); returns how many images changed. Each image is written anew (a fork's image dir holds
    hard links to the source's images, which must stay as they are)."""
    changed = 0
    for image in sorted(image_dir.glob("userns-*.img")):
        data = image.read_bytes()
        out, pos = bytearray(data[:_IMAGE_HEAD]), _IMAGE_HEAD
        while pos < len(data):
            (length,) = struct.unpack_from("<I", data, pos)
            entry = data[pos + 4 : pos + 4 + length]
            pos += 4 + length
            moved = _encode([
                (n, w, _moved_extent(v, old_base, new_base, size) if n in (1, 2) and isinstance(v, bytes) else v)
                for n, w, v in _fields(entry)
            ])  # fmt: skip
            out += struct.pack("<I", len(moved)) + moved
        image.unlink()
        image.write_bytes(bytes(out))
        changed += 1
    return changed


if __name__ == "__main__":  # `python -m dsec.substrates.container.criu`: the verdict, for diagnostics
    verdict = criu_probe()
    print(json.dumps(asdict(verdict)))
    sys.exit(0 if verdict.works else 1)
