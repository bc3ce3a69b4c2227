"""Generate the gRPC/protobuf modules (`dsec/v1/*_pb2*.py`, `dsec/envd/**/*_pb2.py`) from `proto/`.

Generated code is never committed: it is produced here, by the build (setup.py) and by `infra/setup.sh`
(`make setup`). Nothing imports this module at run time, so grpcio-tools is a build/setup dependency only; a
checkout without stubs fails on import with what to run (dsec/v1/__init__.py). Runs as `python -m dsec.codegen`
or `python dsec/codegen.py` (it imports nothing from dsec).
"""

from __future__ import annotations

import fcntl
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
PROTO_ROOT = REPO_ROOT / "proto"
OUT_DIR = PACKAGE_DIR / "v1"
ENVD_OUT_DIR = PACKAGE_DIR / "envd"
"""E2B envd's own protos (proto/envd/, served over Connect by dsec/compat/envd): messages only, no gRPC stubs."""


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "dsec" / "v1").glob("*.proto"))


def envd_proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "envd").glob("*/*.proto"))


def _expected_outputs() -> list[tuple[Path, Path]]:
    pairs = [(p, OUT_DIR / f"{p.stem}{suffix}") for p in proto_files() for suffix in ("_pb2.py", "_pb2_grpc.py")]
    pairs += [(p, ENVD_OUT_DIR / p.parent.name / f"{p.stem}_pb2.py") for p in envd_proto_files()]
    return pairs


def _outputs_stale() -> bool:
    # no protos (an installed wheel): the stubs were generated at build time
    return any(not out.exists() or out.stat().st_mtime < proto.stat().st_mtime for proto, out in _expected_outputs())


def generate(force: bool = False) -> None:
    """Run protoc for proto/dsec/v1 into dsec/v1 and proto/envd into dsec/envd (idempotent, process-safe)."""
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
        envd = envd_proto_files()
        if envd:
            args = [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT / 'envd'}",
                f"-I{include}",
                f"--python_out={ENVD_OUT_DIR}",
                f"--pyi_out={ENVD_OUT_DIR}",
                *[str(p.relative_to(PROTO_ROOT / "envd")) for p in envd],
            ]
            ENVD_OUT_DIR.mkdir(exist_ok=True)
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed for {PROTO_ROOT / 'envd'}")
            for package in {ENVD_OUT_DIR, *(ENVD_OUT_DIR / p.parent.name for p in envd)}:
                (package / "__init__.py").touch()


if __name__ == "__main__":
    generate(force="--force" in sys.argv)
    print(f"generated {len(proto_files())} proto(s) into {OUT_DIR}, {len(envd_proto_files())} into {ENVD_OUT_DIR}")
