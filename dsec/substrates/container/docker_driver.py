"""The Docker Engine driver of the container substrate.

Why it exists next to crun/runc: some operators already run Docker and want dsec's sandboxes to show up
there. Docker only starts and stops the container; exec, sessions and files go through the same in-sandbox
agent as every other substrate (bind-mounted read-only at /.dsec/agent and run as the container's PID 1), so
behaviour is identical and exec costs an agent round trip instead of a `docker exec` (~80 ms here).

Snapshots are filesystem snapshots: a tar of the container's writable overlay layer (overlay whiteouts and opaque
markers included), taken while the container is frozen, and unpacked into a new container's writable layer
before it starts. So a snapshot is one self-contained file in the snapshot directory, proportional to what the
sandbox changed, and leaves nothing in the engine.

Root in a container is not root on the host: dsec's engine remaps every container's ids into one unprivileged
host range (`dockerd.py`). So the agent's socket dir is owned by the mapped root, volumes are bound through an
idmapped view (0 → the range, as for crun/runc: a volume keeps in-sandbox ids on disk), and snapshots and
restores go through an idmapped view of the writable layer that shifts back, so an archive holds the sandbox's
own ids and stays interchangeable with crun/runc snapshots. An engine that does not remap (`$DOCKER_HOST`) gets
none of these views.

Every container carries the labels `dsec.sandbox=<id>` and `dsec.state_dir=<dir>`, so a server restarted
after kill -9 finds and removes what its predecessor left, from the state directory alone.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import docker.errors

from dsec.agent.build import agent_binary
from dsec.agent.client import AgentClient
from dsec.config import ServerConfig
from dsec.errors import DiskFull, RuntimeFailure, SandboxStateError, SnapshotNotFound, Unsupported
from dsec.images.user import resolve_user
from dsec.models import PauseKind, SandboxSpec
from dsec.substrates.agent_sandbox import AgentSandbox
from dsec.substrates.base import DriverSandbox, ImageRootfs, SandboxDriver, snapshot_target_full, volume_source
from dsec.substrates.container import cgroups, docker_disk, idmap, network
from dsec.substrates.container.docker_images import ensure_image
from dsec.substrates.container.dockerd import ensure_engine, remap_base
from dsec.substrates.container.rootfs import mounts_under, unmount

SANDBOX_LABEL = "dsec.sandbox"
STATE_DIR_LABEL = "dsec.state_dir"
AGENT_PATH = "/.dsec/agent"
AGENT_RUN_DIR = "/.dsec/run"
AGENT_SOCKET = "agent.sock"
AGENT_START_TIMEOUT_S = 20.0
ADOPT_PROBE_S = 5.0  # a live agent answers a ping in milliseconds; one that does not within this is not re-adopted
# Capabilities a sandbox never needs on top of Docker's default set: raw sockets (spoofing), device nodes,
# audit records and file capabilities (a way to regain privileges after no-new-privileges).
DROPPED_CAPS = ["NET_RAW", "MKNOD", "AUDIT_WRITE", "SETFCAP"]
MEMORY_CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
SNAPSHOT_ARCHIVE = "docker-upper.tar"
# crun/runc snapshots are the same layout (an overlay upper dir as tar), so either restores here.
SNAPSHOT_ARCHIVES = (SNAPSHOT_ARCHIVE, "upper.tar")
SNAPSHOT_TIMEOUT_S = 600.0
VOLUME_VIEWS = "volumes"  # <state dir>/volumes/<i>: idmapped views of the sandbox's volumes on a remapping engine
# Overlay keeps deletions as 0/0 character devices and opaque directories as trusted.overlay.* xattrs.
_TAR_LAYER = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=trusted.overlay.*"]


def _container_name(sandbox_id: str) -> str:
    return f"dsec-{sandbox_id}"


def _memory_cgroup_dir(pid: int) -> Path | None:
    """The host directory of `pid`'s cgroup v1 memory controller (None on a cgroup v2-only host)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return MEMORY_CGROUP_ROOT / path.lstrip("/")
    for line in lines:
        if line.startswith("0::"):
            return Path("/sys/fs/cgroup") / line[3:].lstrip("/")
    return None


