"""The container substrate on an OCI runtime (crun or runc): overlay rootfs, bundle, runtime, agent.

Create = record what will exist (sandbox.json), mount the overlay, write config.json, `run --detach`, connect
to the agent's socket. Destroy and crash cleanup run the same teardown from the record, so a sandbox is removed
completely whether its server is alive, died mid-create, or was killed -9.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dsec.agent.build import agent_binary
from dsec.agent.client import AgentClient, connect_socket
from dsec.config import ServerConfig
from dsec.errors import DiskFull, DsecError, InvalidSpec, RuntimeFailure, SandboxStateError, SnapshotNotFound, Unsupported
from dsec.images.user import resolve_user
from dsec.models import PauseKind, SandboxSpec
from dsec.substrates.agent_sandbox import AgentSandbox
from dsec.substrates.base import DriverSandbox, ImageRootfs, SandboxDriver, Usage, snapshot_target_full, volume_source
from dsec.substrates.container import bundle, cgroups, disk, idmap, network, rootfs, spares, trash, userns, volatile
from dsec.substrates.container.criu import criu_probe, move_userns_maps, runtime_criu_refusal
from dsec.substrates.container.record import ContainerRecord
from dsec.substrates.container.runtime import RUNTIMES, OciRuntime

AGENT_START_TIMEOUT_S = 30.0
ADOPT_PROBE_S = 5.0  # a live agent answers a ping in milliseconds; one that does not within this is not re-adopted
KILL_WAIT_S = 10.0  # after that, `delete --force` takes over
PID_FILE = "container.pid"
AGENT_NAME = "dsec-agent"  # the sandbox's own link to the agent binary (_pinned_agent)
CHECKPOINT_DIR = "checkpoint"  # a memory pause's CRIU images (runc checkpoint)
PAUSED_AS = "paused-as"  # "memory" or "files" while no container runs: what a successor server re-adopts
SNAPSHOT_ARCHIVE = "upper.tar"
# a Docker-driver snapshot has the same layout (an overlay upper dir as tar), so either restores here
SNAPSHOT_ARCHIVES = (SNAPSHOT_ARCHIVE, "docker-upper.tar")
SNAPSHOT_TIMEOUT_S = 600.0
LAYER_VIEW = "layer-view"  # writable_layer()'s idmapped view of a user-namespaced sandbox's upper dir
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes
# Overlay keeps deletions as 0/0 character devices and opaque directories as trusted.overlay.* xattrs.
_TAR_LAYER = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=trusted.overlay.*"]


def _run_tar(argv: list[str], sandbox_id: str, what: str, writes_to: Path | None = None) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=SNAPSHOT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeFailure(f"{what} of sandbox {sandbox_id} took over {SNAPSHOT_TIMEOUT_S:.0f}s", sandbox_id=sandbox_id) from exc
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip()
        if writes_to is not None and ("No space left" in message or snapshot_target_full(writes_to)):
            raise DiskFull(
                f"{what} of sandbox {sandbox_id}: no space left in {writes_to}: free space or delete snapshots",
                sandbox_id=sandbox_id,
            )
        raise RuntimeFailure(
            f"{what} of sandbox {sandbox_id} failed: {proc.stderr.decode(errors='replace').strip()[-1000:]}",
            sandbox_id=sandbox_id,
        )


@contextlib.contextmanager
def _agent_socket_path(run_dir: Path, sandbox_id: str, log: Path) -> Iterator[Path]:
    """The agent socket in `run_dir`, through /proc/self/fd when too long for sun_path; a failure to reach it
    quotes the agent's log."""
    socket_path = run_dir / bundle.AGENT_SOCKET
    dir_fd = -1
    if len(str(socket_path)) > MAX_SOCKET_PATH:
        dir_fd = os.open(run_dir, os.O_PATH | os.O_DIRECTORY)
        socket_path = Path(f"/proc/self/fd/{dir_fd}/{bundle.AGENT_SOCKET}")
    try:
        yield socket_path
    except RuntimeFailure as exc:
        tail = log.read_bytes()[-1000:].decode(errors="replace").strip() if log.exists() else ""
        raise RuntimeFailure(f"{exc.message}; agent log: {tail or '(empty)'}", sandbox_id=sandbox_id) from exc
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)


def _connect_agent(run_dir: Path, sandbox_id: str, log: Path, timeout_s: float = AGENT_START_TIMEOUT_S) -> AgentClient:
    """Connect to the agent socket in `run_dir`."""
    with _agent_socket_path(run_dir, sandbox_id, log) as path:
        return AgentClient.connect_unix(path, timeout_s=timeout_s, sandbox_id=sandbox_id)


