"""`sandbox.json`: what a container sandbox holds on the host, written before any of it is created.

Why before: a server killed at any point of a create leaves a state directory whose record names every
resource that may exist (runtime container, cgroup, overlay mount), so `cleanup_state_dir` can tear a
half-created sandbox down from the directory alone, without guessing.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from dsec.errors import RuntimeFailure

RECORD_NAME = "sandbox.json"


@dataclass(frozen=True)
class ContainerRecord:
    sandbox_id: str
    runtime: str  # "crun" | "runc"
    runtime_root: str  # the runtime's --root
    container_id: str
    cgroups_path: str  # relative to every hierarchy's root
    rootfs: str  # overlay mount point
    disk: str = ""  # mount point of the sandbox's own filesystem holding upper/ and work/
    disk_image: str = ""  # its sparse image file
    uid_base: str = ""  # host id of the sandbox's root in its user namespace (userns.py); "" = no user namespace
    # bundle, agent socket dir, runtime log, pid file and the mount points, on a tmpfs (volatile.py); "" = all of
    # them in the state dir (records of servers before it)
    volatile_dir: str = ""

    @property
    def host_base(self) -> int | None:
        return int(self.uid_base) if self.uid_base else None

    @property
    def upper_dir(self) -> Path:
        return Path(self.disk) / "upper"

    @property
    def work_dir(self) -> Path:
        return Path(self.disk) / "work"

    def files_dir(self, state_dir: Path) -> Path:
        """Where the bundle, the agent's socket dir, the runtime's log and the pid file are."""
        return Path(self.volatile_dir) if self.volatile_dir else state_dir

    def write(self, state_dir: Path) -> None:
        tmp = state_dir / (RECORD_NAME + ".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, state_dir / RECORD_NAME)

    @classmethod
    def read(cls, state_dir: Path) -> ContainerRecord | None:
        """The record in `state_dir`, None if there is none (nothing was created there)."""
        try:
            data = json.loads((state_dir / RECORD_NAME).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RuntimeFailure(f"unreadable container record in {state_dir}: {exc}; remove the directory by hand") from exc
        return cls(**{key: str(data[key]) for key in cls.__dataclass_fields__ if key in data})
