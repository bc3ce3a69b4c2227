"""DSML encoding and parsing: exact V4 text, round trips (hypothesis), strict errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.encoding import (
    DSML,
    EOS,
    SPECIAL_TOKENS,
    DSMLParseError,
    Message,
    ToolCall,
    ToolSchema,
    parse_assistant,
    render_assistant_body,
    render_conversation,
    render_segments,
    render_tool_calls,
)

TOOL = ToolSchema(name="run_python", description="d", parameters={"type": "object"})


def test_tool_call_block_is_the_published_format():
    block = render_tool_calls([ToolCall(name="run_python", arguments={"code": "print(2**100)", "timeout": 10})])
    assert block == (
        "<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="run_python">\n'
        '<｜DSML｜parameter name="code" string="true">print(2**100)</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="timeout" string="false">10</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        "</｜DSML｜tool_calls>"
    )


def test_tool_results_ride_in_the_next_user_turn_and_reasoning_is_kept_with_tools():
    msgs = [
        Message(role="user", content="q"),
        Message(role="assistant", reasoning="r1", tool_calls=[ToolCall(name="run_python", arguments={"code": "1"})]),
        Message(role="user", tool_results=["a", "b"]),
        Message(role="assistant", reasoning="r2", content="done"),
        Message(role="user", content="next"),
    ]
    text = render_conversation(msgs, [TOOL], "high")
    assert "<｜User｜><tool_result>a</tool_result>\n\n<tool_result>b</tool_result><｜Assistant｜><think>" in text
    assert "r1</think>" in text and "r2</think>done" in text
    assert text.endswith("<｜User｜>next<｜Assistant｜><think>")
    no_tools = render_conversation(msgs[3:], [], "high")
    assert "r2" not in no_tools  # without tools, reasoning before the last user message is dropped
    assert "".join(t for t, _ in render_segments(msgs, [TOOL], "high")) == text


def test_think_max_prefix_and_non_think_opener():
    assert "Absolute maximum" in render_conversation([Message(role="user", content="x")], [], "max")
    assert render_conversation([Message(role="user", content="x")], [], "non-think").endswith("<｜Assistant｜></think>")


_plain = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30).filter(
    lambda s: not any(tok in s for tok in SPECIAL_TOKENS) and DSML not in s and "<" not in s
)
_names = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_names, inner, max_size=3),
    max_leaves=6,
)
_calls = st.lists(
    st.builds(ToolCall, name=_names, arguments=st.dictionaries(_names, _plain | _json, max_size=3)),
    min_size=0, max_size=3,
)


@settings(max_examples=150, deadline=None)
@given(reasoning=_plain, content=_plain, calls=_calls)
def test_render_parse_round_trip(reasoning, content, calls):
    body = render_assistant_body(reasoning, content, calls)
    turn = parse_assistant(body, "high")
    assert turn.finished and turn.reasoning == reasoning and turn.content == content
    assert turn.tool_calls == calls


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_parses_or_raises_the_typed_error(text):
    try:
        parse_assistant(text, "non-think")
    except DSMLParseError:
        pass


@pytest.mark.parametrize("bad", [
    '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>trailing',
    '\n\n<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>',
    '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="true">1</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="a" string="true">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>',
    '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="false">{x</｜DSML｜parameter>\n'
    '</｜DSML｜invoke>\n</｜DSML｜tool_calls>',
    "x<｜User｜>y",
])
def test_malformed_blocks_raise(bad):
    with pytest.raises(DSMLParseError):
        parse_assistant(bad + EOS, "non-think")