def _reattach_agent(client: AgentClient, run_dir: Path, sandbox_id: str, log: Path) -> None:
    """Continue `client`'s conversation (parked for a checkpoint) on a new connection to the restored agent."""
    with _agent_socket_path(run_dir, sandbox_id, log) as path:
        client.reattach(connect_socket(path, AGENT_START_TIMEOUT_S, sandbox_id))


class ContainerSandbox(AgentSandbox):
    """A running OCI container whose PID 1 is the agent; limits and pause come from its cgroups."""

    def __init__(self, client: AgentClient, record: ContainerRecord, runtime: OciRuntime, state_dir: Path) -> None:
        super().__init__(record.sandbox_id, client)
        self.record = record
        self.runtime = runtime
        self.state_dir = state_dir
        self.files = record.files_dir(state_dir)  # bundle, agent socket dir, log, pid file (volatile.py)
        self.upper_dir = record.upper_dir
        self.destroyed = False
        self._view_lock = threading.Lock()
        self.stopped_as = ""  # "memory" or "files": paused with no container running until resume
        self.create_timings: dict[str, float] = {}  # seconds per create phase, for benchmarks and metrics
        # every exec reads the OOM counter twice and reports the limit: the counter's file is kept open and the
        # limit (fixed at create; a resume or restore re-creates the same cgroup) kept, per cgroup path
        self._oom_counter: cgroups.OomCounter | None = None
        self._limit_mb: tuple[str, int] = ("", 0)

    def _check_alive(self, what: str) -> None:
        if self.destroyed:
            raise SandboxStateError(f"sandbox {self.sandbox_id} is destroyed; cannot {what} it", sandbox_id=self.sandbox_id)

    def oom_kill_count(self) -> int:
        path = self.record.cgroups_path
        counter = self._oom_counter
        if counter is None or counter.cgroup != path:
            counter = self._oom_counter = cgroups.OomCounter(path)
        kills = counter.read()
        if kills < 0:  # the cgroup was made again (resume, restore) or remounted: open it afresh next time
            self._oom_counter = None
            return cgroups.oom_kill_count(path)
        return kills

    def memory_limit_mb(self) -> int:
        path = self.record.cgroups_path
        if self._limit_mb[0] != path:
            limit = cgroups.memory_limit_bytes(path) >> 20
            if limit <= 0:
                return limit  # unknown: not remembered
            self._limit_mb = (path, limit)
        return self._limit_mb[1]

    def usage(self) -> Usage:
        """From the sandbox's cgroups (CPU, memory) and its own ext4 disk (the writable layer)."""
        self._check_alive("measure")
        path = self.record.cgroups_path
        quota, period = cgroups.cpu_quota(path)
        used, cache = cgroups.memory_usage(path)
        try:
            fs = os.statvfs(self.record.disk)
            disk_total, disk_used = fs.f_blocks * fs.f_frsize, (fs.f_blocks - fs.f_bfree) * fs.f_frsize
        except OSError:
            disk_total = disk_used = 0
        return Usage(
            cpu_seconds=cgroups.cpu_usage_ns(path) / 1e9,
            cpu_limit=quota / period if quota > 0 and period > 0 else float(os.cpu_count() or 1),
            mem_used_bytes=used,
            mem_total_bytes=cgroups.memory_limit_bytes(path),
            mem_cache_bytes=cache,
            disk_used_bytes=disk_used,
            disk_total_bytes=disk_total,
        )

    def is_paused(self) -> bool:
        return cgroups.is_frozen(self.record.cgroups_path)

    def keeps_streams(self, kind: PauseKind) -> bool:
        """A memory pause parks the agent connection (DETACH) and reattaches it after the restore: sessions and
        process streams carry on. A files pause ends every process."""
        return kind in ("freeze", "memory")

    def check_pause(self, kind: PauseKind) -> None:
        """freeze and files work with both runtimes; memory needs runc or a crun built with CRIU (bookworm's 1.8.1
        is not; infra/setup.d/32-crun.sh builds 1.21) and a CRIU that passes its probe (criu.py), else it is
        refused with the reason."""
        self._check_alive("pause")
        if kind != "memory":
            return
        if reason := self._criu_refusal():
            raise Unsupported(
                f"pause(memory=True) of container sandbox {self.sandbox_id} needs CRIU: {reason}; pause() freezes it "
                "in place (RAM held), pause(memory=False) keeps its files only",
                sandbox_id=self.sandbox_id,
            )

    def _criu_refusal(self) -> str:
        """Why CRIU cannot checkpoint this sandbox's processes ("" when it can)."""
        verdict = criu_probe()
        if reason := runtime_criu_refusal(self.runtime.name, self.runtime.binary()):
            return reason
        if not verdict.works:
            return verdict.reason
        if _joins_host_netns_from_userns(self.files):
            return ("its network namespace (the egress allowlist's) belongs to the host's user namespace, not to the "
                    "sandbox's, and CRIU cannot enter it from there ('Can't setns net: Operation not permitted')")
        return ""

    def pause(self, kind: PauseKind = "freeze") -> None:
        """freeze: every process stopped by the freezer cgroup, memory and files as they are. memory: CRIU saves
        the processes and their memory under the state dir and the container goes (runc checkpoint). files: the
        container is deleted (processes, cgroup and their memory go). Both keep the disk, overlay, bundle and
        network namespace. memory parks the agent connection first (the agent keeps everything it started:
        sessions, execs, transfers; CRIU saves them) and resume reattaches it; files closes it, and the agent
        kills the process groups it started."""
        self.check_pause(kind)
        if kind == "freeze":
            self.runtime.pause(self.record.container_id)
            return
        if kind == "memory":
            self.client.park()
            (self.state_dir / PAUSED_AS).write_text(kind)
            _wait_connections_dropped(self.files / PID_FILE)
            image = self.state_dir / CHECKPOINT_DIR
            shutil.rmtree(image, ignore_errors=True)
            image.mkdir()
            try:
                self.runtime.checkpoint(self.record.container_id, image, criu_probe().path)
            except BaseException as dump_failed:
                (self.state_dir / PAUSED_AS).unlink()
                self._continue_after_failed_dump(dump_failed)
                raise
        else:
            self.client.close()
            (self.state_dir / PAUSED_AS).write_text(kind)
            _kill_init(self.files / PID_FILE, self.record.cgroups_path)
            self.runtime.delete(self.record.container_id)
        cgroups.remove(self.record.cgroups_path, self.sandbox_id)
        self.stopped_as = kind

    def _continue_after_failed_dump(self, dump_failed: BaseException) -> None:
        """A checkpoint CRIU refused (a process it cannot save) leaves the container running: its parked agent
        connection carries on and the caller gets CRIU's reason. Where the container did not survive the
        attempt, that is said beside CRIU's reason at once, not after the reattach's wait for an agent that is
        gone, whose timeout would have replaced the reason."""
        state = self.runtime.state(self.record.container_id)
        status = (state or {}).get("status", "gone")
        if status in ("running", "paused"):
            try:
                _reattach_agent(self.client, self.files / "agent-run", self.sandbox_id, self.files / "agent.log")
                return
            except DsecError as lost:
                status = f"{status}, but its agent did not answer ({lost.message})"
        reason = dump_failed.message if isinstance(dump_failed, DsecError) else repr(dump_failed)
        raise RuntimeFailure(
            f"memory pause of sandbox {self.sandbox_id} failed and the sandbox did not survive it (container "
            f"{status}): destroy it and create it again. The pause failed because: {reason}",
            sandbox_id=self.sandbox_id,
        ) from dump_failed

    def resume(self) -> None:
        self._check_alive("resume")
        if self.stopped_as == "":
            self.runtime.resume(self.record.container_id)
            return
        run_dir, log, pid_file = self.files / "agent-run", self.files / "agent.log", self.files / PID_FILE
        image = self.state_dir / CHECKPOINT_DIR
        if self.stopped_as == "memory":
            self.runtime.restore(self.record.container_id, self.files, image, pid_file, log, criu_probe().path)
            # CRIU binds a listening socket again at the name it was first bound to: the agent binds
            # agent.sock.tmp and renames it into place (agent.c), so the restored socket needs that rename again
            os.replace(run_dir / f"{bundle.AGENT_SOCKET}.tmp", run_dir / bundle.AGENT_SOCKET)
            # the parked connection (or a re-adopted sandbox's placeholder) continues: sessions carry on
            _reattach_agent(self.client, run_dir, self.sandbox_id, log)
        else:
            self.runtime.run(self.record.container_id, self.files, pid_file, log)
            self.client.close()  # closed at the pause already, or a re-adopted sandbox's placeholder
            self.client = _connect_agent(run_dir, self.sandbox_id, log)
        shutil.rmtree(image, ignore_errors=True)
        (self.state_dir / PAUSED_AS).unlink()
        self.stopped_as = ""

    def writable_layer(self) -> Path:
        """The upper dir; with a user namespace, a view of it with the sandbox's own ids (0 = its root) whatever
        host range it runs in, so that snapshots and image layers made from it restore into any other sandbox's
        range. The view is mounted on first use in the state dir and goes with the sandbox's teardown."""
        base = self.record.host_base
        if base is None:
            return self.upper_dir
        view = self.state_dir / LAYER_VIEW
        with self._view_lock:
            if not rootfs.is_mounted(view):
                idmap.bind(self.runtime.bin_dir, self.upper_dir, view, base, 0)
        return view

    def netns_path(self) -> Path:
        """The network namespace of the container's PID 1 (the agent), checked to still be this sandbox's."""
        self._check_alive("reach a port of")
        return init_netns_path(self.files / PID_FILE, self.record.cgroups_path, self.sandbox_id)

    def snapshot(self, dest: Path) -> str:
        """Tar the writable layer into `dest` while the sandbox is frozen (a paused sandbox stays paused)."""
        self._check_alive("snapshot")
        dest.mkdir(parents=True, exist_ok=True)
        was_paused = self.is_paused()
        if not was_paused:
            self.pause()
        try:
            self._tar_layer(dest)
        finally:
            if not was_paused:
                self.resume()
        (dest / "snapshot.json").write_text(json.dumps({"kind": "filesystem", "runtime": self.record.runtime}))
        return "filesystem"

    def _tar_layer(self, dest: Path) -> None:
        _run_tar(
            [*_TAR_LAYER, "--exclude=./.dsec", "-C", str(self.writable_layer()), "-cf", str(dest / SNAPSHOT_ARCHIVE), "."],
            self.sandbox_id,
            "snapshot",
            writes_to=dest,
        )

    def fork_snapshot(self, dest: Path) -> str:
        """What a fork starts from: the files and, where CRIU can (runc, a crun built with it), every process
        with its memory, sessions included (kind "processes"): the agent connection is parked, the container
        frozen, its layer tarred and its processes dumped with `--leave-running`, then thawed and reattached, so
        the source runs on. Where CRIU cannot (a crun without CRIU, an allowlisted user-namespaced sandbox, a
        paused one, a dump that fails: its reason is kept in snapshot.json) it is `snapshot`'s "filesystem"."""
        self._check_alive("fork")
        if self.stopped_as or self.is_paused() or self._criu_refusal():
            return self.snapshot(dest)
        dest.mkdir(parents=True, exist_ok=True)
        run_dir, log = self.files / "agent-run", self.files / "agent.log"
        image, refused = dest / CHECKPOINT_DIR, ""
        self.client.park()
        try:
            _wait_connections_dropped(self.files / PID_FILE)
            self.runtime.pause(self.record.container_id)
            try:
                self._tar_layer(dest)
                image.mkdir()
                try:
                    self.runtime.checkpoint(self.record.container_id, image, criu_probe().path, leave_running=True)
                except RuntimeFailure as exc:  # a process CRIU cannot save: the fork is files-only, as before
                    shutil.rmtree(image, ignore_errors=True)
                    refused = exc.message
            finally:
                self.runtime.resume(self.record.container_id)
        finally:
            _reattach_agent(self.client, run_dir, self.sandbox_id, log)
        kind = "filesystem" if refused else "processes"
        if not refused:  # the agent the processes were dumped with: a restore checks the size of files they map
            _link_or_copy(self.state_dir / AGENT_NAME, dest / AGENT_NAME)
        meta = {"kind": kind, "runtime": self.record.runtime, "uid_base": self.record.uid_base, "refused": refused}
        (dest / "snapshot.json").write_text(json.dumps(meta))
        return kind


