"""The environment API, kept apart from the trainer (tinker-cookbook style).

A task family procedurally generates seeded problems, knows its tools and the sandbox it needs, writes a
correct demonstration (for SFT) and verifies a finished conversation inside the rollout's sandbox.
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import BaseModel, Field

from trainer.encoding import Message, ToolSchema

if TYPE_CHECKING:
    from trainer.tools import ToolBox

Split = Literal["train", "heldout"]


class Problem(BaseModel):
    id: str
    family: str
    prompt: str
    files: dict[str, str] = Field(default_factory=dict)  # written into the sandbox before the first turn
    answer: str = ""
    data: dict[str, object] = Field(default_factory=dict)


def problem_rng(family: str, split: Split, index: int, seed: int) -> random.Random:
    """Disjoint, reproducible streams per (family, split, index, seed): held-out never overlaps train."""
    digest = hashlib.sha256(f"{family}/{split}/{index}/{seed}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class Task(Protocol):
    name: str
    system: str
    tools: list[ToolSchema]

    def generate(self, split: Split, index: int, seed: int) -> Problem: ...

    def demonstration(self, problem: Problem) -> list[Message]:
        """A correct conversation after the user prompt: assistant turns and tool-result user turns."""
        ...

    def direct_demonstration(self, problem: Problem) -> list[Message] | None:
        """A correct conversation that answers without any tool call, or None where the family has none."""
        ...

    def verify(self, problem: Problem, final: str, box: ToolBox) -> float:
        """Reward in [0, 1] for the final assistant content; checks run in the rollout's sandbox."""
        ...
