"""Byte-exact V4 rendering: the reference conversation of shared/DSML.md, non-ASCII JSON, dropped reasoning.

The golden text lives in fixtures/dsml_v4_reference.txt (copied from shared/DSML.md; its header says how), so a
change of the renderer that a real V4 checkpoint would notice fails here first.
"""

from __future__ import annotations

from pathlib import Path

from trainer.encoding import (
    THINK_MAX_PREFIX,
    Message,
    ToolCall,
    ToolSchema,
    parse_assistant,
    render_conversation,
    render_segments,
    render_tool_calls,
)

FIXTURE = Path(__file__).parent / "fixtures" / "dsml_v4_reference.txt"
RUN_PYTHON = ToolSchema(
    name="run_python",
    description="Run Python code in a sandbox and return what it printed.",
    parameters={"type": "object", "properties": {"code": {"type": "string"}, "timeout": {"type": "integer"}},
                "required": ["code"]},
)
ANSWER = "1267650600228229401496703205376"
REFERENCE = [
    Message(role="system", content="You are a helpful assistant."),
    Message(role="user", content="What is 2**100?"),
    Message(role="assistant", reasoning="I should compute it.",
            tool_calls=[ToolCall(name="run_python", arguments={"code": "print(2**100)", "timeout": 10})]),
    Message(role="user", tool_results=[ANSWER]),
    Message(role="assistant", reasoning="Got it.", content=f"2**100 = {ANSWER}"),
]


def _golden() -> str:
    text = FIXTURE.read_text(encoding="utf-8")
    return text[text.index("\n---\n") + len("\n---\n"):]


def test_reference_conversation_renders_byte_for_byte():
    rendered = render_conversation(REFERENCE, [RUN_PYTHON], "high", add_generation_prompt=False)
    assert rendered.encode() == _golden().encode()


def test_the_parser_reads_back_every_assistant_turn_the_renderer_wrote():
    outputs = [text for text, trainable in render_segments(REFERENCE, [RUN_PYTHON], "high", False) if trainable]
    turns = [parse_assistant(text, "high") for text in outputs]
    assistants = [m for m in REFERENCE if m.role == "assistant"]
    assert [(t.reasoning, t.content, t.tool_calls, t.finished) for t in turns] == [
        (m.reasoning, m.content, m.tool_calls, True) for m in assistants]


def test_json_values_and_schemas_keep_non_ascii_characters():
    tool = ToolSchema(name="écrire", description="Écrit un fichier — 文件", parameters={"type": "object"})
    call = ToolCall(name="écrire", arguments={"chemin": "/tmp/é", "options": {"titre": "déjà vu", "tags": ["日本"]}})
    block = render_tool_calls([call])
    assert '<｜DSML｜parameter name="options" string="false">{"titre": "déjà vu", "tags": ["日本"]}</｜DSML｜parameter>' \
        in block
    assert "\\u" not in block
    prompt = render_conversation([Message(role="user", content="x")], [tool], "non-think")
    assert '{"name": "écrire", "description": "Écrit un fichier — 文件", "parameters": {"type": "object"}}' in prompt
    assert parse_assistant(f"\n\n{block}<｜end▁of▁sentence｜>", "non-think").tool_calls == [call]


def test_dropped_reasoning_renders_as_v4_does():
    """Thinking mode, no tools: a turn before the last user message loses its reasoning and is opened with
    `</think>` (V4's encoder writes no empty `<think></think>` pair)."""
    msgs = [
        Message(role="system", content="S"),
        Message(role="user", content="Q1"),
        Message(role="assistant", reasoning="old thoughts", content="A1"),
        Message(role="user", content="Q2"),
        Message(role="assistant", reasoning="new thoughts", content="A2"),
    ]
    assert render_conversation(msgs, [], "high", add_generation_prompt=False) == (
        "<｜begin▁of▁sentence｜>S<｜User｜>Q1<｜Assistant｜></think>A1<｜end▁of▁sentence｜>"
        "<｜User｜>Q2<｜Assistant｜><think>new thoughts</think>A2<｜end▁of▁sentence｜>")
    assert render_conversation(msgs[:4], [], "high") == (
        "<｜begin▁of▁sentence｜>S<｜User｜>Q1<｜Assistant｜></think>A1<｜end▁of▁sentence｜>"
        "<｜User｜>Q2<｜Assistant｜><think>")
    # the dropped turn is still an SFT target, and the parser reads it in chat form
    dropped = [text for text, trainable in render_segments(msgs, [], "high", False) if trainable][0]
    assert dropped == "A1<｜end▁of▁sentence｜>" and parse_assistant(dropped, "non-think").content == "A1"


def test_think_max_preamble_is_verbatim():
    assert THINK_MAX_PREFIX == (
        "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
        "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
        "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
        "scenarios.\n"
        "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
        "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n")
    text = render_conversation([Message(role="system", content="S"), Message(role="user", content="x")], [], "max")
    assert text.startswith("<｜begin▁of▁sentence｜>" + THINK_MAX_PREFIX + "S<｜User｜>")