class ContainerDriver(SandboxDriver):
    """Sandboxes as OCI containers run by one runtime binary; subclasses name the runtime."""

    substrate = "container"

    def __init__(self, config: ServerConfig | None = None, user_namespace: bool = True) -> None:
        """`user_namespace=False` runs sandboxes as host root (as before issue #22); only benchmarks compare it."""
        self.config = config or ServerConfig()
        self.user_namespace = user_namespace
        self.runtime = OciRuntime(self.name, volatile.runtime_root(self.config.home, self.name), self.config.bin_dir)
        self.disk_templates = self.config.home / "cache" / "disk-templates"
        self.trash = self.config.home / "trash"  # on the state dirs' filesystem: a discard there is a rename
        spares.reap_dead_owners(self.config.home)

    def _spares(self) -> spares.SpareDisks:
        """Ready disks for this home's creates (spares.py), made at the first create."""
        return spares.for_home(self.config.home, self.disk_templates)

    # -- create ---------------------------------------------------------------------------------------
    def create(self, sandbox_id: str, spec: SandboxSpec, image: ImageRootfs, state_dir: Path) -> ContainerSandbox:
        return self._launch(sandbox_id, spec, image, state_dir, prepare_upper=None)

    def restore(
        self, sandbox_id: str, spec: SandboxSpec, image: ImageRootfs, snapshot: Path, state_dir: Path
    ) -> ContainerSandbox:
        """A new sandbox of the same image whose writable layer starts as the snapshot's."""
        archive = next((snapshot / name for name in SNAPSHOT_ARCHIVES if (snapshot / name).is_file()), None)
        if archive is None:
            raise SnapshotNotFound(
                f"{snapshot} holds no filesystem snapshot (taken by a VM driver?); restore it with the substrate that "
                "took it",
                sandbox_id=sandbox_id,
            )

        def unpack(upper: Path) -> None:
            _run_tar([*_TAR_LAYER, "-C", str(upper), "-xpf", str(archive)], sandbox_id, "restore")

        processes = snapshot if (snapshot / CHECKPOINT_DIR).is_dir() else None  # a fork_snapshot's processes
        return self._launch(sandbox_id, spec, image, state_dir, prepare_upper=unpack, processes=processes)

    def _launch(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        image: ImageRootfs,
        state_dir: Path,
        prepare_upper: Callable[[Path], None] | None,
        processes: Path | None = None,
    ) -> ContainerSandbox:
        """`processes`: a fork_snapshot holding a checkpoint, whose processes are restored instead of a fresh run."""
        with self._spares().creating():  # no spare disk is made while a create runs
            return self._launch_now(sandbox_id, spec, image, state_dir, prepare_upper, processes)

    def _launch_now(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        image: ImageRootfs,
        state_dir: Path,
        prepare_upper: Callable[[Path], None] | None,
        processes: Path | None,
    ) -> ContainerSandbox:
        state_dir.mkdir(parents=True, exist_ok=True)
        files = volatile.sandbox_dir(self.config.home, sandbox_id)
        base = userns.allocate(sandbox_id, state_dir) if self.user_namespace else None
        record = ContainerRecord(
            sandbox_id=sandbox_id,
            runtime=self.name,
            runtime_root=str(self.runtime.root),
            container_id=sandbox_id,
            cgroups_path=bundle.cgroups_path(sandbox_id),
            rootfs=str(files / "rootfs"),
            disk=str(files / "disk"),
            disk_image=str(state_dir / "disk.img"),
            uid_base="" if base is None else str(base),
            volatile_dir=str(files),
        )
        record.write(state_dir)  # before anything it names exists
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(phase: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[phase] = now - clock
            clock = now

        try:
            run_dir, log = files / "agent-run", files / "agent.log"
            run_dir.mkdir(parents=True, exist_ok=True)
            if base is not None:  # the runtime mounts from both as the sandbox's root (userns.make_reachable)
                userns.make_reachable(state_dir)
                userns.make_reachable(files)
            spares.disk_ready(self._spares(), Path(record.disk_image), Path(record.disk), spec.resources.disk_mb,
                              sandbox_id, self.disk_templates)
            lap("disk")
            record.upper_dir.mkdir()
            if base is not None:  # the sandbox's root owns its writable layer's top and the agent's socket dir
                os.chown(record.upper_dir, base, base)
                os.chown(run_dir, base, base)
            if prepare_upper is not None:
                with _own_ids(record, state_dir, self.runtime.bin_dir) as upper:
                    prepare_upper(upper)
                lap("restore_upper")
            rootfs.mount_overlay(
                image.lower_dirs, record.upper_dir, record.work_dir, Path(record.rootfs), sandbox_id,
                idmapped=None if base is None else (
                    lambda lowers, options: idmap.mount_overlay(self.runtime.bin_dir, lowers, options, Path(record.rootfs), base)
                ),
            )  # fmt: skip
            lap("mount")
            volume_sources = self._idmapped_volumes(spec, state_dir, base)
            user = resolve_user(image.config.user, Path(record.rootfs), sandbox_id)
            netns = hosts = None
            if spec.network_allow:
                hosts = network.prepare(sandbox_id, spec.network_allow, state_dir)
                netns = network.connect(state_dir)
                lap("network")
            config = bundle.runtime_config(
                sandbox_id, spec, image.config, Path(record.rootfs), _pinned_agent(_agent_of(processes, self.config.bin_dir), state_dir), run_dir,
                netns=netns, hosts_file=hosts, volumes_dir=self.config.volumes_dir, uid_base=base,
                volume_sources=volume_sources, bind_devices=self.runtime.name == "crun",
            )  # fmt: skip
            bundle.write_bundle(files, config)
            lap("bundle")
            if processes is None:
                self.runtime.run(record.container_id, files, files / PID_FILE, log)
            else:
                _restore_processes(self.runtime, record, state_dir, processes)
            lap("runtime_run")
            client = _connect_agent(run_dir, sandbox_id, log)
            lap("agent_connect")
        except BaseException:
            _teardown(record, state_dir, self.runtime.bin_dir, self.trash)
            raise
        sandbox = ContainerSandbox(client, record, self.runtime, state_dir)
        sandbox.user = user
        sandbox.create_timings = timings
        return sandbox

    def _idmapped_volumes(self, spec: SandboxSpec, state_dir: Path, base: int | None) -> dict[str, Path]:
        """Each volume seen through an idmapped mount in the state dir (its files keep the ids the sandbox sees, so
        every sandbox, whatever its host range, reads and writes it as the same owners)."""
        if base is None or not spec.volumes or self.config.volumes_dir is None:
            return {}
        views: dict[str, Path] = {}
        for index, volume in enumerate(spec.volumes):
            view = state_dir / "volumes" / str(index)
            idmap.bind(self.runtime.bin_dir, volume_source(self.config.volumes_dir, volume.name), view, 0, base,
                       readonly=volume.read_only)  # fmt: skip
            views[volume.name] = view
        return views

    # -- re-adopt (server restart) ---------------------------------------------------------------------
    def adopt(
        self, sandbox_id: str, spec: SandboxSpec, image: ImageRootfs, state_dir: Path, paused: bool
    ) -> ContainerSandbox:
        """A new handle on a container a dead server left running: its cgroup and PID 1 (the agent) must be there
        and the agent must answer a ping on its socket within ADOPT_PROBE_S. The runtime, mounts and netns need
        nothing: they are named by the record and live on by themselves. A paused (frozen) container is thawed
        for the probe and frozen again."""
        record = ContainerRecord.read(state_dir)
        if record is None or record.sandbox_id != sandbox_id:
            raise RuntimeFailure(f"sandbox {sandbox_id} has no container record in {state_dir}", sandbox_id=sandbox_id)
        for mount_point in (record.rootfs, record.disk):
            if mount_point and not rootfs.is_mounted(Path(mount_point)):
                raise RuntimeFailure(f"{mount_point} of sandbox {sandbox_id} is not mounted", sandbox_id=sandbox_id)
        runtime = OciRuntime(record.runtime, Path(record.runtime_root), self.runtime.bin_dir)
        stopped_as = (state_dir / PAUSED_AS).read_text() if paused and (state_dir / PAUSED_AS).exists() else ""
        if stopped_as:  # paused by memory or files: no container runs; its resume starts one, as after a pause
            sandbox = ContainerSandbox(AgentClient.detached(sandbox_id), record, runtime, state_dir)
            sandbox.user = resolve_user(image.config.user, Path(record.rootfs), sandbox_id)
            sandbox.stopped_as = stopped_as
            return sandbox
        files = record.files_dir(state_dir)
        init_netns_path(files / PID_FILE, record.cgroups_path, sandbox_id)  # cgroup present, PID 1 in it
        frozen = cgroups.is_frozen(record.cgroups_path)
        if frozen:
            runtime.resume(record.container_id)
        client = _connect_agent(files / "agent-run", sandbox_id, files / "agent.log", timeout_s=ADOPT_PROBE_S)
        sandbox = ContainerSandbox(client, record, runtime, state_dir)
        try:
            sandbox.user = resolve_user(image.config.user, Path(record.rootfs), sandbox_id)
            if paused:
                sandbox.pause()
        except BaseException:
            client.close()
            raise
        return sandbox

    # -- destroy --------------------------------------------------------------------------------------
    def stop(self, sandbox: DriverSandbox) -> bool:
        """SIGKILL the container's PID 1 (the kernel kills the rest of its PID namespace) after thawing it, and
        drop the agent connection; `destroy` then waits for the death and removes the rest."""
        if not isinstance(sandbox, ContainerSandbox):
            return False
        sandbox.destroyed = True
        sandbox.close()
        cgroups.thaw(sandbox.record.cgroups_path)  # a frozen container cannot be killed
        return _kill_init(sandbox.files / PID_FILE, sandbox.record.cgroups_path, wait=False)

    def destroy(self, sandbox: DriverSandbox) -> None:
        if not isinstance(sandbox, ContainerSandbox):
            raise RuntimeFailure(f"sandbox {sandbox.sandbox_id} was not created by the {self.name} driver")
        sandbox.destroyed = True
        sandbox.close()
        _teardown(sandbox.record, sandbox.state_dir, self.runtime.bin_dir, self.trash)

    def cleanup_state_dir(self, state_dir: Path) -> None:
        record = ContainerRecord.read(state_dir)
        if record is not None:
            _teardown(record, state_dir, self.runtime.bin_dir, self.trash)
        elif state_dir.exists():
            rootfs.unmount(state_dir / "rootfs")
            _unmount_all_under(state_dir)
            disk.remove_disk(state_dir / "disk.img", state_dir / "disk")
            if not rootfs.mounts_under(state_dir):
                shutil.rmtree(state_dir, ignore_errors=True)


@contextlib.contextmanager
def _own_ids(record: ContainerRecord, state_dir: Path, bin_dir: Path) -> Iterator[Path]:
    """The record's upper dir, through an idmapped view with the sandbox's own ids when it has a host range."""
    base = record.host_base
    if base is None:
        yield record.upper_dir
        return
    with idmap.own_ids_view(bin_dir, record.upper_dir, base, Path(tempfile.mkdtemp(prefix="view-", dir=state_dir))) as view:
        yield view


def _agent_of(processes: Path | None, bin_dir: Path) -> Path:
    """The agent binary a sandbox runs: the one its checkpoint's processes were dumped with, else the current."""
    return processes / AGENT_NAME if processes is not None else agent_binary(bin_dir)


def _restore_processes(runtime: OciRuntime, record: ContainerRecord, state_dir: Path, snapshot: Path) -> None:
    """Start a fork from its source's checkpoint (runc restore) instead of a fresh run. The images are hard
    links (CRIU only reads them), except the user namespace maps, moved to the fork's own host id range."""
    image = state_dir / CHECKPOINT_DIR
    shutil.rmtree(image, ignore_errors=True)
    shutil.copytree(snapshot / CHECKPOINT_DIR, image, copy_function=os.link)
    source_base = json.loads((snapshot / "snapshot.json").read_text()).get("uid_base", "")
    if source_base and record.host_base is not None:
        move_userns_maps(image, int(source_base), record.host_base, userns.IDS)
    files = record.files_dir(state_dir)
    run_dir, log = files / "agent-run", files / "agent.log"
    runtime.restore(record.container_id, files, image, files / PID_FILE, log, criu_probe().path)
    os.replace(run_dir / f"{bundle.AGENT_SOCKET}.tmp", run_dir / bundle.AGENT_SOCKET)  # as after a memory pause
    shutil.rmtree(image, ignore_errors=True)


def _pinned_agent(binary: Path, state_dir: Path) -> Path:
    """The agent binary as this sandbox's own file (a hard link, a copy across filesystems). Why: a CRIU restore
    binds the agent at its path again and checks its size, and the shared binary is replaced whenever agent.c
    changes, so a memory-paused sandbox (or a fork's checkpoint) would no longer restore."""
    pinned = state_dir / AGENT_NAME
    with contextlib.suppress(FileNotFoundError):
        pinned.unlink()
    try:
        os.link(binary, pinned)
    except OSError:
        shutil.copy2(binary, pinned)
    return pinned


def _link_or_copy(source: Path, dest: Path) -> None:
    """A hard link where both are on one filesystem, else a copy."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def _unmount_all_under(state_dir: Path) -> None:
    """Unmount what is left below the state dir (idmapped volume views, a snapshot's view), deepest first."""
    for mount_point in rootfs.mounts_under(state_dir):
        rootfs.unmount(mount_point)


def _wait_connections_dropped(pid_file: Path, timeout_s: float = AGENT_START_TIMEOUT_S) -> None:
    """Wait until the agent (PID 1) holds only its listening socket: CRIU cannot dump a connection whose host end
    is gone ("Unix socket ... not found"), and the agent drops a closed connection in its own time. Past the
    deadline the checkpoint goes ahead and reports what CRIU says."""
    try:
        fds = Path(f"/proc/{int(pid_file.read_text())}/fd")
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            sockets = sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("socket:"))
        except OSError:
            return
        if sockets <= 1:
            return
        time.sleep(0.005)


def _joins_host_netns_from_userns(bundle_dir: Path) -> bool:
    """Whether the bundle runs in a user namespace of its own yet joins a network namespace made outside it."""
    try:
        namespaces = json.loads((bundle_dir / "config.json").read_text())["linux"]["namespaces"]
    except (OSError, ValueError, KeyError):
        return False
    kinds = {ns.get("type"): ns for ns in namespaces}
    return "user" in kinds and bool(kinds.get("network", {}).get("path"))


def init_netns_path(pid_file: Path, cgroups_path: str, sandbox_id: str) -> Path:
    """/proc/<pid>/ns/net of the container's PID 1, refusing a pid that is not in the sandbox's cgroup (a stale
    pid file could name a recycled pid of an unrelated process)."""
    try:
        pid = int(pid_file.read_text())
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except (OSError, ValueError):
        lines = []
    if not any(line.split(":", 2)[-1] == cgroups_path for line in lines):
        raise SandboxStateError(f"the init process of sandbox {sandbox_id} is gone", sandbox_id=sandbox_id)
    return Path(f"/proc/{pid}/ns/net")


def _kill_init(pid_file: Path, cgroups_path: str, wait: bool = True) -> bool:
    """SIGKILL the container's PID 1 (the kernel then kills its whole PID namespace) and wait until it is gone;
    True when it is known dead (killed here, or its pid already gone), False when that is not known. Without
    `wait`: True once the SIGKILL is sent (a process with a SIGKILL pending never runs its own code again).

    Why not leave it to `runc delete --force`: runc polls for the death every 100 ms, so a forced delete costs
    over 100 ms; killing first makes the delete a quick cleanup of a stopped container. The pid comes from a
    file that may be stale after a crash, so it is opened as a pidfd and only signalled if that process is in
    the sandbox's cgroup (never a recycled pid of an unrelated process).
    """
    try:
        pid = int(pid_file.read_text())
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except (FileNotFoundError, ValueError):
        return False
    try:
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return False
        if not any(line.split(":", 2)[-1] == cgroups_path for line in lines):
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        if not wait:
            return True
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(KILL_WAIT_S * 1000))
    finally:
        os.close(pidfd)


