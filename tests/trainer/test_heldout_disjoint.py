"""Held-out problems are disjoint from every training problem by content (prompt and files), at the sizes the
committed configs draw: SFT demonstrations, RL prompts, the OPD recipe's experts, OPD and its GRPO baseline."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import ExperimentConfig, load_config
from trainer.data import problems
from trainer.opd import OPDExperiment
from trainer.tasks import TASKS, get_task
from trainer.tasks.base import HELDOUT_SHARE, ExhaustedSplit, content_key, split_of

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "trainer" / "configs").glob("*.yaml"))
HELDOUT_FLOOR = 256  # held-out problems a family in the benches' evaluations (issue #18: >= 256 a family)


def _per_family(count: int, families: list[str]) -> int:
    """Problems of one family among the first `count` of a stream cycling over `families`."""
    return -(-count // len(families))


def _budget(path: Path) -> tuple[dict[str, int], dict[str, int], int]:
    """Per family: how far into its train stream and its held-out stream the config's runs reach; the seed."""
    cfg = load_config(path, model=OPDExperiment if "\nrecipe:" in path.read_text() else ExperimentConfig)
    exp = cfg if isinstance(cfg, OPDExperiment) else None
    families = cfg.tasks.families
    rl_prompts = cfg.grpo.steps * cfg.grpo.prompts_per_step
    train = {f: _per_family(cfg.sft.examples + rl_prompts, families) for f in families}
    held = {f: max(_per_family(cfg.tasks.heldout_size, families), HELDOUT_FLOOR) for f in families}
    if exp is not None:
        r = exp.recipe
        opd = exp.opd_grpo()
        student = cfg.sft.examples + max(r.steps * opd.prompts_per_step, (r.grpo_steps or r.steps) *
                                         cfg.grpo.prompts_per_step)
        for f in families:  # an expert trains on its family alone: all of sft.examples, then its own GRPO
            expert = cfg.sft.examples + r.expert_grpo_steps * cfg.grpo.prompts_per_step
            train[f] = max(train[f], _per_family(student, families), expert)
            held[f] = max(held[f], r.eval_size)
    return train, held, cfg.tasks.seed


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_heldout_is_disjoint_from_training_by_content(path):
    train_sizes, held_sizes, seed = _budget(path)
    for family in train_sizes:
        train = problems([family], "train", train_sizes[family], seed)
        held = problems([family], "heldout", held_sizes[family], seed)
        assert not {content_key(p) for p in train} & {content_key(p) for p in held}, family
        assert not {p.prompt for p in train} & {p.prompt for p in held}, family  # the symptom
        train_files = {(name, text) for p in train for name, text in p.files.items()}
        assert not train_files & {(name, text) for p in held for name, text in p.files.items()}, family
        # and within a split every problem is a different one (SFT and RL never repeat a problem either)
        assert len({content_key(p) for p in train}) == len(train)
        assert len({content_key(p) for p in held}) == len(held)


@pytest.mark.parametrize("family", sorted(TASKS))
def test_the_split_is_a_function_of_content_across_seeds(family):
    """Whatever seed drew it, a content lands on one side only: seeds cannot leak held-out problems."""
    for seed in (0, 1, 7):
        assert all(split_of(p) == "train" for p in problems([family], "train", 300, seed))
        assert all(split_of(p) == "heldout" for p in problems([family], "heldout", 100, seed))
    held = {content_key(p) for p in problems([family], "heldout", 100, 0)}
    assert not held & {content_key(p) for p in problems([family], "train", 1000, 1)}


def test_every_family_is_in_a_committed_config():
    """So the disjointness test above checks every family at the sizes a committed run draws."""
    assert set(TASKS) <= {f for path in CONFIGS for f in _budget(path)[0]}


def test_fix_module_has_thousands_of_distinct_problems():
    held = problems(["fix_module"], "heldout", 1000, 0)
    train = problems(["fix_module"], "train", int(1000 * (1 - HELDOUT_SHARE) / HELDOUT_SHARE), 0)
    assert len({p.prompt for p in train + held}) == len(train) + len(held) >= 4000


def test_a_family_that_runs_out_says_so():
    from trainer.tasks.base import _MAX_BARREN_CANDIDATES, ContentSplitTask, Problem

    class Tiny(ContentSplitTask):
        name = "tiny"

        def candidate(self, rng):
            return Problem(id="", family=self.name, prompt=f"p{rng.randrange(3)}")

    with pytest.raises(ExhaustedSplit, match="tiny: no new train problem"):
        Tiny().generate("train", 3, 0)
    assert _MAX_BARREN_CANDIDATES >= 10_000


def test_problem_ids_and_contents_are_stable():
    task = get_task("fix_module")
    a, b = task.generate("heldout", 5, 0), task.generate("heldout", 5, 0)
    assert a == b and a.id == "fix_module-heldout-5"
    a.files["/work/mod.py"] = "changed"  # a caller's edit does not reach the stream's cached copy
    assert task.generate("heldout", 5, 0) == b
