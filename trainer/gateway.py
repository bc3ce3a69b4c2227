"""An OpenAI-compatible policy gateway: `/v1/chat/completions` served by the current policy weights, recording
every sampled token id and log-prob as training data.

    .venv/bin/python -m trainer.gateway --tokenizer runs/tiny-cpu/tokenizer.json \\
        [--weights runs/tiny-cpu/learner.pt] [--port 8000] [--thinking non-think] [--journal samples.jsonl]

Why: agent harnesses speak the OpenAI API, not dsec's rollout loop. Pointed at this gateway (and at dsec for
their tools, inside `dsec.trajectory(...)`, so every tool call is logged exactly once), any harness produces
GRPO samples: OpenAI `tools` are rendered into the V4 system prompt by trainer.encoding, DSML calls in the
output come back as OpenAI `tool_calls`, and requests are grouped into trajectories by the `X-Dsec-Trajectory`
header (else the `user` field; else each request is its own). `GET /v1/trajectories/{id}/samples` exports them
as the learner's `Rollout`s (trainer/gateway_store.py says how the ids stay exact across turns).

`--weights` is re-read when the file changes (a GRPO run rewrites `learner.pt` after every step), so the gateway
serves the trainer's current policy; each sample records the policy version that produced each turn. With no
weights it serves the random-init policy of `--policy`. Log-probs are log π(token) at temperature 1, what the
learner recomputes, from one scoring forward pass over prompt + completion. `stream: true` is answered as
server-sent events once the choice is complete (the sampler has no per-token callback): same protocol, no
earlier first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from trainer.encoding import END_THINK, DSMLParseError, ThinkingMode, ToolCall, parse_assistant, render_segments
from trainer.gateway_schema import (
    ChatRequest,
    GatewayError,
    openai_tool_calls,
    parse_request,
    parse_tools_enabled,
    to_v4,
    tool_schemas,
)
from trainer.gateway_store import Recorder, Turn
from trainer.policy import build_policy
from trainer.sampler import right_pad, sample, sample_generator
from trainer.tokenizer import V4Tokenizer

log = logging.getLogger("trainer.gateway")
TRAJECTORY_HEADER = "x-dsec-trajectory"


class PolicySource:
    """The policy weights the gateway samples from: a checkpoint file reloaded when it changes, or random init."""

    def __init__(self, tok: V4Tokenizer, policy: str, weights: Path | None, seed: int = 0) -> None:
        self.tok, self.weights = tok, weights
        self.model = build_policy(policy, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, seed).eval()
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.version = 0  # the checkpoint's GRPO step, else a count of (re)loads: samples carry it
        self._stamp: int | None = None
        self.refresh()

    def refresh(self) -> None:
        """Reload when the weights file changed (size or mtime); a file being replaced is read after its rename."""
        if self.weights is None:
            return
        try:
            st = self.weights.stat()
        except FileNotFoundError:
            raise GatewayError(503, f"policy weights {self.weights} are missing", type="server_error") from None
        stamp = hash((st.st_mtime_ns, st.st_size))
        if stamp == self._stamp:
            return
        state = torch.load(self.weights, weights_only=False, map_location="cpu")
        self.model.load_state_dict(state["model"] if isinstance(state, dict) and "model" in state else state)
        self.model.eval()
        manifest = state.get("manifest") if isinstance(state, dict) else None
        # a trainer checkpoint names its GRPO step (trainer/checkpoint.py): the version async trainers compare
        self.version = int(manifest["step"]) if isinstance(manifest, dict) and "step" in manifest else self.version + 1
        self._stamp = stamp


@dataclass
class Choice:
    ids: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]]
    finish_reason: str
    content: str | None
    reasoning: str
    tool_calls: list[dict[str, Any]]  # OpenAI shape
    calls: list[ToolCall]  # the same, parsed


class Gateway:
    """Turns chat requests into sampled choices and records them. One model, one lock: requests take turns."""

    def __init__(self, source: PolicySource, mode: ThinkingMode, model_name: str = "dsec-policy",
                 default_max_tokens: int = 256, journal: Path | None = None) -> None:
        self.source, self.tok, self.mode = source, source.tok, mode
        self.model_name, self.default_max_tokens = model_name, default_max_tokens
        self.recorder = Recorder(journal)
        self._lock = threading.Lock()

    # -- prompt ------------------------------------------------------------------------------------------
    def prompt(self, req: ChatRequest, trajectory_id: str
               ) -> tuple[list[int], list[int], list[float | None], list[str]]:
        """Prompt ids, piecewise like a rollout; assistant turns this gateway sampled come back as their exact ids
        (mask 1, with their log-probs), unless V4's rendering drops their reasoning, which the ids contain."""
        messages = to_v4(req.messages)
        echoed = [(i, m) for i, m in enumerate(req.messages) if m.role == "assistant"]
        assistants = [m for m in messages if m.role == "assistant"]
        matched: list[Turn | None] = []
        for (i, m), v4 in zip(echoed, assistants):
            calls = list(zip([c.id for c in m.tool_calls or []], v4.tool_calls))
            turn = self.recorder.match(trajectory_id, m.text(i), calls)
            if turn is not None:
                v4.reasoning = turn.reasoning  # clients often drop reasoning_content; the policy did write it
            matched.append(turn)
        turns = iter(matched)
        ids: list[int] = []
        mask: list[int] = []
        lps: list[float | None] = []
        parents: list[str] = []
        for text, is_assistant in render_segments(messages, tool_schemas(req), self.mode):
            turn = next(turns) if is_assistant else None
            if turn is not None and (self.mode == "non-think" or text.startswith(turn.reasoning + END_THINK)):
                ids += turn.completion_ids
                mask += [1] * len(turn.completion_ids)
                lps += turn.logprobs
                parents.append(turn.turn_id)
            else:
                piece = self.tok.encode(text)
                ids += piece
                mask += [0] * len(piece)
                lps += [None] * len(piece)
        return ids, mask, lps, parents

    # -- sampling ----------------------------------------------------------------------------------------
    def complete(self, req: ChatRequest, trajectory_id: str) -> dict[str, Any]:
        parse_calls = parse_tools_enabled(req)
        with self._lock:
            self.source.refresh()
            version = self.source.version
            prompt, mask, lps, parents = self.prompt(req, trajectory_id)
            room = self.source.context - len(prompt)
            if room < 1:
                raise GatewayError(400, f"the prompt is {len(prompt)} tokens; the policy's context is "
                                        f"{self.source.context}", param="messages", code="context_length_exceeded")
            wanted = req.max_completion_tokens or req.max_tokens or self.default_max_tokens
            budget = min(wanted, room)
            seed = req.seed if req.seed is not None else secrets.randbits(63)
            gens = [sample_generator("gateway", seed, i) for i in range(req.n)]
            outs = sample(self.source.model, [prompt] * req.n, gens, max_new_tokens=[budget] * req.n,
                          eos_id=self.tok.eos_id, pad_id=self.tok.pad_id, temperature=req.temperature, top_p=req.top_p)
            scored = self._score(prompt, outs, req.top_logprobs or 0)
        request_id = secrets.token_hex(8)
        choices = []
        for i, (new, (logprobs, top)) in enumerate(zip(outs, scored)):
            choice = self._choice(new, logprobs, top, parse_calls, f"call_{request_id}_{i}")
            choices.append(choice)
            self.recorder.record(trajectory_id, Turn(
                turn_id=f"call_{request_id}_{i}", request_id=request_id, choice=i, prompt_ids=prompt,
                prompt_mask=mask, prompt_logprobs=lps, completion_ids=new, logprobs=logprobs,
                content=choice.content or "", reasoning=choice.reasoning, tool_calls=choice.calls,
                finish_reason=choice.finish_reason, policy_version=version, parents=parents))
        return self._response(request_id, req, prompt, choices)

    @torch.no_grad()
    def _score(self, prompt: list[int], outs: list[list[int]], top_k: int
               ) -> list[tuple[list[float], list[list[tuple[int, float]]]]]:
        """log π of each sampled id (temperature 1) and, if asked, the top-k alternatives, from one forward pass."""
        seqs = [prompt + new for new in outs]
        logp = torch.log_softmax(self.source.model(input_ids=right_pad(seqs, self.tok.pad_id)).logits.float(), -1)
        out = []
        for row, new in enumerate(outs):
            pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(new))
            dist = logp[row, pos]
            chosen = dist.gather(-1, torch.tensor(new, dtype=torch.long).unsqueeze(-1)).squeeze(-1).tolist()
            top = []
            if top_k:
                values, idx = dist.topk(min(top_k, dist.shape[-1]), dim=-1)
                top = [list(zip(i.tolist(), v.tolist())) for i, v in zip(idx, values)]
            out.append((chosen, top))
        return out

    def _choice(self, new: list[int], logprobs: list[float], top: list, parse_calls: bool, call_prefix: str
                ) -> Choice:
        text = self.tok.decode(new)
        ended = bool(new) and new[-1] == self.tok.eos_id
        finish = "stop" if ended else "length"
        raw = text[: -len(self.tok.decode([self.tok.eos_id]))] if ended else text
        try:
            turn = parse_assistant(text, self.mode)
        except DSMLParseError:
            return Choice(new, logprobs, top, finish, raw, "", [], [])  # not a valid turn: the text, as vLLM does
        if parse_calls and turn.tool_calls and ended:
            return Choice(new, logprobs, top, "tool_calls", turn.content or None, turn.reasoning,
                          openai_tool_calls(turn.tool_calls, call_prefix), turn.tool_calls)
        return Choice(new, logprobs, top, finish, turn.content if parse_calls else raw, turn.reasoning, [], [])

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.tok.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def _response(self, request_id: str, req: ChatRequest, prompt: list[int], choices: list[Choice]) -> dict[str, Any]:
        out = []
        for i, c in enumerate(choices):
            message: dict[str, Any] = {"role": "assistant", "content": c.content}
            if c.tool_calls:
                message["tool_calls"] = c.tool_calls
            if c.reasoning:
                message["reasoning_content"] = c.reasoning
            logprobs = None
            if req.logprobs:
                logprobs = {"content": [
                    {**self._token(t, lp),
                     "top_logprobs": [self._token(a, alp) for a, alp in (c.top[j] if c.top else [])]}
                    for j, (t, lp) in enumerate(zip(c.ids, c.logprobs))]}
            out.append({"index": i, "message": message, "finish_reason": c.finish_reason, "logprobs": logprobs,
                        "token_ids": c.ids})
        completion_tokens = sum(len(c.ids) for c in choices)
        return {"id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": out, "prompt_token_ids": prompt,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                          "total_tokens": len(prompt) + completion_tokens}}


