"""The DeepSeek-V4 chat encoding and DSML tool calls (shared/DSML.md), as text.

Why a hand-written encoder: the policy, the rollout engine and the SFT data must agree byte for byte with the
published V4 format, so that a real V4 checkpoint could replace the tiny policy. Rendering lives here; token
ids live in `trainer.tokenizer`. The parser is strict like the reference: anything malformed raises
`DSMLParseError`, which the rollout engine turns into a tool error the policy sees.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, Field

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK = "<think>"
END_THINK = "</think>"
DSML = "｜DSML｜"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, USER, ASSISTANT, LATEST_REMINDER, THINK, END_THINK, DSML)

TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAM_CLOSE = f"</{DSML}parameter>"

ThinkingMode = Literal["non-think", "high", "max"]
# Verbatim from the published V4 encoder (shared/DSML.md): the Think-Max preamble and the tools section. The
# tools section ends with a newline, so the next turn's `<｜User｜>` starts a line.
THINK_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause,"
    " rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered"
    " alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

TOOLS_TEMPLATE = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a"
    f' "{TOOL_CALLS_OPEN}" block like the following:\n\n'
    f"{TOOL_CALLS_OPEN}\n"
    f'<{DSML}invoke name="$TOOL_NAME">\n'
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAM_CLOSE}\n'
    "...\n"
    f"{INVOKE_CLOSE}\n"
    f'<{DSML}invoke name="$TOOL_NAME2">\n'
    "...\n"
    f"{INVOKE_CLOSE}\n"
    f"{TOOL_CALLS_CLOSE}\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans,'
    ' arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    f"If thinking_mode is enabled (triggered by {THINK}), you MUST output your complete reasoning inside"
    f" {THINK}...{END_THINK} BEFORE any tool calls or final response.\n\n"
    f"Otherwise, output directly after {END_THINK} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
    "{tool_schemas}\n\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)


def to_json(value: Any) -> str:
    """JSON as V4 writes it: non-ASCII characters kept (a tokenizer sees `é`, not `\\u00e9`)."""
    return json.dumps(value, ensure_ascii=False)


class DSMLParseError(ValueError):
    """A malformed DSML tool-call block (the reference parser's strictness, kept on purpose)."""


class ToolSchema(BaseModel):
    name: str
    description: str
    parameters: dict[str, Any]


class ToolCall(BaseModel):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class Message(BaseModel):
    """One chat turn. There is no `tool` role: tool results ride in the next user turn."""

    role: Literal["system", "user", "assistant"]
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_results: list[str] = Field(default_factory=list)


def render_tools(tools: list[ToolSchema]) -> str:
    """The V4 tools section: one JSON line per tool (the OpenAI `function` object) in the verbatim template."""
    return TOOLS_TEMPLATE.replace("{tool_schemas}", "\n".join(to_json(t.model_dump()) for t in tools))


def render_system(system: str, tools: list[ToolSchema], mode: ThinkingMode) -> str:
    """System prompt text: Think-Max prefix, the caller's text, then "\\n\\n" and the tools section when tools
    exist (as V4 renders a system message that carries tools, even an empty one)."""
    text = (THINK_MAX_PREFIX if mode == "max" else "") + system
    return text + "\n\n" + render_tools(tools) if tools else text


def render_tool_calls(calls: list[ToolCall]) -> str:
    """The DSML block for parallel calls; strings raw (`string="true"`), everything else as JSON."""
    out = [TOOL_CALLS_OPEN]
    for call in calls:
        out.append(f'<{DSML}invoke name="{call.name}">')
        for name, value in call.arguments.items():
            if isinstance(value, str):
                out.append(f'<{DSML}parameter name="{name}" string="true">{value}{PARAM_CLOSE}')
            else:
                out.append(f'<{DSML}parameter name="{name}" string="false">{to_json(value)}{PARAM_CLOSE}')
        out.append(INVOKE_CLOSE)
    out.append(TOOL_CALLS_CLOSE)
    return "\n".join(out)


def render_assistant_body(reasoning: str, content: str, calls: list[ToolCall]) -> str:
    """What the policy generates after the `<think>` / `</think>` opener, EOS included."""
    body = f"{reasoning}{END_THINK}{content}"
    if calls:
        body += "\n\n" + render_tool_calls(calls)
    return body + EOS


def assistant_opener(mode: ThinkingMode, reasoning_dropped: bool = False) -> str:
    """Generation prompt: thinking modes open `<think>`, chat mode closes it at once. A turn whose reasoning is
    dropped (thinking mode, no tools, before the last user message) is opened like a chat turn, as V4 does."""
    return ASSISTANT + (END_THINK if mode == "non-think" or reasoning_dropped else THINK)


def render_tool_results(results: list[str]) -> str:
    return "\n\n".join(f"<tool_result>{r}</tool_result>" for r in results)


def render_segments(messages: list[Message], tools: list[ToolSchema], mode: ThinkingMode,
                    add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
    """The V4 text of a conversation as (text, is_assistant_output) pieces, in order.

    The pieces are the unit of tokenisation: the rollout engine encodes prompts and tool results piecewise and
    keeps the sampled assistant ids, so SFT data tokenised from the same pieces looks exactly like a rollout.
    Interleaved thinking: with tools, every assistant turn keeps its reasoning, so the prompt only grows and a
    multi-turn rollout's tokens stay exact. Without tools, reasoning before the last user message is dropped.
    """
    system = "".join(m.content for m in messages if m.role == "system")
    pieces: list[tuple[str, bool]] = []
    prompt = BOS + render_system(system, tools, mode)
    turns = [m for m in messages if m.role != "system"]
    # V4 counts a tool-result turn as a user message here: it is one after tool messages are merged
    last_user = max((i for i, m in enumerate(turns) if m.role == "user"), default=-1)
    for i, m in enumerate(turns):
        if m.role == "user":
            parts = [render_tool_results(m.tool_results)] if m.tool_results else []
            if m.content:
                parts.append(m.content)
            prompt += USER + "\n\n".join(parts)
        else:
            dropped = mode != "non-think" and not tools and i < last_user
            pieces.append((prompt + assistant_opener(mode, dropped), False))
            prompt = ""
            body = render_assistant_body("" if dropped else m.reasoning, m.content, m.tool_calls)
            # a closed opener (chat mode, dropped reasoning) already wrote `</think>`
            pieces.append((body[len(END_THINK):] if mode == "non-think" or dropped else body, True))
    if add_generation_prompt:
        prompt += assistant_opener(mode)
    if prompt:
        pieces.append((prompt, False))
    return pieces


def render_conversation(
    messages: list[Message], tools: list[ToolSchema], mode: ThinkingMode, add_generation_prompt: bool = True
) -> str:
    """Full V4 text of a conversation (the pieces of `render_segments`, joined)."""
    return "".join(text for text, _ in render_segments(messages, tools, mode, add_generation_prompt))


_INVOKE_OPEN = re.compile(rf'<{DSML}invoke name="([^"<>\n]+)">\n')
_PARAM_OPEN = re.compile(rf'<{DSML}parameter name="([^"<>\n]+)" string="(true|false)">')


def _parse_value(name: str, raw: str, is_string: bool) -> Any:
    if is_string:
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DSMLParseError(f'parameter "{name}" has string="false" but is not JSON: {exc.msg}') from exc


def parse_tool_calls(block: str) -> list[ToolCall]:
    """Parse exactly one `tool_calls` block (nothing before or after it)."""
    if not block.startswith(TOOL_CALLS_OPEN + "\n"):
        raise DSMLParseError("tool-call block must start with <｜DSML｜tool_calls> and a newline")
    if not block.endswith("\n" + TOOL_CALLS_CLOSE):
        raise DSMLParseError("tool-call block must end with </｜DSML｜tool_calls> and nothing after it")
    pos = len(TOOL_CALLS_OPEN) + 1
    end = len(block) - len(TOOL_CALLS_CLOSE) - 1
    calls: list[ToolCall] = []
    while pos < end:
        m = _INVOKE_OPEN.match(block, pos)
        if not m:
            raise DSMLParseError(f"expected an <｜DSML｜invoke name=...> at offset {pos}")
        pos = m.end()
        args: dict[str, Any] = {}
        while not block.startswith(INVOKE_CLOSE, pos):
            p = _PARAM_OPEN.match(block, pos)
            if not p:
                raise DSMLParseError(f"expected a parameter or </｜DSML｜invoke> at offset {pos}")
            close = block.find(PARAM_CLOSE, p.end())
            if close < 0 or close > end:
                raise DSMLParseError(f'parameter "{p.group(1)}" is not closed')
            raw = block[p.end():close]
            if DSML in raw:
                raise DSMLParseError(f'parameter "{p.group(1)}" contains a DSML marker')
            if p.group(1) in args:
                raise DSMLParseError(f'duplicate parameter "{p.group(1)}"')
            args[p.group(1)] = _parse_value(p.group(1), raw, p.group(2) == "true")
            pos = close + len(PARAM_CLOSE)
            if block[pos:pos + 1] != "\n":
                raise DSMLParseError("a newline must follow </｜DSML｜parameter>")
            pos += 1
        pos += len(INVOKE_CLOSE)
        calls.append(ToolCall(name=m.group(1), arguments=args))
        if pos < end:
            if block[pos] != "\n":
                raise DSMLParseError("a newline must follow </｜DSML｜invoke>")
            pos += 1
    if not calls:
        raise DSMLParseError("tool-call block holds no invoke")
    return calls


class ParsedTurn(BaseModel):
    reasoning: str
    content: str
    tool_calls: list[ToolCall]
    finished: bool  # the turn ended with EOS (not cut by the token budget)


def parse_assistant(text: str, mode: ThinkingMode) -> ParsedTurn:
    """Split a generated assistant body into reasoning, content and tool calls.

    `text` is what followed the opener. Raises `DSMLParseError` on a malformed turn; the caller reports it to
    the policy as a tool error.
    """
    finished = text.endswith(EOS)
    body = text[: -len(EOS)] if finished else text
    if mode == "non-think":
        reasoning, rest = "", body
    else:
        if END_THINK not in body:
            raise DSMLParseError("reasoning was not closed with </think>")
        reasoning, rest = body.split(END_THINK, 1)
    for tok in SPECIAL_TOKENS:
        if tok in reasoning:
            raise DSMLParseError(f"special token {tok} inside reasoning")
    idx = rest.find(TOOL_CALLS_OPEN)
    if idx < 0:
        content, calls = rest, []
    else:
        if not rest[:idx].endswith("\n\n"):
            raise DSMLParseError('"\\n\\n" must precede the tool-call block')
        content = rest[: idx - 2]
        calls = parse_tool_calls(rest[idx:])
    for tok in SPECIAL_TOKENS:
        if tok in content:
            raise DSMLParseError(f"special token {tok} inside content")
    return ParsedTurn(reasoning=reasoning, content=content, tool_calls=calls, finished=finished)