def _read_oom_kills(cgroup_dir: Path) -> int:
    for name, key in (("memory.oom_control", "oom_kill"), ("memory.events", "oom_kill")):
        try:
            text = (cgroup_dir / name).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            field, _, value = line.partition(" ")
            if field == key:
                return int(value)
    return -1


class _OomFile(cgroups.OomKillFile):
    """A Docker container's OOM kill counter, kept open as crun/runc's is (`cgroups.OomKillFile`)."""

    def __init__(self, cgroup_dir: Path) -> None:
        self.cgroup_dir = cgroup_dir
        super().__init__(cgroup_dir / name for name in ("memory.oom_control", "memory.events"))


class DockerSandbox(AgentSandbox):
    """A Docker container whose PID 1 is the dsec agent."""

    def __init__(
        self, sandbox_id: str, client: AgentClient, container: str, api: docker.APIClient, spec: SandboxSpec,
        state_dir: Path | None = None, host_base: int | None = None, bin_dir: Path | None = None,
    ) -> None:  # fmt: skip
        super().__init__(sandbox_id, client)
        self.container = container
        self.state_dir = state_dir  # holds the sandbox's disk image and the egress allowlist's network record
        self.host_base = host_base  # the host uid of the container's root when the engine remaps, else None
        self._bin_dir = bin_dir
        self._api = api
        self._memory_mb = spec.resources.memory_mb
        self._cgroup_dir: Path | None = None
        self._cgroup_lock = threading.Lock()
        self._oom_file: _OomFile | None = None

    def _cgroup(self) -> Path | None:
        with self._cgroup_lock:
            if self._cgroup_dir is None:
                try:
                    pid = self._api.inspect_container(self.container)["State"]["Pid"]
                except docker.errors.NotFound:
                    return None
                if pid:
                    self._cgroup_dir = _memory_cgroup_dir(pid)
            return self._cgroup_dir

    def oom_kill_count(self) -> int:
        cgroup = self._cgroup()
        if cgroup is not None:
            oom_file = self._oom_file
            if oom_file is None or oom_file.cgroup_dir != cgroup:
                oom_file = self._oom_file = _OomFile(cgroup)
            kills = oom_file.read()
            if kills >= 0:
                return kills
            self._oom_file = None  # gone or unreadable: opened afresh next time
            kills = _read_oom_kills(cgroup)
            if kills >= 0:
                return kills
        try:
            return int(bool(self._api.inspect_container(self.container)["State"]["OOMKilled"]))
        except docker.errors.NotFound:
            return -1

    def memory_limit_mb(self) -> int:
        return self._memory_mb

    def netns_path(self) -> Path:
        """The network namespace of the container's PID 1, as Docker reports it."""
        try:
            pid = self._api.inspect_container(self.container)["State"]["Pid"]
        except docker.errors.NotFound:
            pid = 0
        if not pid:
            raise SandboxStateError(f"the container of sandbox {self.sandbox_id} is not running")
        return Path(f"/proc/{pid}/ns/net")

    def check_pause(self, kind: PauseKind) -> None:
        if kind != "freeze":
            raise Unsupported(
                f"the docker driver pauses sandbox {self.sandbox_id} by freezing only (Docker's checkpoint is "
                "experimental); use driver crun or runc for pause(memory=...)"
            )

    def pause(self, kind: PauseKind = "freeze") -> None:
        self.check_pause(kind)
        try:
            self._api.pause(self.container)
        except docker.errors.APIError as exc:
            raise SandboxStateError(f"cannot pause sandbox {self.sandbox_id}: {exc.explanation}") from exc

    def resume(self) -> None:
        try:
            self._api.unpause(self.container)
        except docker.errors.APIError as exc:
            raise SandboxStateError(f"cannot resume sandbox {self.sandbox_id}: {exc.explanation}") from exc

    def snapshot(self, dest: Path) -> str:
        """Tar the writable layer into `dest` while the container is frozen (a paused sandbox stays paused)."""
        try:
            info = self._api.inspect_container(self.container)
        except docker.errors.NotFound as exc:
            raise SandboxStateError(f"the container of sandbox {self.sandbox_id} is gone; cannot snapshot it") from exc
        upper = _upper_dir(info, self.sandbox_id)
        dest.mkdir(parents=True, exist_ok=True)
        was_paused = info["State"]["Paused"]
        if not was_paused:
            self.pause()
        try:
            with _own_ids(upper, self.host_base, self._bin_dir, self.state_dir or dest) as layer:
                _run_tar([*_TAR_LAYER, "--exclude=./.dsec", "-C", str(layer), "-cf", str(dest / SNAPSHOT_ARCHIVE), "."], self.sandbox_id, "snapshot")
        except RuntimeFailure as exc:
            if snapshot_target_full(dest):  # tar says only "Wrote only N of M bytes" when ENOSPC cut it short
                raise DiskFull(
                    f"snapshot of sandbox {self.sandbox_id}: no space left in {dest}: free space or delete snapshots",
                    sandbox_id=self.sandbox_id,
                ) from exc
            raise
        finally:
            if not was_paused:
                self.resume()
        return "filesystem"


