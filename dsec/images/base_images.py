"""Build the base images locally (no registry can be reached) and import them into the store.

`busybox`: one layer, the static busybox with its applet symlinks. `python`: two layers, a debootstrap
minbase bookworm and python3 (3.11, the host's version; --no-install-recommends) on top, so every sandbox test also
exercises layering. `base`: python plus E2B's default user, the `base` template of the E2B front door.
`code-interpreter`: python, IPython kernels and dsec's kernel server, the E2B `code-interpreter` template.
`cpp`: minbase and g++, the SandboxFusion door's C++ image. All are written as real OCI layouts under `<store>/base-cache/`, then imported; the slow
debootstrap is cached there, so a rerun with the image already imported is a no-op and a rebuild is quick.

CLI: `python -m dsec.images.base_images [busybox|python|base|code-interpreter|cpp|all]`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from dsec.config import ServerConfig
from dsec.errors import ImageNotFound, RuntimeFailure
from dsec.images.build import BuildSpec, build
from dsec.images.layout import DEFAULT_PATH, tar_paths, tar_tree, tree_diff, write_layout
from dsec.images.local import run_driver
from dsec.images.oci import START_COMMAND_LABEL
from dsec.images.store import ImageRecord, LayerStore

BUSYBOX_BIN = Path("/bin/busybox")
SUITE = "bookworm"
FALLBACK_MIRROR = "http://deb.debian.org/debian"
PYTHON_PACKAGE = "python3"  # not python3-minimal: that lacks json, resource, dataclasses the function worker needs
MTIME = 1_700_000_000  # fixed timestamps: the same inputs give the same digests
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


def _cache(store: LayerStore) -> Path:
    path = store.root / "base-cache"
    path.mkdir(exist_ok=True)
    return path


def _already(store: LayerStore, tag: str) -> ImageRecord | None:
    try:
        record = store.inspect(tag)
    except ImageNotFound:
        return None
    return record if all(store.has_layer(layer.diff_id) for layer in record.layers) else None


def _tarinfo(name: str, kind: bytes, mode: int, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname, info.mtime = kind, mode, size, linkname, MTIME
    return info


def _busybox_layer(out: Path) -> Path:
    """One layer: /bin/busybox, a symlink per applet, passwd/group, the usual empty directories."""
    if not BUSYBOX_BIN.is_file():
        raise RuntimeFailure(f"{BUSYBOX_BIN} is missing: install busybox-static (infra/setup.d/00-apt.sh)")
    applets = subprocess.run([str(BUSYBOX_BIN), "--list-full"], check=True, capture_output=True, text=True).stdout.split()
    dirs = {"bin": 0o755, "sbin": 0o755, "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755, "etc": 0o755,
            "tmp": 0o1777, "root": 0o700, "home": 0o755, "var": 0o755, "dev": 0o755, "proc": 0o555, "sys": 0o555}
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, mode in sorted(dirs.items()):
            tar.addfile(_tarinfo(name, tarfile.DIRTYPE, mode))
        data = BUSYBOX_BIN.read_bytes()
        tar.addfile(_tarinfo("bin/busybox", tarfile.REGTYPE, 0o755, len(data)), io.BytesIO(data))
        for applet in sorted(set(applets) - {"bin/busybox"}):
            if applet.rpartition("/")[0] in dirs:
                tar.addfile(_tarinfo(applet, tarfile.SYMTYPE, 0o777, linkname="/bin/busybox"))
        for name, text in (("etc/passwd", PASSWD), ("etc/group", GROUP)):
            body = text.encode()
            tar.addfile(_tarinfo(name, tarfile.REGTYPE, 0o644, len(body)), io.BytesIO(body))
    return out


def build_busybox(store: LayerStore, tag: str = "busybox") -> ImageRecord:
    """Import (or find already imported) the busybox image."""
    record = _already(store, tag)
    if record is not None:
        return record
    cache = _cache(store)
    layer = _busybox_layer(cache / f"busybox-layer.{os.getpid()}.tar")
    layout = write_layout(cache / "busybox-oci", [layer], {"Env": [DEFAULT_PATH], "Cmd": ["sh"]}, tag, ["busybox-static"])
    return store.import_oci_layout(layout, tag=tag)


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (only configured mirrors are reachable here)."""
    candidates: list[str] = []
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        candidates += re.findall(r"^URIs:\s*(\S+)", text, re.M)
        candidates += re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", text, re.M)
    for uri in candidates:
        if "security" not in uri and uri.startswith(("http://", "https://")):
            return uri
    return FALLBACK_MIRROR


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeFailure(f"{what} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")


