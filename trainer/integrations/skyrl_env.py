"""dsec inside SkyRL: a `skyrl_gym` text environment whose actions' DSML tool calls run in a dsec sandbox.

    import skyrl_gym
    from trainer.integrations.skyrl_env import register
    register()                                   # id "dsec-tools"
    env = skyrl_gym.make("dsec-tools", env_config={"dsec_address": "127.0.0.1:50051"},
                         extras={"problem": problem.model_dump(), "trajectory_id": "run/step-3/prompt-7/sample-1"})
    prompt, info = env.init([])                  # [] → the task's system + user messages; info["tools"]: OpenAI tools
    out = env.step(llm_output_text)              # observations / reward / done / metadata

Why: SkyRL's generator owns the model and the chat template; the environment owns the world. Here the world is one
dsec sandbox per episode, inside the dsec trajectory named by `extras["trajectory_id"]`: a step's tool calls are
logged exactly once, so an episode that a crashed SkyRL run re-plays from the start gets every earlier call's logged
result back instead of running it again (the sandbox is re-attached by the trajectory). Actions are V4 assistant
turns (decode them with special tokens kept: the DSML marker is one); a missing trailing EOS is taken as a finished
turn, as SkyRL's generator strips it. Observations are V4's tool-result user turn (`<tool_result>` blocks, V4 has
no tool role). The episode ends on a turn without tool calls, or at `max_turns`; the reward is the task's verifier,
run in the same sandbox.
"""

from __future__ import annotations

from typing import Any

import dsec
from skyrl_gym.envs.base_text_env import BaseTextEnv, BaseTextEnvStepOutput
from skyrl_gym.envs.registration import register as skyrl_register
from skyrl_gym.envs.registration import registry

from trainer.encoding import EOS, DSMLParseError, parse_assistant, render_tool_results
from trainer.tasks import Problem, get_task
from trainer.tools import ToolBox, open_toolbox

ENV_ID = "dsec-tools"


def config_value(cfg: Any, key: str, default: Any) -> Any:
    """A key of SkyRL's env_config, which is a dict or an OmegaConf DictConfig (both have `get`), or an object."""
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def register(env_id: str = ENV_ID) -> None:
    """Make the environment available to `skyrl_gym.make(env_id, ...)` (idempotent)."""
    if env_id not in registry:
        skyrl_register(id=env_id, entry_point=f"{__name__}:DsecToolEnv")


class DsecToolEnv(BaseTextEnv):
    """One episode = one dsec sandbox in one trajectory. `env_config` keys (all optional): dsec_address, image,
    substrate, tool_timeout_s, sandbox_timeout_s, thinking, max_turns, rebuild (re-create a lost sandbox and
    re-execute its logged calls, see `dsec.Trajectory.sandbox`)."""

    def __init__(self, env_config: Any = None, extras: dict[str, Any] | None = None) -> None:
        super().__init__()
        extras = extras or {}
        if "problem" not in extras or "trajectory_id" not in extras:
            raise ValueError("DsecToolEnv needs extras['problem'] (a trainer.tasks Problem) and "
                             "extras['trajectory_id'] (stable across a resumed run: it is what makes calls run once)")
        problem = extras["problem"]
        self.problem = (Problem.model_validate_json(problem) if isinstance(problem, str)
                        else Problem.model_validate(problem))
        self.task = get_task(self.problem.family)
        self.trajectory_id = str(extras["trajectory_id"])
        cfg = env_config or {}
        self.mode = config_value(cfg, "thinking", "non-think")
        self.max_turns = int(extras.get("max_turns", config_value(cfg, "max_turns", 3)))
        self.image = config_value(cfg, "image", "python")
        self.substrate = config_value(cfg, "substrate", "container")
        self.tool_timeout_s = float(config_value(cfg, "tool_timeout_s", 10.0))
        self.sandbox_timeout_s = float(config_value(cfg, "sandbox_timeout_s", 900.0))
        self.rebuild = bool(config_value(cfg, "rebuild", False))
        self.client = dsec.Client(address=config_value(cfg, "dsec_address", None))
        self.box: ToolBox | None = None
        self.parse_errors = 0

    def init(self, prompt: list[dict[str, str]]) -> tuple[list[dict[str, str]], dict[str, Any]]:
        self.box = open_toolbox(self.client, self.trajectory_id, image=self.image, substrate=self.substrate,
                                timeout_s=self.tool_timeout_s, sandbox_timeout_s=self.sandbox_timeout_s,
                                rebuild=self.rebuild)
        for path, content in self.problem.files.items():
            self.box.write_file(path, content)
        if not prompt:
            prompt = [{"role": "system", "content": self.task.system}, {"role": "user", "content": self.problem.prompt}]
        tools = [{"type": "function", "function": t.model_dump()} for t in self.task.tools]
        return prompt, {"tools": tools, "sandbox_id": self.box.sandbox.id, "restored": self.box.trajectory.restored}

    def step(self, action: str) -> BaseTextEnvStepOutput:
        if self.box is None:
            raise RuntimeError(f"trajectory {self.trajectory_id!r}: call init() before step()")
        self.turns += 1
        text = action if action.endswith(EOS) else action + EOS
        try:
            turn = parse_assistant(text, self.mode)  # type: ignore[arg-type]
        except DSMLParseError as exc:
            self.parse_errors += 1
            results, final = [f"error: malformed tool call: {exc}"], ""
        else:
            results, final = [self.box.execute(call) for call in turn.tool_calls], turn.content
        done = not results or self.turns >= self.max_turns
        reward = self.task.verify(self.problem, final, self.box) if done else 0.0
        observations = [] if done else [{"role": "user", "content": render_tool_results(results)}]
        return BaseTextEnvStepOutput(observations=observations, reward=reward, done=done, metadata=self.get_metrics(),
                                     postprocessed_action=action)

    def get_metrics(self) -> dict[str, Any]:
        stats = self.box.stats if self.box is not None else None
        return {"turns": self.turns, "parse_errors": self.parse_errors,
                "tools_live": stats.live if stats else 0, "tools_replayed": stats.replayed if stats else 0}

    def close(self) -> None:
        """Destroy the episode's sandbox; an episode cut short before close() keeps it until its timeout, so a
        resumed run re-attaches to it and replays."""
        if self.box is not None:
            self.box.close()
            self.box = None
        self.client.close()