def _upper_dir(info: dict, sandbox_id: str) -> Path:
    graph = info.get("GraphDriver", {})
    upper = graph.get("Data", {}).get("UpperDir") if graph.get("Name") == "overlay2" else None
    if not upper:
        raise RuntimeFailure(
            f"sandbox {sandbox_id}: snapshots need Docker's overlay2 storage driver, the engine uses {graph.get('Name')!r}",
            sandbox_id=sandbox_id,
        )
    return Path(upper)


@contextlib.contextmanager
def _own_ids(upper: Path, base: int | None, bin_dir: Path | None, scratch: Path) -> Iterator[Path]:
    """`upper` as the sandbox sees its ids: through an idmapped view (base → 0) below `scratch` on a remapping
    engine, as is otherwise."""
    if base is None or bin_dir is None:
        yield upper
        return
    with idmap.own_ids_view(bin_dir, upper, base, Path(tempfile.mkdtemp(prefix="view-", dir=scratch))) as view:
        yield view


def _unmount_volume_views(state_dir: Path) -> None:
    views = state_dir / VOLUME_VIEWS
    for mount_point in mounts_under(views):  # deepest first
        unmount(mount_point)


def _run_tar(argv: list[str], sandbox_id: str, what: str) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=SNAPSHOT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeFailure(f"{what} of sandbox {sandbox_id} took over {SNAPSHOT_TIMEOUT_S:.0f}s", sandbox_id=sandbox_id) from exc
    if proc.returncode != 0:
        raise RuntimeFailure(
            f"{what} of sandbox {sandbox_id} failed: {proc.stderr.decode(errors='replace').strip()}", sandbox_id=sandbox_id
        )