def _teardown(record: ContainerRecord, state_dir: Path, bin_dir: Path, trash_root: Path) -> None:
    """Remove everything `record` names; each step tolerates its resource being already gone."""
    runtime = OciRuntime(record.runtime, Path(record.runtime_root), bin_dir)
    files = record.files_dir(state_dir)
    cgroups.thaw(record.cgroups_path)  # a frozen container cannot be killed
    if _kill_init(files / PID_FILE, record.cgroups_path):
        # all its processes are dead: the runtime's delete would only remove its state dir (the cgroups go
        # below), so that is done here, without the 5-20 ms of starting the runtime (and dsec-v1view)
        shutil.rmtree(runtime.root / record.container_id, ignore_errors=True)
    else:
        runtime.delete(record.container_id)
    cgroups.remove(record.cgroups_path, record.sandbox_id)
    network.teardown(state_dir)
    # the overlay first (it stacks on the disk), then what is left below the two dirs, deepest first, the disk
    # last (a layer view or volume view may sit on it); its image file is in the state dir, discarded below.
    # Two reads of the mount table in all: each is O(mounts on the host), and a burst tears down hundreds.
    rootfs.unmount(Path(record.rootfs))
    dirs = (state_dir,) if files == state_dir else (state_dir, files)
    disk_point = Path(record.disk) if record.disk else None
    for mount_point in rootfs.mounts_under(*dirs):
        if mount_point != disk_point:
            rootfs.unmount(mount_point)
    if disk_point is not None:
        rootfs.unmount(disk_point)
    left = rootfs.mounts_under(*dirs)  # the overlay and the disk included: both are below one of them
    if left:
        raise RuntimeFailure(
            f"{left[0]} of sandbox {record.sandbox_id} is still mounted; not removing its state",
            sandbox_id=record.sandbox_id,
        )
    if files != state_dir:  # a few small files on a tmpfs: gone in well under a millisecond
        shutil.rmtree(files, ignore_errors=True)
    trash.discard(state_dir, trash_root)  # gone now, deleted in background
    if record.host_base is not None:
        userns.release(record.host_base, state_dir)


class CrunDriver(ContainerDriver):
    name = "crun"


class RuncDriver(ContainerDriver):
    name = "runc"


def container_driver(name: str, config: ServerConfig | None = None, user_namespace: bool = True) -> ContainerDriver:
    """The driver for OCI runtime `name` ("crun" or "runc")."""
    drivers = {"crun": CrunDriver, "runc": RuncDriver}
    if name not in drivers:
        raise InvalidSpec(f"unknown container runtime {name!r}: choose one of {', '.join(RUNTIMES)}")
    return drivers[name](config, user_namespace)
