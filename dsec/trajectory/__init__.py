"""The preemption-safe trajectory log: durable, exactly-once tool calls that a resumed rollout replays.

`dsec.trajectory` is both this package (the server side: log backends, the step coordinator, export) and the
SDK's context manager `dsec.trajectory("run-7/prompt-42/sample-3")`. Once anything imports this package,
Python binds the package to the attribute `dsec.trajectory`, which would hide the SDK entry point; so the
package module itself is made callable and forwards to `dsec.sdk.trajectory.trajectory`.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from dsec.sdk.trajectory import trajectory

        return trajectory(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
