"""Generate the gRPC/protobuf modules (`dsec/v1/*_pb2*.py`) from `proto/`.

Generated code is never committed: it is produced here, by the build (setup.py) and by
`infra/setup.sh`, and regenerated on import when a .proto is newer than its output, so a
checkout can never run against stale stubs.
"""

from __future__ import annotations

import fcntl
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
PROTO_ROOT = REPO_ROOT / "proto"
OUT_DIR = PACKAGE_DIR / "v1"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "dsec" / "v1").glob("*.proto"))


def _outputs_stale() -> bool:
    protos = proto_files()
    if not protos:
        return False  # installed wheel: stubs were generated at build time
    for proto in protos:
        for suffix in ("_pb2.py", "_pb2_grpc.py"):
            out = OUT_DIR / f"{proto.stem}{suffix}"
            if not out.exists() or out.stat().st_mtime < proto.stat().st_mtime:
                return True
    return False


def generate(force: bool = False) -> None:
    """Run protoc for every proto under proto/dsec/v1 into dsec/v1 (idempotent, process-safe)."""
    if not force and not _outputs_stale():
        return
    from grpc_tools import protoc  # imported lazily: only needed when regenerating

    OUT_DIR.mkdir(exist_ok=True)
    with open(OUT_DIR / ".codegen.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and not _outputs_stale():
            return
        include = Path(protoc.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={PACKAGE_DIR.parent}",
            f"--pyi_out={PACKAGE_DIR.parent}",
            f"--grpc_python_out={PACKAGE_DIR.parent}",
            *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {PROTO_ROOT}")
        (OUT_DIR / "__init__.py").touch()


if __name__ == "__main__":
    generate(force="--force" in sys.argv)
    print(f"generated {len(proto_files())} proto(s) into {OUT_DIR}")
