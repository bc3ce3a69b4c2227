"""Build images from a base plus steps (RUN, COPY, ENV, WORKDIR, USER), one cached layer per step.

Each step's result is an image in the store, found again by the hash of (parent digest, step, inputs): an
unchanged prefix costs one SQLite lookup per step, so a rebuild after editing the last step only runs that
step. RUN executes in a real container sandbox (crun) on the parent image; its overlay upper dir, with
overlay whiteouts turned back into OCI `.wh.` entries, becomes the step's layer. ENV/WORKDIR/USER only change
the config (no layer), COPY makes a layer from the build context.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import stat
import tarfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dsec.agent.events import Exited, Output
from dsec.errors import InvalidSpec, RuntimeFailure
from dsec.images import oci
from dsec.images.layout import file_sha256
from dsec.images.store import ImageRecord, LayerStore
from dsec.images.types import ImageConfig, ImageRootfs
from dsec.models import SandboxSpec

INSTRUCTIONS = ("FROM", "RUN", "COPY", "ENV", "WORKDIR", "USER")
RUN_DRIVER = "crun"
RUN_TIMEOUT_S = 1800.0
OUTPUT_TAIL = 4000
_AGENT_DIR = ".dsec"  # the in-sandbox agent's private dir in the upper layer; never part of an image


class RunDriver(Protocol):
    """What a RUN step needs of a sandbox driver (the `RUN_DRIVER` one). The caller passes it in: images/ sits
    below the substrates, so the server or a command-line entry point picks the driver."""

    def create(self, sandbox_id: str, spec: SandboxSpec, image: ImageRootfs, state_dir: Path) -> Any: ...

    def destroy(self, sandbox: Any) -> None: ...

    def cleanup_state_dir(self, state_dir: Path) -> None: ...


@dataclass(frozen=True)
class Step:
    op: str  # RUN | COPY | ENV | WORKDIR | USER
    args: tuple[str, ...]

    def canonical(self) -> str:
        return json.dumps([self.op, list(self.args)])


@dataclass
class BuildSpec:
    """The Python equivalent of a Dockerfile: `BuildSpec("busybox").run("…").env(A="1").copy("src", "/dst")`."""

    base: str
    steps: list[Step] = field(default_factory=list)

    def run(self, command: str | list[str]) -> "BuildSpec":
        args = tuple(command) if isinstance(command, list) else ("/bin/sh", "-c", command)
        self.steps.append(Step("RUN", args))
        return self

    def copy(self, src: str, dest: str) -> "BuildSpec":
        self.steps.append(Step("COPY", (src, dest)))
        return self

    def env(self, **values: str) -> "BuildSpec":
        for key, value in values.items():
            self.steps.append(Step("ENV", (key, value)))
        return self

    def workdir(self, path: str) -> "BuildSpec":
        self.steps.append(Step("WORKDIR", (path,)))
        return self

    def user(self, user: str) -> "BuildSpec":
        self.steps.append(Step("USER", (user,)))
        return self


def parse_dockerfile(text: str) -> BuildSpec:
    """The Dockerfile subset: FROM, RUN (shell or JSON form), COPY, ENV (k=v… or k v), WORKDIR, USER."""
    lines, pending = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    if pending:
        lines.append(pending)
    spec: BuildSpec | None = None
    for number, line in enumerate(lines, 1):
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op not in INSTRUCTIONS:
            raise InvalidSpec(f"Dockerfile instruction {number} {op!r} is not supported: use one of {', '.join(INSTRUCTIONS)}")
        if not rest:
            raise InvalidSpec(f"Dockerfile instruction {number} {op} has no arguments")
        if op == "FROM":
            if spec is not None:
                raise InvalidSpec("multi-stage Dockerfiles (a second FROM) are not supported")
            spec = BuildSpec(rest.split()[0])
            continue
        if spec is None:
            raise InvalidSpec(f"Dockerfile instruction {number} {op} comes before FROM")
        if op == "RUN":
            spec.run(_json_list(rest, number) if rest.startswith("[") else rest)
        elif op == "COPY":
            parts = _json_list(rest, number) if rest.startswith("[") else shlex.split(rest)
            if len(parts) != 2 or parts[0].startswith("--"):
                raise InvalidSpec(f"Dockerfile COPY {number}: exactly one source and one destination, no flags")
            spec.copy(parts[0], parts[1])
        elif op == "ENV":
            pairs = shlex.split(rest)
            if all("=" in p for p in pairs):
                spec.env(**dict(p.split("=", 1) for p in pairs))
            else:
                key, _, value = rest.partition(" ")
                spec.env(**{key: value.strip()})
        elif op == "WORKDIR":
            spec.workdir(rest)
        else:
            spec.user(rest)
    if spec is None:
        raise InvalidSpec("Dockerfile has no FROM")
    return spec


def _json_list(text: str, number: int) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidSpec(f"Dockerfile instruction {number}: bad JSON array: {exc}") from exc
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise InvalidSpec(f"Dockerfile instruction {number}: expected a non-empty JSON array of strings")
    return value


def _context_path(context: Path, src: str) -> Path:
    path = (context / src).resolve()
    if not path.is_relative_to(context.resolve()):
        raise InvalidSpec(f"COPY source {src!r} is outside the build context {context}")
    if not path.exists():
        raise InvalidSpec(f"COPY source {src!r} does not exist in the build context {context}")
    return path


def _inputs_hash(context: Path | None, step: Step) -> str:
    """For COPY, the content, mode and names of every source file (so an edited file misses the cache)."""
    if step.op != "COPY":
        return ""
    if context is None:
        raise InvalidSpec("COPY needs a build context directory")
    root = _context_path(context, step.args[0])
    h = hashlib.sha256()
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*"))
    for path in paths:
        st = path.lstat()
        h.update(f"{path.relative_to(root.parent)}\0{st.st_mode}\0".encode())
        if path.is_symlink():
            h.update(os.readlink(path).encode())
        elif path.is_file():
            h.update(file_sha256(path)[0].encode())
    return h.hexdigest()


def _copy_layer(context: Path, step: Step, out: Path) -> Path:
    src, dest = _context_path(context, step.args[0]), step.args[1]
    if not dest.startswith("/"):
        raise InvalidSpec(f"COPY destination {dest!r} must be absolute (WORKDIR-relative COPY is not supported)")
    target = dest.strip("/")
    if src.is_file() and dest.endswith("/"):
        target = f"{target}/{src.name}".strip("/")
    if ".." in target.split("/"):
        raise InvalidSpec(f"COPY destination {dest!r} contains '..'")

    def owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        parts = target.split("/")[:-1] if target else []
        for i in range(len(parts)):
            info = tarfile.TarInfo("/".join(parts[: i + 1]))
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(src, arcname=target or ".", filter=owned_by_root)
    return out


def upper_to_layer(upper: Path, out: Path) -> Path:
    """Tar an overlay upper dir as an OCI layer: 0/0 char devices → `.wh.x`, opaque dirs → `.wh..wh..opq`."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirs, files in os.walk(upper):
            rel_dir = os.path.relpath(dirpath, upper)
            rel_dir = "" if rel_dir == "." else rel_dir
            if rel_dir == "":
                dirs[:] = [d for d in dirs if d != _AGENT_DIR]
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                rel = f"{rel_dir}/{name}" if rel_dir else name
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    marker = tarfile.TarInfo(f"{rel_dir}/.wh.{name}" if rel_dir else f".wh.{name}")
                    tar.addfile(marker)
                    continue
                if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISSOCK(st.st_mode):
                    continue
                tar.add(full, arcname=rel, recursive=False)
                if stat.S_ISDIR(st.st_mode) and _is_opaque(full):
                    tar.addfile(tarfile.TarInfo(f"{rel}/.wh..wh..opq"))
    return out


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def _run_step(
    store: LayerStore, parent: str, step: Step, config: ImageConfig, out: Path, run_driver: Callable[[], RunDriver] | None
) -> Path:
    """Run a RUN step in a fresh crun sandbox on `parent`; its writable layer becomes the step's layer."""
    if run_driver is None:
        raise InvalidSpec(f"build step RUN {shlex.join(step.args)} needs a sandbox driver: pass build(run_driver=...)")
    driver = run_driver()
    sandbox_id = f"build-{uuid.uuid4().hex[:12]}"
    state_dir = store.new_tmp("-build")
    state_dir.mkdir()
    spec = SandboxSpec(image=parent, substrate="container", driver=RUN_DRIVER, timeout_s=RUN_TIMEOUT_S)
    env = dict(e.split("=", 1) for e in config.env if "=" in e)
    try:
        sandbox = driver.create(sandbox_id, spec, store.acquire(parent, sandbox_id), state_dir)
    except BaseException:
        store.release(sandbox_id)
        driver.cleanup_state_dir(state_dir)
        raise
    try:
        output = bytearray()
        exit_code = None
        process = sandbox.spawn(list(step.args), env, config.workdir or "/")
        for event in process.events():
            if isinstance(event, Output):
                output += event.data
                del output[:-OUTPUT_TAIL]
            elif isinstance(event, Exited):
                exit_code = event.exit_code if not event.signal else 128 + event.signal
        if exit_code != 0:
            raise InvalidSpec(
                f"build step RUN {shlex.join(step.args)} failed with exit code {exit_code}: "
                f"{output.decode(errors='replace')[-OUTPUT_TAIL:]}"
            )
        return upper_to_layer(sandbox.writable_layer(), out)
    finally:
        try:
            driver.destroy(sandbox)
        finally:
            driver.cleanup_state_dir(state_dir)
            store.release(sandbox_id)  # lets erofs layer mounts of the parent go


