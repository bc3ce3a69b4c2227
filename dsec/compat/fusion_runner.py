"""What one SandboxFusion `run_code` call runs in its sandbox: the language table, the payload, the result.

Why one exec: the whole call (write the files, compile, run, fetch files) is a single `Exec` of a small POSIX
shell runner whose stdin is a tar of everything the call writes. So a call with a `trajectory_id` is exactly
one step in dsec's trajectory log, logged and replayed by the server like every other exec (the door keeps no
log of its own), and a call costs one create, one exec and one destroy. The runner enforces the per-phase
limits with coreutils `timeout` inside the sandbox and answers with a tar of each phase's output, exit status
and times; the host-side exec deadline, output cap and OOM counter still bound the whole call.
"""

from __future__ import annotations

import base64
import binascii
import io
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dsec.models import Substrate

WORKDIR = "/tmp/dsec-fusion"  # the program's cwd; relative `files` and `fetch_files` names are under it
OUTDIR = "/tmp/.dsec-fusion"  # the runner's results (and the program's stdin), kept apart from the program's files
OUTPUT_CAP = 1 << 20  # per phase and stream, as SandboxFusion captures (1 MiB)
RESULT_CAP = 64 << 20  # the whole result tar, fetched files included
SETUP_SLACK_S = 60.0  # on top of compile + run timeouts: unpacking, fetching, packing
MAX_TIMEOUT_S = 24 * 3600.0
MAX_FETCH_FILES = 1000  # their names travel as the runner's argv (one agent frame: at most 1 MiB)
MAX_NAME = 512

# Every language SandboxFusion's API names (its `Language` literal): anything else is a 422, as there.
FusionLanguage = Literal[
    "python", "python2", "cpp", "nodejs", "go", "go_test", "java", "php", "csharp", "bash", "typescript", "sql",
    "rust", "cuda", "lua", "R", "perl", "D_ut", "ruby", "scala", "julia", "pytest", "junit", "kotlin_script",
    "jest", "verilog", "python_gpu", "lean", "swift", "racket", "gtest", "react",
]  # fmt: skip


@dataclass(frozen=True)
class LanguageRecipe:
    """How dsec runs one language: the image, the file the code goes to, and the commands (run in WORKDIR)."""

    image: str
    source: str
    run: str
    compile: str = ""


# The languages dsec serves; the images are built in setup (dsec/images/base_images.py). Commands follow
# SandboxFusion's runners (sandbox/runners/major.py) with Debian's binary names.
RECIPES: dict[str, LanguageRecipe] = {
    "python": LanguageRecipe("python", "main.py", "python3 main.py"),
    "bash": LanguageRecipe("python", "main.sh", "bash main.sh"),
    "perl": LanguageRecipe("python", "main.pl", "perl main.pl"),
    "cpp": LanguageRecipe("cpp", "main.cpp", "./test", compile="g++ -std=c++17 main.cpp -o test"),
}


class RunCodeRequest(BaseModel):
    """SandboxFusion's `RunCodeRequest` (server side, memory_limit_MB included, as verl sends it), plus dsec's
    optional `trajectory_id` + `step` (log the call as that step of a trajectory, exactly once) and `substrate`.

    Bounds SandboxFusion leaves open are closed here (a 422, not a failure deep in the call): timeouts are finite
    and at most a day, the memory limit fits a sandbox spec, and every string is encodable as UTF-8."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    code: str
    language: FusionLanguage
    compile_timeout: float = Field(10, ge=0, le=MAX_TIMEOUT_S)
    run_timeout: float = Field(10, ge=0, le=MAX_TIMEOUT_S)
    memory_limit_MB: int = Field(-1, le=1 << 20)
    stdin: str | None = None
    files: dict[str, str | None] = Field(default_factory=dict)
    fetch_files: list[str] = Field(default_factory=list, max_length=MAX_FETCH_FILES)
    args: list[str] = Field(default_factory=list)
    trajectory_id: str | None = Field(None, min_length=1, max_length=512)
    step: int | None = Field(None, ge=0, lt=1 << 63)
    substrate: Substrate = "container"

    @model_validator(mode="after")
    def _utf8(self) -> RunCodeRequest:
        strings = [self.code, self.stdin or "", self.trajectory_id or "", *self.fetch_files, *self.files]
        strings += [content for content in self.files.values() if content]
        for text in strings:
            try:
                text.encode()
            except UnicodeEncodeError:
                raise ValueError("a string in the request is not valid Unicode (a lone surrogate escape)") from None
        if any(len(name) > MAX_NAME for name in [*self.fetch_files, *self.files]):
            raise ValueError(f"a file name is longer than {MAX_NAME} characters")
        if (self.trajectory_id is None) != (self.step is None):
            raise ValueError("trajectory_id and step go together: give both or neither")
        return self


class FusionInputError(ValueError):
    """The request is well-formed JSON but cannot run as given (SandboxFusion answers these as SandboxError)."""


# $1 workdir, $2 compile timeout, $3 run timeout, $4 compile command ("" = none), $5 run command, $6 output cap,
# $7... files to fetch. `timeout` kills the phase's process group (TERM, KILL 1 s later); a phase's status file
# holds "exit-status start-ns end-ns".
RUNNER = r"""W=$1 CT=$2 RT=$3 CC=$4 RC=$5 CAP=$6
shift 6
O=__OUTDIR__
rm -rf "$O" && mkdir -p "$O/fetch" || exit 90
tar -x -o -C / -f - || exit 90
cd "$W" || exit 91
IN=/dev/null
[ -f "$O/stdin" ] && IN=$O/stdin
phase() {
  s=$(date +%s%N)
  timeout -k 1 "$2" /bin/sh -c "$3" <"$4" >"$O/$1.out" 2>"$O/$1.err"
  r=$?
  e=$(date +%s%N)
  truncate -s "<$CAP" "$O/$1.out" "$O/$1.err"
  echo "$r $s $e" >"$O/$1.status"
}
r=0
if [ -n "$CC" ]; then
  phase compile "$CT" "$CC" /dev/null
  read -r r _ <"$O/compile.status"
