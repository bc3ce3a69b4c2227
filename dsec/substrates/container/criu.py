"""Whether CRIU can checkpoint a container's processes on this host, and why not when it cannot.

`pause(kind="memory")` of a container needs CRIU (through runc's checkpoint/restore). CRIU depends on the kernel
in ways a package version alone does not tell: CRIU 3.17 (Debian bookworm) cannot even start on Linux 6.13+,
whose x86 vDSO gained a `[vvar_vclock]` mapping (kernel commit e93d2521b27f; CRIU learned it in 4.1,
checkpoint-restore/criu#2532; infra/setup.d/31-criu.sh builds 4.1.1 where bookworm's cannot run). So the verdict
comes from running `criu check` once per process, and every refusal carries its reason.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass

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


if __name__ == "__main__":  # `python -m dsec.substrates.container.criu`: the verdict, for diagnostics
    verdict = criu_probe()
    print(json.dumps(asdict(verdict)))
    sys.exit(0 if verdict.works else 1)