def _child_image(store: LayerStore, parent: ImageRecord, step: Step, layer_tar: Path | None) -> ImageRecord:
    config = oci.load_json(store.read_blob(parent.config_digest), "image config")
    inner = config.setdefault("config", {})
    layers = [oci.Descriptor(layer.media_type, layer.blob_digest, layer.size) for layer in parent.layers]
    if step.op == "ENV":
        key, value = step.args
        inner["Env"] = [e for e in inner.get("Env") or [] if e.split("=", 1)[0] != key] + [f"{key}={value}"]
    elif step.op == "WORKDIR":
        inner["WorkingDir"] = step.args[0] if step.args[0].startswith("/") else f"{inner.get('WorkingDir') or '/'}/{step.args[0]}"
    elif step.op == "USER":
        inner["User"] = step.args[0]
    if layer_tar is not None:
        diff_id, size = file_sha256(layer_tar)

        def opener():
            return open(layer_tar, "rb")

        info = store.ensure_layer(diff_id, diff_id, opener, limit=size)
        layers.append(oci.Descriptor(info.media_type, info.blob_digest, info.size))
        config.setdefault("rootfs", {"type": "layers", "diff_ids": []})["diff_ids"].append(diff_id)
    config.setdefault("history", []).append({"created_by": f"{step.op} {shlex.join(step.args)}",
                                             **({} if layer_tar else {"empty_layer": True})})
    config_bytes = oci.dumps(config)
    manifest = oci.build_manifest(oci.Descriptor(oci.MT_CONFIG, "sha256:" + hashlib.sha256(config_bytes).hexdigest(),
                                                 len(config_bytes)), layers)
    return store.add_image(manifest, config_bytes, [], source=f"build:{step.op}")


