"""Host side of the warm Python a rollout's sandbox runs its tools' `python3` in (trainer/warm_python_server.py).

Why: the task families' tools and verifiers start `python3 -c CODE` or `python3 test_*.py` two or three times a
rollout, and each fresh interpreter costs ~9-28 ms of CPU on the cores the sampler shares; a fork of an
interpreter started once per sandbox costs ~4.5-6.5 ms (measured per call, docs/trainer.md). The results are the real
interpreter's, byte for byte (tests/trainer/test_warm_python.py), so the trajectory log and the policy see no
difference.

The server runs as a long-lived sandbox process (`sb.processes`), not a trajectory step: it is plumbing, started
again in every sandbox a rollout gets (a retry's rebuilt sandbox included), and nothing waits for it. Until it
has started and installed its shim, `python3` is the image's own, so a call never waits on it either.
"""

from __future__ import annotations

from pathlib import Path

import dsec
from trainer import warm_python_server
from trainer.warm_python_server import DIR, SHIM

SERVER_SOURCE = Path(warm_python_server.__file__).read_text()
TAG = "dsec-warm-python"
__all__ = ["DIR", "SHIM", "SERVER_SOURCE", "TAG", "start"]


def start(sandbox: dsec.Sandbox, preload: tuple[str, ...] = ()) -> None:
    """Start the sandbox's warm interpreter, importing `preload` modules once (those the task's code imports:
    each call then finds them loaded, as the fork's copy of this clean parent)."""
    process = sandbox.processes.start(["/usr/bin/python3", "-c", SERVER_SOURCE, *preload], tag=TAG)
    process.disconnect()
