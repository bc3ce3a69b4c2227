"""Ownership of sandboxes across servers on one host, and the sweep that removes what no live server owns.

Why next to the run-dir reaper (state.py): the reaper tears down what a dead server's records describe; a
sandbox whose records are lost (a crash between creating its cgroup and writing its record, a state
directory removed by hand) is invisible to it, while its cgroups, processes, loop device, netns, veth, nftables
table, QEMU or Docker container live on. This sweep starts from the host's side instead. Where each kind of
leftover lives is its substrate's knowledge: every registered substrate (dsec/substrates/registry.py) names
sweepers (e.g. dsec/substrates/container/sweep.py, dsec/substrates/vm/sweep.py) that list what they find and ask
this module whether its owner is gone; this module only decides ownership and records what went.

Ownership must hold across several servers with different `$DSEC_HOME`s on one machine, so before a server
creates anything for a sandbox it registers it machine-wide: `/run/dsec/sandboxes/<id>` is a symlink to the
sandbox's state directory, whose parent is the owning server's run directory with its `server.lock`. The
owner is alive exactly while some process holds that flock, which `/proc/locks` tells without touching the
lock (taking it, even briefly, could make a concurrent reaper skip a dead server).

The ownership mark is the name: `sb-<16 hex>` ids (`registry.SANDBOX_ID`) are made only by servers
(`SandboxManager._new_id`), which register an id before creating anything for it and unregister it only after
all of it is gone. So a resource named for such an id is removed when its registration points at a dead server,
and also when it has no registration at all (its records are lost: nothing live can own it). Other names (a
driver used without a server: tests' `ct-…`, image builds' `build-…`) cannot be attributed and are never touched,
nor is a resource whose state directory sits in a live server's run directory. Sweeps take a machine-wide lock,
so two servers starting together never race over a loop device or a network slot one of them just freed.

Snapshots (`sweep_snapshots`) carry their own mark: `SnapshotStore` creates each snapshot directory with an
`owner` link to its server's run directory (and a `temporary` file for a fork's own snapshot); a snapshot never
published, or a temporary one, whose owner is dead is removed. Published snapshots are the users' and stay.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dsec.server.state import SANDBOX_RECORD, unmount_below
from dsec.substrates import registry
from dsec.substrates.registry import SANDBOX_ID

log = logging.getLogger("dsec.server.orphans")

REGISTRY = Path("/run/dsec/sandboxes")
SWEEP_LOCK = Path("/run/dsec/sweep.lock")
SNAPSHOT_OWNER = "owner"  # in a snapshot dir: symlink to the run directory of the server that made it
SNAPSHOT_TEMPORARY = "temporary"  # in a snapshot dir: the snapshot is a fork's own, deleted once the fork is done
SNAPSHOT_META = "meta.json"
LOCK_NAME = "server.lock"


def register(sandbox_id: str, sandbox_dir: Path) -> None:
    """Record machine-wide that `sandbox_dir`'s server owns `sandbox_id`; called before any of it exists."""
    REGISTRY.mkdir(parents=True, exist_ok=True)
    tmp = REGISTRY / f".{sandbox_id}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(sandbox_dir.resolve())
    os.replace(tmp, REGISTRY / sandbox_id)


def unregister(sandbox_id: str) -> None:
    """Forget `sandbox_id` once nothing of it is left on the host."""
    (REGISTRY / sandbox_id).unlink(missing_ok=True)


def registered_dir(sandbox_id: str) -> Path | None:
    """The state directory `sandbox_id` was registered with, None if it is not registered."""
    try:
        return Path(os.readlink(REGISTRY / sandbox_id))
    except OSError:
        return None


def _held_locks() -> set[tuple[int, int, int]]:
    """(major, minor, inode) of every file some process holds a lock on."""
    held: set[tuple[int, int, int]] = set()
    with open("/proc/locks") as locks:
        for line in locks:
            fields = line.split()
            if len(fields) < 6 or fields[1] == "->":  # "->" marks a waiter, not a holder
                continue
            try:
                major, minor, inode = fields[5].split(":")
                held.add((int(major, 16), int(minor, 16), int(inode)))
            except ValueError:
                continue
    return held


def run_dir_alive(run_dir: Path, held: set[tuple[int, int, int]] | None = None) -> bool:
    """Whether the server of `run_dir` is alive (some process holds its `server.lock`)."""
    try:
        st = os.stat(run_dir / LOCK_NAME)
    except OSError:
        return False  # a run directory without lock: its server is gone (clean exit or never fully started)
    return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in (held if held is not None else _held_locks())