def _debootstrap(cache: Path) -> Path:
    """A minbase bookworm tree, built once and kept (the debootstrap is the slow part)."""
    base = cache / "bookworm-minbase"
    if base.is_dir():  # only ever renamed into place once complete
        return base
    work = cache / f"bookworm-minbase.{os.getpid()}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    debs = cache / "debs"
    debs.mkdir(exist_ok=True)
    _run(["debootstrap", "--variant=minbase", f"--cache-dir={debs}", SUITE, str(work), debian_mirror()], "debootstrap")
    _clean_tree(work)
    os.rename(work, base)
    return base


def _clean_tree(root: Path) -> None:
    """Drop apt caches and logs that differ per build and only cost space."""
    for rel in ("var/cache/apt/archives", "var/lib/apt/lists", "var/log", "var/cache/debconf"):
        path = root / rel
        if not path.is_dir():
            continue
        for entry in path.iterdir():
            if entry.is_file() or entry.is_symlink():
                entry.unlink()
            elif entry.name != "partial":
                shutil.rmtree(entry)


def _with_python(base: Path, cache: Path, packages: tuple[str, ...] = (PYTHON_PACKAGE,)) -> Path:
    """`base` plus python3 (or `packages`) installed by apt inside a chroot (maintainer scripts run as on Debian)."""
    full = cache / f"bookworm-python.{os.getpid()}.tmp"
    shutil.rmtree(full, ignore_errors=True)
    _run(["cp", "-a", str(base), str(full)], "copying the minbase tree")
    resolv = full / "etc" / "resolv.conf"
    resolv.unlink(missing_ok=True)
    shutil.copyfile("/etc/resolv.conf", resolv)
    try:
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
        for cmd in (["apt-get", "-qq", "update"], ["apt-get", "-qq", "-y", "--no-install-recommends", "install", *packages],
                    ["apt-get", "clean"]):
            proc = subprocess.run(["chroot", str(full), *cmd], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeFailure(f"chroot {' '.join(cmd)} failed: {(proc.stderr or proc.stdout)[-2000:]}")
        resolv.unlink()
        if os.path.lexists(base / "etc" / "resolv.conf"):
            subprocess.run(["cp", "-a", str(base / "etc" / "resolv.conf"), str(resolv)], check=True)
        _clean_tree(full)
    except BaseException:
        shutil.rmtree(full, ignore_errors=True)
        raise
    return full


def build_python(store: LayerStore, tag: str = "python") -> ImageRecord:
    """Import (or find already imported) the two-layer python 3.11 image."""
    record = _already(store, tag)
    if record is not None:
        return record
    cache = _cache(store)
    base = _debootstrap(cache)
    full = _with_python(base, cache)
    try:
        base_tar = cache / f"python-base.{os.getpid()}.tar"
        tar_tree(base, base_tar)
        changed, deleted = tree_diff(base, full)
        top_tar = tar_paths(full, changed, cache / f"python-top.{os.getpid()}.tar", whiteouts=deleted)
    finally:
        shutil.rmtree(full, ignore_errors=True)
    runtime = {"Env": [DEFAULT_PATH, "LANG=C.UTF-8"], "Cmd": ["python3"]}
    layout = write_layout(cache / "python-oci", [base_tar, top_tar], runtime, tag,
                          ["debootstrap --variant=minbase bookworm", f"apt-get install {PYTHON_PACKAGE}"])
    return store.import_oci_layout(layout, tag=tag)


BASE_USER_COMMAND = "useradd --create-home --uid 1000 --user-group --shell /bin/bash user"


def build_base(store: LayerStore, tag: str = "base") -> ImageRecord:
    """E2B's `base` template: the python image (bash, coreutils, python3) plus E2B's default user `user`
    (uid 1000, home /home/user), which the envd API runs commands as unless told otherwise. One RUN step,
    built like any user image (docs/compat.md)."""
    record = _already(store, tag)
    if record is not None:
        return record
    build_python(store)
    return build(store, BuildSpec("python").run(BASE_USER_COMMAND), tag=tag, run_driver=run_driver).record


# The code-interpreter template: IPython kernels (Debian's ipykernel + jupyter_client) behind dsec's own kernel
# server. No data stack: Debian's numpy/pandas/matplotlib pull in scipy, sympy, boost and BLAS headers (1.4 GB);
# install what a task needs in the sandbox, or build an image on top of this one.
CODE_INTERPRETER_PACKAGES = (PYTHON_PACKAGE, "python3-ipykernel", "python3-jupyter-client")
KERNEL_SERVER = Path(__file__).with_name("kernel_server.py")
KERNEL_SERVER_PATH = "opt/dsec/kernel_server.py"


def build_code_interpreter(store: LayerStore, tag: str = "code-interpreter") -> ImageRecord:
    """E2B's `code-interpreter` template: python3 with IPython kernels and
    `kernel_server.py` (the routes `e2b-code-interpreter` calls on port 49999), E2B's user `user`, workdir
    /home/user. Its start command (label dev.dsec.start-command) starts the server and returns once it serves:
    the E2B door runs it at create (docs/ports.md). Two layers: the shared minbase, and everything else
    installed by apt in a chroot (no network inside a build sandbox)."""
    # the start command names a hash of the server and the package list, so an older image is rebuilt
    build_id = hashlib.sha256(KERNEL_SERVER.read_bytes() + " ".join(CODE_INTERPRETER_PACKAGES).encode()).hexdigest()
    build_id = build_id[:16]
    start = ["python3", f"/{KERNEL_SERVER_PATH}", "--daemon", "--build", build_id]
    record = _already(store, tag)
    if record is not None and record.config.start_command == start:
        return record
    cache = _cache(store)
    base = _debootstrap(cache)
    full = _with_python(base, cache, CODE_INTERPRETER_PACKAGES)
    try:
        _run(["chroot", str(full), *BASE_USER_COMMAND.split()], "adding the user `user`")
        server = full / KERNEL_SERVER_PATH
        server.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(KERNEL_SERVER, server)
        server.chmod(0o755)
        base_tar = cache / f"ci-base.{os.getpid()}.tar"
        tar_tree(base, base_tar)
        changed, deleted = tree_diff(base, full)
        top_tar = tar_paths(full, changed, cache / f"ci-top.{os.getpid()}.tar", whiteouts=deleted)
    finally:
        shutil.rmtree(full, ignore_errors=True)
    runtime = {"Env": [DEFAULT_PATH, "LANG=C.UTF-8"], "Cmd": ["python3"], "WorkingDir": "/home/user",
               "Labels": {START_COMMAND_LABEL: json.dumps(start)}}
    layout = write_layout(cache / "code-interpreter-oci", [base_tar, top_tar], runtime, tag,
                          ["debootstrap --variant=minbase bookworm",
                           f"apt-get install {' '.join(CODE_INTERPRETER_PACKAGES)}; {BASE_USER_COMMAND}; COPY kernel_server.py"])
    return store.import_oci_layout(layout, tag=tag)


# The SandboxFusion front door's C++ image (dsec/compat/fusion_runner.py): g++ on the shared minbase layer.
CPP_PACKAGES = ("g++",)


def build_cpp(store: LayerStore, tag: str = "cpp") -> ImageRecord:
    """minbase + g++ (Debian's, --no-install-recommends): what SandboxFusion's `cpp` language compiles with."""
    record = _already(store, tag)
    if record is not None:
        return record
    cache = _cache(store)
    base = _debootstrap(cache)
    full = _with_python(base, cache, CPP_PACKAGES)
    try:
        base_tar = cache / f"cpp-base.{os.getpid()}.tar"
        tar_tree(base, base_tar)
        changed, deleted = tree_diff(base, full)
        top_tar = tar_paths(full, changed, cache / f"cpp-top.{os.getpid()}.tar", whiteouts=deleted)
    finally:
        shutil.rmtree(full, ignore_errors=True)
    runtime = {"Env": [DEFAULT_PATH, "LANG=C.UTF-8"], "Cmd": ["bash"]}
    layout = write_layout(cache / "cpp-oci", [base_tar, top_tar], runtime, tag,
                          ["debootstrap --variant=minbase bookworm", f"apt-get install {' '.join(CPP_PACKAGES)}"])
    return store.import_oci_layout(layout, tag=tag)


BUILDERS = {"busybox": build_busybox, "python": build_python, "base": build_base, "code-interpreter": build_code_interpreter,
            "cpp": build_cpp}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", nargs="?", default="all", choices=[*BUILDERS, "all"])
    parser.add_argument("--quiet", action="store_true", help="print nothing for images already imported")
    args = parser.parse_args(argv)
    config = ServerConfig()
    store = LayerStore(config.images_dir, config.layer_format)
    try:
        for name in BUILDERS if args.which == "all" else [args.which]:
            before = _already(store, name)
            record = BUILDERS[name](store)  # each builder returns at once when its image is up to date
            if args.quiet and before is not None and before.digest == record.digest:
                continue
            print(f"{name}: {record.digest} ({len(record.layers)} layers, {record.size / 1e6:.1f} MB)")
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
