"""Task families by name (one file per task)."""

from __future__ import annotations

from trainer.tasks.arithmetic import Arithmetic
from trainer.tasks.base import Problem, Split, Task
from trainer.tasks.fix_module import FixModule
from trainer.tasks.fix_repo import FixRepo

TASKS: dict[str, type] = {"arithmetic": Arithmetic, "fix_module": FixModule, "fix_repo": FixRepo}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task family {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]()


__all__ = ["TASKS", "Problem", "Split", "Task", "get_task"]
