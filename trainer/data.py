"""Text and token data built from the task generators: the tokenizer corpus and SFT demonstrations."""

from __future__ import annotations

import hashlib

from trainer.encoding import Message, ThinkingMode, render_segments
from trainer.tasks import Problem, Split, get_task
from trainer.tokenizer import V4Tokenizer


def problems(families: list[str], split: Split, count: int, seed: int, start: int = 0) -> list[Problem]:
    """`count` problems cycling over the families: index i of the stream is family i % len(families)."""
    out = []
    for i in range(start, start + count):
        family = families[i % len(families)]
        out.append(get_task(family).generate(split, i // len(families), seed))
    return out


def demo_pieces(problem: Problem, mode: ThinkingMode, direct: bool = False) -> list[tuple[str, bool]]:
    """A correct conversation as V4 text pieces (assistant outputs flagged): the SFT target.

    `direct`: the family's answer-without-tools demonstration where it has one (else the tool-using one).
    """
    task = get_task(problem.family)
    msgs = [Message(role="system", content=task.system), Message(role="user", content=problem.prompt)]
    turns = task.direct_demonstration(problem) if direct else None
    msgs += turns if turns is not None else task.demonstration(problem)
    return render_segments(msgs, task.tools, mode, add_generation_prompt=False)


def answers_directly(problem: Problem, fraction: float) -> bool:
    """A stable per-problem coin (hash of its id), so a rebuilt SFT set picks the same demonstrations."""
    digest = hashlib.sha256(f"direct/{problem.id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def sft_examples(tok: V4Tokenizer, families: list[str], count: int, seed: int, mode: ThinkingMode,
                 direct_answer_fraction: float = 0.0) -> list[tuple[list[int], list[int]]]:
    """`count` tokenised train-split demonstrations; `direct_answer_fraction` of them answer without tools."""
    return [tokenize_pieces(tok, demo_pieces(p, mode, answers_directly(p, direct_answer_fraction)))
            for p in problems(families, "train", count, seed)]


def tokenize_pieces(tok: V4Tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Piecewise tokenisation, exactly as a rollout builds its ids; mask is 1 on assistant output."""
    ids: list[int] = []
    mask: list[int] = []
    for text, trainable in pieces:
        piece = tok.encode(text)
        ids += piece
        mask += [int(trainable)] * len(piece)
    return ids, mask


def corpus(families: list[str], seed: int, count: int, mode: ThinkingMode) -> list[str]:
    """Tokenizer training text: every piece of `count` demonstrations (train split only)."""
    return [text for p in problems(families, "train", count, seed) for text, _ in demo_pieces(p, mode)]
