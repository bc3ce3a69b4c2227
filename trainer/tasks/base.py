"""The environment API, kept apart from the trainer (tinker-cookbook style).

A task family procedurally generates seeded problems, knows its tools and the sandbox it needs, writes a
correct demonstration (for SFT) and verifies a finished conversation inside the rollout's sandbox. Train and
held-out problems are split by a hash of their content (prompt and files), not by seed stream: a held-out problem
is never one the policy was trained on, however many problems a run draws.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
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


# Share of a family's problem contents that are held out. Which side a problem falls on is a function of its content
# alone (prompt and files), so no held-out problem can appear among the training problems (SFT or RL) of any
# run, whatever the sizes, seeds or stream positions.
HELDOUT_SHARE = 0.25
# A request that finds no new content for its split in this many candidates means the family has run out.
_MAX_BARREN_CANDIDATES = 100_000


class ExhaustedSplit(ValueError):
    """A family has fewer distinct problems in a split than were asked for (widen its generator)."""


def content_key(problem: Problem) -> str:
    """sha256 of what defines a problem to the policy and the verifier: the prompt and the files, canonically."""
    blob = json.dumps({"prompt": problem.prompt, "files": problem.files}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def split_of(problem: Problem) -> Split:
    """The split a problem's content belongs to: the first 8 bytes of its content hash against HELDOUT_SHARE."""
    return _side(content_key(problem))


def _side(key: str) -> Split:
    return "heldout" if int(key[:16], 16) / 2**64 < HELDOUT_SHARE else "train"


def candidate_rng(family: str, seed: int, number: int) -> random.Random:
    """One seeded stream of candidates per (family, seed), shared by both splits: the split is decided after."""
    digest = hashlib.sha256(f"{family}/{seed}/{number}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class _SplitStream:
    """A family's candidates for one seed, dealt to the split their content hash names.

    Repeated contents are skipped, so the problems of a split are all different: SFT (indices from 0) and RL
    (indices from the cursor after them) never share a problem either, and a held-out score counts distinct
    problems. Candidates are dealt once and kept, so index i of a split is stable within a process and across them.
    """

    def __init__(self, task: ContentSplitTask, seed: int) -> None:
        self.task, self.seed = task, seed
        self.dealt: dict[Split, list[Problem]] = {"train": [], "heldout": []}
        self.seen: set[str] = set()
        self.next = 0
        self.lock = threading.Lock()

    def get(self, split: Split, index: int) -> Problem:
        with self.lock:
            barren = 0
            while len(self.dealt[split]) <= index:
                if barren > _MAX_BARREN_CANDIDATES:
                    raise ExhaustedSplit(f"{self.task.name}: no new {split} problem in {barren} candidates after "
                                         f"{len(self.dealt[split])} (seed {self.seed}); widen the generator")
                problem = self.task.candidate(candidate_rng(self.task.name, self.seed, self.next))
                self.next += 1
                key = content_key(problem)
                if key in self.seen:
                    barren += 1
                    continue
                self.seen.add(key)
                side = _side(key)
                self.dealt[side].append(problem)
                barren = 0 if side == split else barren + 1
            problem = self.dealt[split][index]
        return problem.model_copy(update={"id": f"{self.task.name}-{split}-{index}"}, deep=True)


_STREAMS: dict[tuple, _SplitStream] = {}
_STREAMS_LOCK = threading.Lock()


class ContentSplitTask:
    """Gives a family `generate(split, index, seed)` from its `candidate(rng)`, split by content (see above)."""

    name: str

    def candidate(self, rng: random.Random) -> Problem:
        """One problem drawn from `rng` (its id is set by `generate`)."""
        raise NotImplementedError

    def generator_params(self) -> tuple:
        """Constructor arguments that change what `candidate` draws (part of the stream cache key)."""
        return ()

    def generate(self, split: Split, index: int, seed: int) -> Problem:
        key = (self.name, self.generator_params(), seed)
        with _STREAMS_LOCK:
            stream = _STREAMS.get(key)
            if stream is None:
                stream = _STREAMS[key] = _SplitStream(self, seed)
        return stream.get(split, index)


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
