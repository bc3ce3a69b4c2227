"""SandboxFusion's `run_jupyter`: cells run one after another in one IPython kernel, each cell's output kept.

Built on `run_code`'s runner, as SandboxFusion builds it on its own: the "program" is a small kernel driver
(DRIVER, run by python3 in the `code-interpreter` image, which has ipykernel and jupyter_client) that reads the
cells from a file, runs them, and writes every cell's stdout, stderr, display data and errors to a file the
runner fetches. So a jupyter call is one exec too, logged once under a trajectory step like a run_code call.
"""

from __future__ import annotations

import base64
import json

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dsec.compat.fusion_runner import MAX_NAME, MAX_TIMEOUT_S, LanguageRecipe, Outcome
from dsec.models import Substrate

# -Xfrozen_modules=off: ipykernel's debugger warns on stderr without it
RECIPE = LanguageRecipe("code-interpreter", "main.py", "python3 -Xfrozen_modules=off main.py")
INPUT = ".dsec-jupyter-in.json"
OUTPUT = ".dsec-jupyter-out.json"
DRIVER_SLACK_S = 30.0  # kernel start and shutdown, on top of total_timeout

# The kernel driver. The kernel's own stderr (debugger banners) is dropped: a cell's stderr comes over iopub.
# A cell past its limit (cell_timeout, or what is left of total_timeout) interrupts the kernel and ends the run
# with status TimeLimitExceeded; an exception in a cell is that cell's `error`, and the next cells still run, as
# in a notebook.
DRIVER = f"""import json, os, queue, subprocess, time
os.environ.setdefault("JUPYTER_RUNTIME_DIR", "/tmp/.dsec-jupyter-runtime")
os.environ["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
from jupyter_client.manager import start_new_kernel

spec = json.load(open({INPUT!r}))
km, kc = start_new_kernel(kernel_name=spec["kernel"], stderr=subprocess.DEVNULL)
deadline = time.monotonic() + spec["total_timeout"]
cells, status, by_id = [], "Finished", {{}}


def collect(msg_id, end):
    # Route every iopub message to the cell that caused it (a stream flushed late still lands in its own cell);
    # return once `msg_id` is idle, or False when `end` passed first.
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return False
        try:
            msg = kc.get_iopub_msg(timeout=left)
        except queue.Empty:
            continue
        parent = msg["parent_header"].get("msg_id")
        kind, content = msg["msg_type"], msg["content"]
        if kind == "status" and content["execution_state"] == "idle" and parent == msg_id:
            return True
        cell = by_id.get(parent)
        if cell is None:
            continue
        if kind == "stream":
            cell[content["name"]] += content["text"]
        elif kind in ("display_data", "execute_result"):
            cell["display"].append(content["data"])
        elif kind == "error":
            cell["error"].append({{k: content[k] for k in ("ename", "evalue", "traceback")}})


for code in spec["cells"]:
    cell = {{"stdout": "", "stderr": "", "display": [], "error": []}}
    cells.append(cell)
    end = deadline if spec["cell_timeout"] <= 0 else min(deadline, time.monotonic() + spec["cell_timeout"])
    # stop_on_error=False: after an error ipykernel aborts requests that reach it before its abort window closes,
    # a race the next cell would sometimes lose (it came back empty, status "aborted")
    msg_id = kc.execute(code, stop_on_error=False)
    by_id[msg_id] = cell
    if not collect(msg_id, end):
        km.interrupt_kernel()
        status = "TimeLimitExceeded"
        break
if status == "Finished":
    # One silent round trip: the kernel's iopub is ordered, so once it is idle every earlier cell's output is in
    collect(kc.execute("", silent=True, store_history=False), time.monotonic() + 30)
kc.stop_channels()
km.shutdown_kernel(now=True)
with open({OUTPUT!r}, "w") as out:
    json.dump({{"status": status, "cells": cells}}, out)
os._exit(0)  # skip interpreter teardown: zmq's finalizers only add noise to stderr there
"""


class RunJupyterRequest(BaseModel):
    """SandboxFusion's `RunJupyterRequest` (memory_limit_MB included), plus dsec's `trajectory_id` + `step` and
    `substrate`."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    cells: list[str]
    cell_timeout: float = Field(0, ge=0, le=MAX_TIMEOUT_S)
    total_timeout: float = Field(45, ge=0, le=MAX_TIMEOUT_S)
    memory_limit_MB: int = Field(-1, le=1 << 20)
    kernel: str = Field("python3", pattern="^python3$")
    files: dict[str, str] = Field(default_factory=dict)
    fetch_files: list[str] = Field(default_factory=list, max_length=999)
    trajectory_id: str | None = Field(None, min_length=1, max_length=512)
    step: int | None = Field(None, ge=0, lt=1 << 63)
    substrate: Substrate = "container"

    @model_validator(mode="after")
    def _cells(self) -> RunJupyterRequest:
        if INPUT in self.files or any(len(name) > MAX_NAME for name in self.files):
            raise ValueError(f"file names must be at most {MAX_NAME} characters and not {INPUT}")
        for cell in self.cells:
            try:
                cell.encode()
            except UnicodeEncodeError:
                raise ValueError("a cell is not valid Unicode (a lone surrogate escape)") from None
        return self

    def run_code_fields(self) -> dict:
        """The fields of the run_code call that runs the driver (validated as a RunCodeRequest by the caller)."""
        spec = {"kernel": self.kernel, "cells": self.cells, "cell_timeout": self.cell_timeout,
                "total_timeout": self.total_timeout}  # fmt: skip
        files = {**self.files, INPUT: base64.b64encode(json.dumps(spec).encode()).decode()}
        return {
            "code": DRIVER,
            "language": "python",
            "memory_limit_MB": self.memory_limit_MB,
            "run_timeout": min(self.total_timeout + DRIVER_SLACK_S, MAX_TIMEOUT_S),
            "files": files,
            "fetch_files": [*self.fetch_files, OUTPUT],
            "trajectory_id": self.trajectory_id,
            "step": self.step,
            "substrate": self.substrate,
        }


def response(outcome: Outcome) -> dict:
    """SandboxFusion's RunJupyterResponse: Success only when every cell ran within its limits; the cells that
    ran are returned either way (an exception in a cell is in its `error`, not a failure of the run)."""
    driver = outcome.run or outcome.compile
    files = dict(outcome.files)
    raw = files.pop(OUTPUT, None)
    body: dict = {"status": "Failed", "message": "", "driver": driver.as_json() if driver else None, "cells": [],
                  "executor_pod_name": None, "files": {}}  # fmt: skip
    if raw is None or driver is None or driver.status != "Finished":
        return body
    output = json.loads(base64.b64decode(raw))
    body.update(status="Success" if output["status"] == "Finished" else "Failed", cells=output["cells"], files=files)
    return body