class DockerDriver(SandboxDriver):
    """Creates sandboxes as Docker containers on dsec's engine (or `$DOCKER_HOST`)."""

    name = "docker"
    substrate = "container"

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        base_url = ensure_engine(config.home)
        # No timeout on the HTTP client: image imports stream for as long as the image is big; every call
        # that could block (container start, agent connect) has its own deadline below.
        self.client = docker.DockerClient(base_url=base_url, timeout=None, version="auto")
        self.api: docker.APIClient = self.client.api
        self.host_base = remap_base(self.client.info())
        self.agent_path = agent_binary(config.bin_dir)
        self.disk_templates = config.home / "cache" / "disk-templates"
        self.volumes_dir = config.volumes_dir

    def _host_config(self, spec: SandboxSpec, run_dir: Path, state_dir: Path, hosts: Path | None = None) -> dict:
        res = spec.resources
        binds = {
            str(self.agent_path): {"bind": AGENT_PATH, "mode": "ro"},
            str(run_dir): {"bind": AGENT_RUN_DIR, "mode": "rw"},
        }
        if hosts is not None:  # an egress allowlist's names, resolved on the host: the sandbox has no DNS
            binds[str(hosts)] = {"bind": "/etc/hosts", "mode": "ro"}
        for index, volume in enumerate(spec.volumes):  # mounted on the host by the server, which holds it for us
            source = volume_source(self.volumes_dir, volume.name)
            if self.host_base is not None:  # its files keep in-sandbox ids on disk, shown to the range
                view = state_dir / VOLUME_VIEWS / str(index)
                idmap.bind(self.config.bin_dir, source, view, 0, self.host_base, readonly=volume.read_only)
                source = view
            binds[str(source)] = {"bind": volume.mount_path, "mode": "ro" if volume.read_only else "rw"}
        return self.api.create_host_config(
            binds=binds,
            mem_limit=res.memory_mb << 20,
            memswap_limit=res.memory_mb << 20,
            pids_limit=res.pids,
            nano_cpus=int(res.cpu * 1e9),
            network_mode="host" if spec.network else "none",
            cap_drop=DROPPED_CAPS,
            security_opt=["no-new-privileges"],
            ulimits=[docker.types.Ulimit(name="nofile", soft=4096, hard=4096)],
        )

    def create(self, sandbox_id: str, spec: SandboxSpec, image: ImageRootfs, state_dir: Path) -> DockerSandbox:
        return self._launch(sandbox_id, spec, image, state_dir)

    def restore(self, sandbox_id: str, spec: SandboxSpec, image: ImageRootfs, snapshot: Path, state_dir: Path) -> DockerSandbox:
        """A new container of the same image whose writable layer is the snapshot's (docker, crun or runc), unpacked
        before it starts."""
        archive = next((snapshot / name for name in SNAPSHOT_ARCHIVES if (snapshot / name).is_file()), None)
        if archive is None:
            raise SnapshotNotFound(
                f"{snapshot} holds no filesystem snapshot (taken by a VM driver?); restore it with the substrate that "
                "took it",
                sandbox_id=sandbox_id,
            )

        def unpack(container: str) -> None:
            upper = _upper_dir(self.api.inspect_container(container), sandbox_id)
            with _own_ids(upper, self.host_base, self.config.bin_dir, state_dir) as layer:
                _run_tar([*_TAR_LAYER, "-C", str(layer), "-xpf", str(archive)], sandbox_id, "restore")

        return self._launch(sandbox_id, spec, image, state_dir, before_start=unpack)

    def _launch(
        self, sandbox_id: str, spec: SandboxSpec, image: ImageRootfs, state_dir: Path, before_start: Callable[[str], None] | None = None
    ) -> DockerSandbox:
        user = resolve_user(image.config.user, list(image.lower_dirs), sandbox_id)  # the image's USER, for every spawn
        tag = ensure_image(self.client, image)
        run_dir = state_dir / "agent-run"
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.host_base is not None:  # the agent, root in the container, binds its socket here
            os.chown(run_dir, self.host_base, self.host_base)
        env = dict(e.split("=", 1) for e in image.config.env if "=" in e) | spec.env
        hosts = network.prepare(sandbox_id, spec.network_allow, state_dir) if spec.network_allow else None
        try:
            host_config = self._host_config(spec, run_dir, state_dir, hosts)
            container = self.api.create_container(
                tag,
                entrypoint=[AGENT_PATH, "--listen", f"{AGENT_RUN_DIR}/{AGENT_SOCKET}"],
                command=[],
                environment=env,
                working_dir=spec.workdir or image.config.workdir or "/",
                hostname="sandbox",
                labels={SANDBOX_LABEL: sandbox_id, STATE_DIR_LABEL: str(state_dir.resolve())},
                host_config=host_config,
                name=_container_name(sandbox_id),
                network_disabled=not spec.network,
            )["Id"]
        except docker.errors.APIError as exc:
            _unmount_volume_views(state_dir)
            raise RuntimeFailure(f"docker could not create sandbox {sandbox_id}: {exc.explanation}", sandbox_id=sandbox_id) from exc
        except BaseException:
            _unmount_volume_views(state_dir)
            raise
        try:
            layer = _upper_dir(self.api.inspect_container(container), sandbox_id).parent
            docker_disk.attach(layer, state_dir, spec.resources.disk_mb, sandbox_id, self.disk_templates)
            if before_start is not None:
                before_start(container)
            self.api.start(container)
            if spec.network_allow:  # the container's own netns (network_mode none) gets the allowlisted link
                network.connect(state_dir, self.api.inspect_container(container)["State"]["Pid"])
            client = AgentClient.connect_unix(run_dir / AGENT_SOCKET, timeout_s=AGENT_START_TIMEOUT_S, sandbox_id=sandbox_id)
        except BaseException as exc:
            why = self._why_not_running(container)
            self._remove(container)
            docker_disk.remove(state_dir)
            _unmount_volume_views(state_dir)
            network.teardown(state_dir)
            if isinstance(exc, docker.errors.APIError):
                raise RuntimeFailure(f"docker could not start sandbox {sandbox_id}: {exc.explanation}", sandbox_id=sandbox_id) from exc
            if isinstance(exc, RuntimeFailure) and why:
                raise RuntimeFailure(f"{exc.message}; container: {why}", sandbox_id=sandbox_id) from exc
            raise
        sandbox = DockerSandbox(sandbox_id, client, container, self.api, spec, state_dir, self.host_base, self.config.bin_dir)
        sandbox.user = user
        return sandbox

    def adopt(self, sandbox_id: str, spec: SandboxSpec, image: ImageRootfs, state_dir: Path, paused: bool) -> DockerSandbox:
        """A new handle on a container a dead server left running (dsec's Docker engine keeps it): it must be
        running (a paused one is unpaused for the probe and paused again) and its agent must answer a ping."""
        found = self.api.containers(all=True, quiet=True, filters={"label": f"{STATE_DIR_LABEL}={state_dir.resolve()}"})
        if len(found) != 1:
            raise RuntimeFailure(f"sandbox {sandbox_id} has {len(found)} containers, not one", sandbox_id=sandbox_id)
        container = found[0]["Id"]
        state = self.api.inspect_container(container)["State"]
        if not state.get("Running"):
            raise RuntimeFailure(f"the container of sandbox {sandbox_id} is {state.get('Status')}", sandbox_id=sandbox_id)
        if state.get("Paused"):
            self.api.unpause(container)
        socket_path = state_dir / "agent-run" / AGENT_SOCKET
        client = AgentClient.connect_unix(socket_path, timeout_s=ADOPT_PROBE_S, sandbox_id=sandbox_id)
        sandbox = DockerSandbox(sandbox_id, client, container, self.api, spec, state_dir, self.host_base, self.config.bin_dir)
        try:
            sandbox.user = resolve_user(image.config.user, list(image.lower_dirs), sandbox_id)
            if paused:
                sandbox.pause()
        except BaseException:
            client.close()
            raise
        return sandbox

    def _why_not_running(self, container: str) -> str:
        """The container's state and last log lines, for the error of a create that failed."""
        try:
            state = self.api.inspect_container(container)["State"]
            logs = self.api.logs(container, tail=5).decode(errors="replace").strip()
        except docker.errors.APIError:
            return ""
        return f"status={state.get('Status')} exit={state.get('ExitCode')} error={state.get('Error')!r} log={logs!r}"

    def _remove(self, container: str) -> None:
        try:
            self.api.remove_container(container, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: removal already in progress elsewhere
                raise RuntimeFailure(f"docker could not remove container {container[:12]}: {exc.explanation}") from exc
            self._wait_gone(container)

    def _wait_gone(self, container: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.api.inspect_container(container)
            except docker.errors.NotFound:
                return
            time.sleep(0.05)
        raise RuntimeFailure(f"container {container[:12]} is still there {timeout_s:.0f}s after its removal started")

    def destroy(self, sandbox: DriverSandbox) -> None:
        assert isinstance(sandbox, DockerSandbox)
        sandbox.close()
        self._remove(sandbox.container)
        if sandbox.state_dir is not None:
            docker_disk.remove(sandbox.state_dir)
            _unmount_volume_views(sandbox.state_dir)
            network.teardown(sandbox.state_dir)

    def cleanup_state_dir(self, state_dir: Path) -> None:
        for container in self.api.containers(all=True, quiet=True, filters={"label": f"{STATE_DIR_LABEL}={state_dir.resolve()}"}):
            self._remove(container["Id"])
        docker_disk.remove(state_dir)
        _unmount_volume_views(state_dir)
        network.teardown(state_dir)
