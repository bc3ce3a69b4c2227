"""Fixtures for the trainer tests: a small tokenizer, a short SFT'd tiny policy, and a dsec server that
outlives the trainer processes under test (so a kill -9'd trainer's sandboxes and log are still there)."""

from __future__ import annotations

import shutil
import tempfile
import urllib.request
from pathlib import Path

import pytest
import torch

import dsec
from dsec.sdk.embedded import EmbeddedServer
from trainer.config import ExperimentConfig, SFTConfig
from trainer.data import corpus, demo_pieces, problems, tokenize_pieces
from trainer.policy import build_policy
from trainer.sft import train_sft
from trainer.tokenizer import V4Tokenizer, train

FAMILIES = ["arithmetic", "fix_module"]


@pytest.fixture(scope="session")
def trainer_assets(tmp_path_factory) -> dict[str, Path]:
    """tokenizer.json and a 40-step SFT state dict (enough to emit DSML-shaped turns sometimes)."""
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("trainer-assets")
    tok = train(corpus(FAMILIES, 0, 200, "non-think"), 1024)
    tok.save(out / "tokenizer.json")
    model = build_policy("v4-tiny", tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, 0)
    examples = [tokenize_pieces(tok, demo_pieces(p, "non-think")) for p in problems(FAMILIES, "train", 200, 0)]
    train_sft(model, examples, SFTConfig(steps=30, batch_size=8, lr=3e-3), tok.pad_id, 0)
    torch.save(model.state_dict(), out / "sft.pt")
    return {"tokenizer": out / "tokenizer.json", "sft": out / "sft.pt", "dir": out}


class Server:
    def __init__(self, server: EmbeddedServer, metrics: str) -> None:
        self.server, self.address, self.metrics_address = server, server.address, metrics

    def steps(self) -> dict[str, float]:
        """dsec_trajectory_steps_total by outcome (executed / replayed), summed over kinds."""
        text = urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=10).read().decode()
        totals = {"executed": 0.0, "replayed": 0.0}
        for line in text.splitlines():
            if line.startswith("dsec_trajectory_steps_total{"):
                for outcome in totals:
                    if f'outcome="{outcome}"' in line:
                        totals[outcome] += float(line.rsplit(" ", 1)[1])
        return totals


@pytest.fixture(scope="session")
def dsec_server() -> Server:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics = f"127.0.0.1:{port}"
    server = EmbeddedServer.start(extra_args=["--metrics-listen", metrics])
    try:
        yield Server(server, metrics)
    finally:
        server.stop()


@pytest.fixture
def ray_tmp():
    """A short per-test Ray temp dir (Ray's socket paths must stay under ~100 characters)."""
    path = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def tiny_config(out: Path, **grpo: object) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "run_name": "t", "out_dir": str(out), "seed": 0, "torch_threads": 1,
        "policy": {"name": "v4-tiny", "vocab_size": 1024},
        "tasks": {"families": FAMILIES, "seed": 0, "heldout_size": 4},
        "sandbox": {"image": "python", "default_substrate": "container", "tool_timeout_s": 30},
        "rollout": {"max_turns": 2, "max_new_tokens": 40, "max_total_tokens": 400},
        "grpo": {"steps": 2, "prompts_per_step": 2, "group_size": 2, "lr": 1e-3, **grpo},
    })


@pytest.fixture
def make_config():
    return tiny_config


@pytest.fixture(scope="session")
def teacher_weights(trainer_assets, tmp_path_factory) -> dict[str, Path]:
    """Two distinct experts (OPD teachers): the SFT policy perturbed with a different seed per family."""
    out = tmp_path_factory.mktemp("opd-teachers")
    base = torch.load(trainer_assets["sft"], weights_only=True)
    paths = {}
    for seed, family in enumerate(["arithmetic", "fix_module"], start=1):
        gen = torch.Generator().manual_seed(seed)
        state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                 for k, v in base.items()}
        paths[family] = out / f"{family}.pt"
        torch.save({"model": state}, paths[family])  # a learner checkpoint's layout
    return paths


# The short-SFT policy in eval mode and a client of the shared server: rollout tests that need both use these
# (a test file that defines its own of either name overrides it).
@pytest.fixture(scope="module")
def policy(trainer_assets):
    torch.set_num_threads(2)
    tok = V4Tokenizer.load(trainer_assets["tokenizer"])
    model = build_policy("v4-tiny", tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, 0)
    model.load_state_dict(torch.load(trainer_assets["sft"], weights_only=True))
    return model.eval(), tok


@pytest.fixture
def client(dsec_server):
    with dsec.Client(address=dsec_server.address) as c:
        yield c