def _chunks(resp: dict[str, Any]) -> Iterator[str]:
    """A finished completion as chat.completion.chunk events: role + content, tool calls, finish, [DONE]."""
    base = {"id": resp["id"], "object": "chat.completion.chunk", "created": resp["created"], "model": resp["model"]}

    def event(index: int, delta: dict[str, Any], finish: str | None, **extra: Any) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": finish, **extra}
        return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"

    for c in resp["choices"]:
        m = c["message"]
        delta: dict[str, Any] = {"role": "assistant", "content": m["content"] or ""}
        if m.get("reasoning_content"):
            delta["reasoning_content"] = m["reasoning_content"]
        yield event(c["index"], delta, None, logprobs=c["logprobs"])
        if m.get("tool_calls"):
            yield event(c["index"], {"tool_calls": [{"index": k, **call} for k, call in enumerate(m["tool_calls"])]},
                        None)
        yield event(c["index"], {}, c["finish_reason"])
    yield "data: [DONE]\n\n"


def _error(exc: GatewayError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def build_app(gateway: Gateway) -> Starlette:
    async def chat(request: Request) -> Response:
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise GatewayError(400, f"the request body is not JSON: {exc}") from None
            req = parse_request(body)
            if req.model != gateway.model_name:
                raise GatewayError(404, f"model {req.model!r} does not exist; this gateway serves "
                                        f"{gateway.model_name!r}", param="model", code="model_not_found")
            trajectory_id = request.headers.get(TRAJECTORY_HEADER) or req.user or f"request-{secrets.token_hex(8)}"
            resp = await run_in_threadpool(gateway.complete, req, trajectory_id)
        except GatewayError as exc:
            return _error(exc)
        if req.stream:
            return StreamingResponse(_chunks(resp), media_type="text/event-stream")
        return JSONResponse(resp, headers={"X-Dsec-Trajectory": trajectory_id})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": gateway.model_name, "object": "model",
                                                         "created": 0, "owned_by": "dsec"}]})

    async def samples(request: Request) -> Response:
        tid = request.path_params["tid"]
        try:
            found = gateway.recorder.samples(tid)
        except KeyError:
            return _error(GatewayError(404, f"no requests were recorded for trajectory {tid!r}", code="not_found"))
        return JSONResponse({"trajectory_id": tid, "samples": [s.to_json() for s in found]})

    async def reward(request: Request) -> Response:
        tid = request.path_params["tid"]
        try:
            value = float(json.loads(await request.body())["reward"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            return _error(GatewayError(400, 'the body must be {"reward": <number>}', param="reward"))
        try:
            gateway.recorder.set_reward(tid, value)
        except KeyError:
            return _error(GatewayError(404, f"no requests were recorded for trajectory {tid!r}", code="not_found"))
        return JSONResponse({"trajectory_id": tid, "reward": value})

    async def forget(request: Request) -> Response:
        tid = request.path_params["tid"]
        try:
            turns = gateway.recorder.forget(tid)
        except KeyError:
            return _error(GatewayError(404, f"no requests were recorded for trajectory {tid!r}", code="not_found"))
        return JSONResponse({"trajectory_id": tid, "deleted_turns": turns})

    async def trajectories(request: Request) -> Response:
        return JSONResponse({"trajectory_ids": gateway.recorder.trajectory_ids()})

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "policy_version": gateway.source.version})

    async def crashed(request: Request, exc: Exception) -> Response:
        log.exception("gateway request failed")  # the trace goes to the log, never to the client
        return _error(GatewayError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    return Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/trajectories", trajectories, methods=["GET"]),
        Route("/v1/trajectories/{tid:path}/samples", samples, methods=["GET"]),
        Route("/v1/trajectories/{tid:path}/reward", reward, methods=["POST"]),
        Route("/v1/trajectories/{tid:path}", forget, methods=["DELETE"]),
        Route("/health", health, methods=["GET"]),
    ], exception_handlers={Exception: crashed})


def serve(app: Starlette, host: str, port: int) -> None:
    """Bind first, then print the ready line with the real port (port 0 picks a free one): callers wait on it."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # before the ready line: a client that connects at once is queued, not refused
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    print(f"gateway listening on http://{host}:{sock.getsockname()[1]}/v1", flush=True)
    asyncio.run(server.serve(sockets=[sock]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--weights", type=Path, help="state_dict or learner.pt; reloaded when it changes")
    parser.add_argument("--policy", default="v4-tiny", help="named config or transformers model (random init)")
    parser.add_argument("--thinking", default="non-think", choices=["non-think", "high", "max"])
    parser.add_argument("--model-name", default="dsec-policy", help="the `model` clients must name")
    parser.add_argument("--max-tokens", type=int, default=256, help="completion budget when a request sets none")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--journal", type=Path, help="JSONL file the recorder appends to and replays at start")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    tok = V4Tokenizer.load(args.tokenizer)
    source = PolicySource(tok, args.policy, args.weights)
    gateway = Gateway(source, args.thinking, args.model_name, args.max_tokens, args.journal)
    try:
        serve(build_app(gateway), args.host, args.port)
    finally:
        gateway.recorder.close()


if __name__ == "__main__":
    main()