def owner_alive(sandbox_dir: Path, held: set[tuple[int, int, int]] | None = None) -> bool:
    """Whether the server whose run directory holds `sandbox_dir` is alive (holds its `server.lock`)."""
    return run_dir_alive(sandbox_dir.parent, held)


@dataclass
class Orphans:
    """What the sweep found (and removed) for sandboxes whose owner is dead: one list per kind the registered
    sweepers report (`cgroups`, `loops`, `qemus`, `containers`, `netns`, `veths`, `slots`, `nft_tables`, …), read
    as attributes."""

    removed: dict[str, list] = field(default_factory=dict)  # kind -> what went (ids, devices, pids, names)
    registrations: list[str] = field(default_factory=list)  # registry entries dropped
    unrecorded: list[str] = field(default_factory=list)  # sandbox ids found with no registration at all
    failures: list[str] = field(default_factory=list)  # removals that failed (retried at the next start)

    def __getattr__(self, kind: str) -> list:
        removed = self.__dict__.get("removed")
        if removed is None or kind not in removed:
            raise AttributeError(f"no sweeper reports {kind!r}; kinds: {sorted(removed or ())}")
        return removed[kind]

    def __bool__(self) -> bool:
        return any(self.removed.values())


@dataclass
class _Owners:
    """Who owns each sandbox id the sweep meets, decided once per id from one reading of /proc/locks."""

    held: set[tuple[int, int, int]]
    home_run_root: Path | None = None  # the sweeping server's run root: its dead predecessors are its to reap
    now: float = field(default_factory=time.time)
    dead: dict[str, Path | None] = field(default_factory=dict)  # id -> its state dir (None: not known)
    unrecorded: set[str] = field(default_factory=set)

    def gone(self, sandbox_id: str, expected: Path | None = None) -> bool:
        """Whether `sandbox_id`'s resources are an orphan's: registered to a dead server, or a server's id with no
        registration at all. `expected`: the state dir the resource itself names (loop backing, QEMU pidfile)."""
        registered = registered_dir(sandbox_id)
        if registered is not None:
            if owner_alive(registered, self.held):
                return False
            if expected is not None and expected.resolve() != registered:
                return False  # another sandbox dir of the same id name: not the registered one
            if self.awaits_its_home(registered):
                return False
            self.dead.setdefault(sandbox_id, registered)
            return True
        if not SANDBOX_ID.fullmatch(sandbox_id):
            return False  # not a server's id: a driver used without a server, or another tool's; never ours to judge
        if expected is not None and owner_alive(expected, self.held):
            return False  # in a live server's run dir: its owner is removing it right now
        self.unrecorded.add(sandbox_id)
        known = expected if expected is not None and (expected.parent / LOCK_NAME).exists() else None
        if self.dead.get(sandbox_id) is None:
            self.dead[sandbox_id] = known  # only a dead server's run dir is ours to delete
        return True


    def awaits_its_home(self, sandbox_dir: Path) -> bool:
        """Whether a dead server's sandbox is left for its own home's next server to re-adopt (readopt.py).

        Why: servers with different homes on one machine (a test server beside a production one) must not reap
        each other's healthy sandboxes in the gap between a crash and the restart that re-adopts them. Spared:
        a sandbox under another home's run root that was handed to a client (`live`) and has not expired. Its
        expiry bounds the wait: past it, any server's sweep reaps it. Its own home's dead servers are this
        server's (it took them over first) and no home given means no sparing (the caller owns everything)."""
        if self.home_run_root is None or sandbox_dir.parent.parent == self.home_run_root:
            return False
        try:
            record = json.loads((sandbox_dir / SANDBOX_RECORD).read_text())
        except (OSError, ValueError):
            return False
        return bool(record.get("live")) and float(record.get("expires_at") or 0) > self.now