@dataclass
class BuildResult:
    record: ImageRecord
    steps_cached: int
    steps_run: int


def build(
    store: LayerStore,
    spec: BuildSpec,
    tag: str | None = None,
    context: Path | None = None,
    run_driver: Callable[[], RunDriver] | None = None,
) -> BuildResult:
    """Build `spec` step by step, reusing every cached step whose (parent, step, inputs) is unchanged.

    `run_driver` returns the `RUN_DRIVER` driver; it is called only when a RUN step is not cached, so a build of
    cached or config-only steps needs no container runtime."""
    with store.lock("gc", shared=True):
        current = store.inspect(spec.base)
        cached = ran = 0
        for step in spec.steps:
            key = hashlib.sha256(f"{current.digest}\0{step.canonical()}\0{_inputs_hash(context, step)}".encode()).hexdigest()
            hit = store.cache_get(key)
            if hit is not None:
                current = store.get(hit)
                cached += 1
                continue
            layer_tar = None
            work = store.new_tmp("-step.tar")
            try:
                if step.op == "RUN":
                    layer_tar = _run_step(store, current.digest, step, current.config, work, run_driver)
                elif step.op == "COPY":
                    layer_tar = _copy_layer(context, step, work)  # type: ignore[arg-type]
                current = _child_image(store, current, step, layer_tar)
            except OSError as exc:
                raise RuntimeFailure(f"build step {step.op} {shlex.join(step.args)} failed: {exc}") from exc
            finally:
                work.unlink(missing_ok=True)
            store.cache_put(key, current.digest)
            ran += 1
        if tag:
            current = store.tag(current.digest, tag)
    return BuildResult(current, cached, ran)
