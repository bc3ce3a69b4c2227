"""The OpenAI chat-completions wire schema the gateway accepts, and its translation to V4 messages and back.

Why a module of its own: the HTTP glue (trainer/gateway.py) and the trajectory recorder (gateway_store.py) both
need the same view of a request: V4 `Message`s and `ToolSchema`s, rendered by trainer.encoding exactly like a
rollout renders them. Everything a client can get wrong becomes a `GatewayError` with the HTTP status and error
`type` the `openai` client maps to its exception classes (400 → BadRequestError, 404 → NotFoundError).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainer.encoding import Message, ToolCall, ToolSchema, to_json

MAX_N = 16  # choices per request: each is a full sequence in the sampler's batch


class GatewayError(Exception):
    """An error the client caused or must act on, sent as OpenAI's `{"error": {...}}` body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Lenient(BaseModel):
    # Clients echo whole response messages back (refusal, annotations, audio: all null): ignore what we do not use.
    model_config = ConfigDict(extra="ignore")


class FunctionDef(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolDef(_Lenient):
    type: Literal["function"]
    function: FunctionDef


class FunctionCall(_Lenient):
    name: str
    arguments: str


class ToolCallIn(_Lenient):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # DeepSeek's API field for the thinking text

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise GatewayError(400, f"messages[{index}]: content part of type {part.type!r} is not supported "
                                        "(the policy reads text only)", param=f"messages[{index}].content")
        return "".join(part.text or "" for part in self.content)


# Parameters that would change what is sampled but that the gateway does not implement: refused, never ignored.
UNSUPPORTED = ("stop", "response_format", "logit_bias", "functions", "function_call", "audio", "prediction")


class ChatRequest(_Lenient):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDef] | None = None
    tool_choice: Any = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    user: str | None = None
    stream: bool = False
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stop: Any = None
    response_format: Any = None
    logit_bias: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    modalities: list[str] | None = None


def parse_request(body: Any) -> ChatRequest:
    """Validate a JSON body; every failure is a 400 naming the parameter."""
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise GatewayError(400, f"invalid parameter {param}: {err['msg']}", param=param) from None
    for name in UNSUPPORTED:
        if getattr(req, name) not in (None, [], {}):
            raise GatewayError(400, f"parameter {name!r} is not supported by this gateway", param=name,
                               code="unsupported_parameter")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise GatewayError(400, f"parameter {name!r} must be 0 or unset: the sampler applies no penalties",
                               param=name, code="unsupported_parameter")
    if req.modalities not in (None, ["text"]):
        raise GatewayError(400, "only the text modality is served", param="modalities", code="unsupported_parameter")
    if req.top_logprobs and not req.logprobs:
        raise GatewayError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    parse_tools_enabled(req)
    return req


def parse_tools_enabled(req: ChatRequest) -> bool:
    """`tool_choice`: "auto"/unset parse DSML calls, "none" returns the text as is. Forcing a call ("required",
    a named function) needs constrained decoding, which this sampler does not have: refused rather than faked."""
    choice = req.tool_choice
    if choice in (None, "auto"):
        return True
    if choice == "none":
        return False
    raise GatewayError(400, f"tool_choice {choice!r} is not supported (only 'auto' and 'none')", param="tool_choice",
                       code="unsupported_parameter")


def tool_schemas(req: ChatRequest) -> list[ToolSchema]:
    names = [t.function.name for t in req.tools or []]
    if len(set(names)) != len(names):
        raise GatewayError(400, f"duplicate tool names in {names}", param="tools")
    return [ToolSchema(name=t.function.name, description=t.function.description, parameters=t.function.parameters)
            for t in req.tools or []]


def _arguments(call: ToolCallIn, index: int) -> dict[str, Any]:
    try:
        args = json.loads(call.function.arguments or "{}")
    except json.JSONDecodeError as exc:
        raise GatewayError(400, f"messages[{index}]: tool call {call.id} arguments are not JSON: {exc.msg}",
                           param=f"messages[{index}].tool_calls") from None
    if not isinstance(args, dict):
        raise GatewayError(400, f"messages[{index}]: tool call {call.id} arguments must be a JSON object",
                           param=f"messages[{index}].tool_calls")
    return args


def to_v4(messages: list[ChatMessage]) -> list[Message]:
    """OpenAI messages → V4 turns. V4 has no `tool` role: tool results (in the order of the calls they answer)
    and any user text right after them form one user turn, as shared/DSML.md renders it."""
    out: list[Message] = []
    pending: dict[str, int] = {}  # tool_call_id -> position among the last assistant turn's calls
    for i, m in enumerate(messages):
        if pending and m.role != "tool":
            raise GatewayError(400, f"messages[{i}]: tool calls {sorted(pending)} of the assistant message before it "
                                    "have no tool message answering them", param=f"messages[{i}]")
        if m.role in ("system", "developer"):
            out.append(Message(role="system", content=m.text(i)))
        elif m.role == "assistant":
            calls = [ToolCall(name=c.function.name, arguments=_arguments(c, i)) for c in m.tool_calls or []]
            out.append(Message(role="assistant", content=m.text(i), reasoning=m.reasoning_content or "",
                               tool_calls=calls))
            pending = {c.id: k for k, c in enumerate(m.tool_calls or [])}
        elif m.role == "tool":
            if m.tool_call_id not in pending:
                raise GatewayError(400, f"messages[{i}]: tool message answers {m.tool_call_id!r}, which is not a "
                                        "call of the preceding assistant message", param=f"messages[{i}].tool_call_id")
            if not out or out[-1].role != "user" or not out[-1].tool_results:
                out.append(Message(role="user", tool_results=[""] * len(pending)))
            out[-1].tool_results[pending.pop(m.tool_call_id)] = m.text(i)
        else:
            if out and out[-1].role == "user" and out[-1].tool_results and not out[-1].content:
                out[-1].content = m.text(i)
            else:
                out.append(Message(role="user", content=m.text(i)))
    if pending and messages[-1].role == "tool":
        raise GatewayError(400, f"tool calls {sorted(pending)} have no tool message answering them", param="messages")
    if not any(m.role == "user" for m in out):
        raise GatewayError(400, "messages hold no user turn", param="messages")
    if out[-1].role == "assistant":
        raise GatewayError(400, "the last message is the assistant's: continuing a partial assistant turn is not "
                                "supported", param="messages")
    return out


def openai_tool_calls(calls: list[ToolCall], prefix: str) -> list[dict[str, Any]]:
    """Parsed DSML calls as OpenAI `tool_calls`; ids `{prefix}_{k}` let a later request be matched to this turn."""
    return [{"id": f"{prefix}_{k}", "type": "function",
             "function": {"name": c.name, "arguments": to_json(c.arguments)}} for k, c in enumerate(calls)]