@contextlib.contextmanager
def _exclusive() -> Iterator[None]:
    """One sweep at a time on this machine: two would race over devices and slots the other just freed."""
    SWEEP_LOCK.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(SWEEP_LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass
class _Run:
    """One sweep as the sweepers see it (`registry.SweepContext`): ownership from `_Owners`, removals recorded."""

    owners: _Owners
    sweepers: list[registry.Sweeper]
    removed: Orphans = field(default_factory=Orphans)
    failed: set[str] = field(default_factory=set)  # ids with a removal that failed: kept registered for a retry

    def gone(self, sandbox_id: str, expected: Path | None = None) -> bool:
        return self.owners.gone(sandbox_id, expected)

    def dead_dir(self, sandbox_id: str) -> Path | None:
        return self.owners.dead.get(sandbox_id)

    def remove(self, sandbox_id: str, kind: str, item: object, action: Callable[[], None]) -> bool:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - recorded and retried at the next start
            self.failed.add(sandbox_id)
            self.removed.failures.append(f"{kind} {item} of {sandbox_id}: {exc}")
            return False
        self.record(kind, item)
        return True

    def record(self, kind: str, item: object) -> None:
        self.removed.removed.setdefault(kind, []).append(item)

    def clean_state(self, sandbox_id: str, state_dir: Path) -> None:
        unmount_below(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
        for sweeper in self.sweepers:
            sweeper.clean_state(sandbox_id, state_dir)


def sweep(home_run_root: Path | None = None) -> Orphans:
    """Remove everything of every sandbox whose server is dead or whose records are lost; returns what went.

    Safe while other servers run: their sandboxes are registered to run directories whose lock they hold.
    `home_run_root`: the sweeping server's own run root; live, unexpired sandboxes of dead servers of *other*
    homes are then left for their home's next server to re-adopt (`_Owners.awaits_its_home`).
    Every registered substrate's sweepers run in stage order (processes, cgroups, network plumbing, disks; see
    `registry.Sweeper`), then the registrations of what is gone are dropped.
    """
    with _exclusive():
        home = home_run_root.resolve() if home_run_root is not None else None
        removed = _sweep(_Owners(_held_locks(), home), registry.sweepers())
    for failure in removed.failures:
        log.error("orphan sweep: removing %s failed; the next server start retries", failure)
    if removed:
        found = ", ".join(f"{kind} {items}" for kind, items in removed.removed.items() if items)
        log.warning("removed orphans of dead servers: %s; without any record: %s", found, removed.unrecorded)
    return removed


def _sweep(owners: _Owners, sweepers: list[registry.Sweeper]) -> Orphans:
    run = _Run(owners, sweepers)
    for kind in (kind for sweeper in sweepers for kind in sweeper.kinds):
        run.removed.removed.setdefault(kind, [])
    for sweeper in sweepers:
        sweeper.sweep(run)
    for entry in list(REGISTRY.iterdir()) if REGISTRY.is_dir() else []:
        if _half_registered_by_dead_server(entry, owners.held):
            entry.unlink(missing_ok=True)  # killed between symlink and rename in `register`
            run.removed.registrations.append(entry.name)
        elif SANDBOX_ID.fullmatch(entry.name) and entry.name not in run.failed and owners.gone(entry.name):
            known = owners.dead.get(entry.name)
            if known is not None:
                run.clean_state(entry.name, known)
            unregister(entry.name)
            run.removed.registrations.append(entry.name)
    run.removed.unrecorded = sorted(owners.unrecorded)
    return run.removed


def _half_registered_by_dead_server(entry: Path, held: set[tuple[int, int, int]]) -> bool:
    """A `register` temporary (`.<id>.<pid>.tmp`) whose server is dead: it never became a registration."""
    if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
        return False
    try:
        target = Path(os.readlink(entry))
    except OSError:
        return False
    return not owner_alive(target, held)


def sweep_snapshots(root: Path) -> list[str]:
    """Remove snapshot leftovers of dead servers under `root`: never-published (half-written) snapshot dirs and
    a fork's temporary snapshot, whose `owner` mark names a run directory nobody holds; returns their names.

    A published snapshot without the `temporary` mark is a user's and stays, whoever made it. A `snap-*` dir with
    neither `meta.json` nor an owner mark is a half-deleted one (delete drops `meta.json` first) or one from
    before owner marks: nothing writes into it any more. A staging dir (`.new-snap-*`) without its mark yet is
    left alone: its server may be between creating it and marking it.
    """
    removed: list[str] = []
    if not root.is_dir():
        return removed
    held = _held_locks()
    for entry in sorted(root.iterdir()):
        staging = entry.name.startswith(".new-snap-")
        if not entry.is_dir() or not (staging or entry.name.startswith("snap-")):
            continue
        try:
            owner: Path | None = Path(os.readlink(entry / SNAPSHOT_OWNER))
        except OSError:
            owner = None
        published = (entry / SNAPSHOT_META).exists()
        temporary = (entry / SNAPSHOT_TEMPORARY).exists()
        if owner is not None and run_dir_alive(owner, held):
            continue
        if owner is None and (staging or published):
            continue  # cannot be attributed: a staging dir being marked, or a published snapshot of old
        if published and not temporary:
            continue
        (entry / SNAPSHOT_META).unlink(missing_ok=True)  # invisible first, as SnapshotStore deletes
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    if removed:
        log.warning("removed snapshot leftovers of dead servers: %s", removed)
    return removed