fi
[ "$r" = 0 ] && phase run "$RT" "$RC" "$IN"
i=0
for f in "$@"; do
  [ -f "$f" ] && cp "$f" "$O/fetch/$i"
  i=$((i + 1))
done
rm -f "$O/stdin"
tar -c -C "$O" .
""".replace("__OUTDIR__", OUTDIR)


def recipe_for(language: str) -> LanguageRecipe:
    recipe = RECIPES.get(language)
    if recipe is None:
        raise FusionInputError(
            f"language {language!r} is not available on this dsec server (it runs {', '.join(sorted(RECIPES))})"
        )
    return recipe


def _member(tar: tarfile.TarFile, path: str, data: bytes) -> None:
    info = tarfile.TarInfo(path.lstrip("/"))
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: the same call gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def _in_workdir(name: str) -> str:
    path = posixpath.normpath(posixpath.join(WORKDIR, name)) if name else "/"
    if "\0" in name or path in ("/", WORKDIR) or path.startswith(OUTDIR + "/") or path == OUTDIR:
        raise FusionInputError(f"file name {name!r} is empty, names the working directory or the runner's, or has NUL")
    return path


def payload(request: RunCodeRequest, recipe: LanguageRecipe) -> bytes:
    """The runner's stdin: the code, the request's files (base64 in the request) and the program's stdin.

    Deterministic bytes, so a replayed call hashes like the logged one (the trajectory log compares hashes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(request.files.items()):
            if not isinstance(content, str) or "IGNORE_THIS_FILE" in name:  # both skipped by SandboxFusion too
                continue
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                raise FusionInputError(f"files[{name!r}] is not valid base64") from None
            _member(tar, _in_workdir(name), data)
        _member(tar, posixpath.join(WORKDIR, recipe.source), request.code.encode())
        if request.stdin is not None:
            _member(tar, posixpath.join(OUTDIR, "stdin"), request.stdin.encode())
    return buffer.getvalue()


def _seconds(timeout: float) -> str:
    return f"{max(timeout, 0.001):.3f}"  # `timeout 0` would mean no limit at all


def runner_argv(request: RunCodeRequest, recipe: LanguageRecipe) -> list[str]:
    fetch = [_in_workdir(name) for name in request.fetch_files]
    return ["/bin/sh", "-c", RUNNER, "dsec-fusion", WORKDIR, _seconds(request.compile_timeout),
            _seconds(request.run_timeout), recipe.compile, recipe.run, str(OUTPUT_CAP), *fetch]  # fmt: skip


def exec_timeout(request: RunCodeRequest) -> float:
    return max(request.compile_timeout, 0) + max(request.run_timeout, 0) + SETUP_SLACK_S


@dataclass(frozen=True)
class Phase:
    """One command's outcome, shaped like SandboxFusion's CommandRunResult."""

    status: Literal["Finished", "TimeLimitExceeded"]
    execution_time: float
    return_code: int | None
    stdout: str
    stderr: str

    def as_json(self) -> dict:
        return {"status": self.status, "execution_time": self.execution_time, "return_code": self.return_code,
                "stdout": self.stdout, "stderr": self.stderr}  # fmt: skip


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _phase(files: dict[str, bytes], name: str, timeout: float) -> Phase | None:
    status = files.get(f"{name}.status")
    if status is None:
        return None
    code_text, start, end = status.decode().split()
    code, elapsed = int(code_text), (int(end) - int(start)) / 1e9
    if code in (124, 137) and elapsed >= max(timeout, 0.001):  # `timeout`'s answers once the limit has passed
        return Phase("TimeLimitExceeded", elapsed, None, _text(files.get(f"{name}.out", b"")),
                     _text(files.get(f"{name}.err", b"")))  # fmt: skip
    if code > 128:  # killed by a signal (e.g. SIGKILL from the OOM killer): negative, as Python's subprocess says
        code = -(code - 128)
    return Phase("Finished", elapsed, code, _text(files.get(f"{name}.out", b"")), _text(files.get(f"{name}.err", b"")))


@dataclass(frozen=True)
class Outcome:
    compile: Phase | None
    run: Phase | None
    files: dict[str, str]

    @property
    def status(self) -> Literal["Success", "Failed"]:
        """SandboxFusion's parse_run_status: any time limit or non-zero exit is Failed."""
        for phase in (self.compile, self.run):
            if phase is not None and (phase.status == "TimeLimitExceeded" or phase.return_code != 0):
                return "Failed"
        return "Success"


def parse_result(request: RunCodeRequest, result_tar: bytes) -> Outcome:
    """Read the runner's result tar (what the exec printed, live or replayed from the trajectory log)."""
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(result_tar), mode="r:") as tar:
        for member in tar:
            if member.isfile():
                extracted = tar.extractfile(member)
                if extracted is not None:
                    files[posixpath.normpath(member.name)] = extracted.read()
    fetched = {
        name: base64.b64encode(files[f"fetch/{index}"]).decode()
        for index, name in enumerate(request.fetch_files)
        if f"fetch/{index}" in files
    }
    compiled = _phase(files, "compile", request.compile_timeout)
    return Outcome(compiled, _phase(files, "run", request.run_timeout), fetched)
