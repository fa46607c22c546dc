"""The tool-integrated-reasoning protocol: code extraction, tool messages, the turn loop.

The loop tests script the model's text (allowed for unit tests of the loop) but run the code in a real
sandbox service.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from ctpo_cli.tir.protocol import (
    AUTHORS_SYSTEM_PROMPT,
    AUTHORS_TOOL_NAME,
    SYSTEM_PROMPT,
    TIR_PROTOCOLS,
    GenerationResult,
    ToolCall,
    authors_program,
    authors_tool_call,
    cut_tool_response,
    execute,
    extract_code,
    format_tool_output,
    get_protocol,
    run_tool_loop,
    with_system_prompt,
)
from sandbox.client import SandboxClient, SandboxUnavailable
from sandbox.server import running_service


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("Let me compute.\n```python\nprint(6*7)\n```", "print(6*7)"),
        ("```python\nx = 1\nprint(x)\n```\n\n  ", "x = 1\nprint(x)"),
        ("```python\nprint(1)\n```\n```output", "print(1)"),  # a backend that keeps the stop string
        ("```python\nprint(1)\n```\nSo the output will be 1.", None),  # did not stop for the result
        ("```python\nprint(1)", None),  # unclosed
        ("```\nprint(1)\n```", None),  # not marked python
        ("```python\nprint(1)\n```\nthen\n```text\nhello\n```", None),  # last block is not python
        ("```python\nprint(1)\n```\nand\n```python\nprint(2)\n```", "print(2)"),
        ("```python\n\n```", None),  # empty
        ("The answer is \\boxed{4}.", None),
    ],
)
def test_extract_code(text: str, code: str | None) -> None:
    assert extract_code(text) == code


def test_format_tool_output() -> None:
    assert format_tool_output("42\n", "", "Finished", False) == "```output\n42\n```"
    traceback = "Traceback (most recent call last):\nZeroDivisionError: division by zero\n"
    assert (
        format_tool_output("partial\n", traceback, "Finished", False) == f"```output\npartial\n{traceback}```"
    )
    assert (
        format_tool_output("", "", "TimeLimitExceeded", False)
        == "```output\n[execution stopped: TimeLimitExceeded]\n```"
    )
    assert format_tool_output("x", "", "Finished", True) == "```output\nx\n[output truncated]\n```"
    assert "print()" in format_tool_output("", "", "Finished", False)
    long = format_tool_output("a" * 500 + "b" * 500, "", "Finished", False, max_chars=100)
    assert long == "```output\n" + "a" * 50 + "\n[... 900 characters omitted ...]\n" + "b" * 50 + "\n```"


def scripted(turns: Sequence[str]) -> tuple[Any, list[list[dict[str, Any]]]]:
    """A stand-in for the LLM: returns the next scripted turn (one token per character, cut to the budget)."""
    texts: Iterator[str] = iter(turns)
    seen: list[list[dict[str, Any]]] = []

    def generate(messages: list[dict[str, Any]], max_new_tokens: int) -> GenerationResult:
        seen.append([dict(m) for m in messages])
        text = next(texts)
        if len(text) > max_new_tokens:
            return GenerationResult(text[:max_new_tokens], max_new_tokens, "length")
        return GenerationResult(text, len(text), "stop")

    return generate, seen


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxClient]:
    with running_service() as service, SandboxClient(service.url) as client:
        yield client


CTPO_TIR = TIR_PROTOCOLS["ctpo"]
AUTHORS_TIR = TIR_PROTOCOLS["authors"]
PROMPT = [{"role": "system", "content": "sys"}, {"role": "user", "content": "What is 6 times 7?"}]


def test_code_runs_in_the_sandbox_and_comes_back(sandbox: SandboxClient) -> None:
    generate, seen = scripted(["```python\nprint(6*7)\n```", "So \\boxed{42}."])
    trajectory = run_tool_loop(
        generate, PROMPT, sandbox, max_turns=5, max_tokens=1000, count_tokens=len, protocol=CTPO_TIR
    )
    assert seen[1][-1] == {"role": "tool", "content": "```output\n42\n```"}
    assert (trajectory.num_turns, trajectory.tool_calls, trajectory.tool_errors) == (2, 1, 0)
    assert trajectory.stop_reason == "answer"
    assert trajectory.response_tokens == len("```python\nprint(6*7)\n```") + len("```output\n42\n```") + len(
        "So \\boxed{42}."
    )
    assert trajectory.response_text.endswith("So \\boxed{42}.")
    assert [m["role"] for m in trajectory.messages] == ["system", "user", "assistant", "tool", "assistant"]


def test_program_errors_are_tool_errors_the_model_sees(sandbox: SandboxClient) -> None:
    generate, seen = scripted(
        ["```python\nprint('start')\n1/0\n```", "```python\nprint(1)\n```", "\\boxed{1}"]
    )
    trajectory = run_tool_loop(
        generate, PROMPT, sandbox, max_turns=5, max_tokens=5000, count_tokens=len, protocol=CTPO_TIR
    )
    first_output = seen[1][-1]["content"]
    assert first_output.startswith("```output\nstart\n") and "ZeroDivisionError" in first_output
    assert (trajectory.tool_calls, trajectory.tool_errors) == (2, 1)
    assert [turn.tool.error for turn in trajectory.turns if turn.tool] == [True, False]


def test_turn_limit_leaves_last_code_unrun(sandbox: SandboxClient) -> None:
    generate, _ = scripted(["```python\nprint(1)\n```"] * 3)
    trajectory = run_tool_loop(
        generate, PROMPT, sandbox, max_turns=3, max_tokens=5000, count_tokens=len, protocol=CTPO_TIR
    )
    assert (trajectory.num_turns, trajectory.tool_calls, trajectory.stop_reason) == (3, 2, "max_turns")
    assert trajectory.turns[-1].code == "print(1)" and trajectory.turns[-1].tool is None


def test_tool_output_counts_against_the_token_budget(sandbox: SandboxClient) -> None:
    code = "```python\nprint('x' * 50)\n```"
    generate, seen = scripted([code, "never generated"])
    # Room for the code (28 tokens) but not for code + its 64-token output.
    trajectory = run_tool_loop(
        generate, PROMPT, sandbox, max_turns=5, max_tokens=60, count_tokens=len, protocol=CTPO_TIR
    )
    assert len(seen) == 1
    assert trajectory.stop_reason == "max_tokens" and trajectory.tool_calls == 1
    assert trajectory.response_tokens == len(code) + len(format_tool_output("x" * 50, "", "Finished", False))


def test_a_turn_cut_by_the_budget_ends_the_trajectory(sandbox: SandboxClient) -> None:
    generate, seen = scripted(["```python\nprint(6*7)\n```", "a long answer that does not fit"])
    trajectory = run_tool_loop(
        generate, PROMPT, sandbox, max_turns=5, max_tokens=50, count_tokens=len, protocol=CTPO_TIR
    )
    remaining = 50 - len("```python\nprint(6*7)\n```") - len("```output\n42\n```")
    assert trajectory.turns[-1].text == "a long answer that does not fit"[:remaining]
    assert trajectory.stop_reason == "max_tokens" and trajectory.response_tokens == 50
    assert len(seen) == 2


def test_unreachable_sandbox_raises() -> None:
    generate, _ = scripted(["```python\nprint(1)\n```"])
    with SandboxClient("http://127.0.0.1:9", timeout=2) as dead, pytest.raises(SandboxUnavailable):
        run_tool_loop(
            generate, PROMPT, dead, max_turns=5, max_tokens=100, count_tokens=len, protocol=CTPO_TIR
        )


# --------------------------------------------------------------------------------------------------
# The authors' protocol


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("Compute.\n```python\nprint(6*7)\n```\nSo it prints 42.", "print(6*7)"),  # text after the block
        ("```py\nprint(1)\n```\nand\n```python\nprint(2)\n```", "print(1)"),  # the first block runs
        ("```\nprint(3)\n```", "print(3)"),  # a bare fence counts too
        ("```python\n\n```\n```python\nprint(4)\n```", "print(4)"),  # empty blocks are skipped
        ("```python\nprint(1)", None),  # unclosed
        ("The answer is \\boxed{4}.", None),
    ],
)
def test_authors_call_is_the_first_block_anywhere(text: str, code: str | None) -> None:
    call = authors_tool_call(text)
    assert (call.code if call else None) == code
    if call:
        assert call == ToolCall(AUTHORS_TOOL_NAME, {"code": code, "timeout": 30.0})


def test_authors_json_call_wins_over_blocks() -> None:
    text = 'x\n<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(5)"}}\n</tool_call>\n```python\nprint(6)\n```'
    assert authors_tool_call(text) == ToolCall(AUTHORS_TOOL_NAME, {"code": "print(5)"})
    assert authors_program({"code": "```python\nprint(5)\n```", "timeout": "100"}) == ("print(5)", 45.0, "")
    assert authors_program({"code": "x", "language": "bash"})[0] is None


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("while True:\n    pass", "infinite loop pattern"),
        ("import threading\nprint(1)", "threading"),
        ("print(eval('1+1'))", "eval"),
        ("with open('a.txt', 'w') as f:\n    f.write('x')", "file write via open"),
        ("import os\nprint(os.environ)", "environment variable access"),
        ("import subprocess\nsubprocess.run(['ls'])", "subprocess"),
        ("from multiprocessing import Pool", "multiprocessing"),
        ("import requests", "network access"),
        ("WHILE TRUE:", "infinite loop pattern"),  # case-insensitive, as theirs
        ("print(sympy.N(x).evalf())", None),  # evalf( is not eval(
        ("with open('a.txt') as f:\n    print(f.read())", None),  # reading is allowed
        ("while n > 0:\n    n -= 1", None),
    ],
)
def test_authors_block_list(code: str, reason: str | None) -> None:
    """Their tool refuses code by pattern (horizon-llm/CTPO verl/tools/local_sandbox_tool.py, strict mode):
    the model sees their message and the code does not run; the ctpo protocol runs it."""
    program = authors_program({"code": code})
    if reason is None:
        assert program == (code, 30.0, "")
    else:
        assert program == (None, 30.0, f"sandbox blocked potentially dangerous code: {reason}")
    assert CTPO_TIR.program(ToolCall("python", {"code": code}))[0] == code


def test_a_blocked_program_never_reaches_the_sandbox(sandbox: SandboxClient) -> None:
    call = ToolCall(AUTHORS_TOOL_NAME, {"code": "import threading\nprint('ran')"})
    result = execute(sandbox, call, len, AUTHORS_TIR)
    assert (result.content, result.error) == ("sandbox blocked potentially dangerous code: threading", True)
    assert (
        "ran"
        in execute(
            sandbox, ToolCall("python", {"code": "import threading\nprint('ran')"}), len, CTPO_TIR
        ).content
    )


def test_authors_tool_message_is_raw_and_cut_in_the_middle() -> None:
    assert AUTHORS_TIR.tool_message("42\n", "", "Finished", False) == "42\n"
    assert AUTHORS_TIR.tool_message("", "", "TimeLimitExceeded", False) == "sandbox status: TimeLimitExceeded"
    long = AUTHORS_TIR.tool_message("a" * 200, "b" * 200, "Finished", False)
    assert long == "a" * 128 + "...(truncated)..." + "b" * 128 == cut_tool_response("a" * 200 + "b" * 200)


def test_system_prompt_per_protocol() -> None:
    user = {"role": "user", "content": "q"}
    ours = {"role": "system", "content": SYSTEM_PROMPT}
    assert with_system_prompt([ours, user], AUTHORS_SYSTEM_PROMPT, merge=True) == [
        {"role": "system", "content": AUTHORS_SYSTEM_PROMPT},
        user,
    ]  # never mixed with the other protocol's prompt
    assert AUTHORS_TIR.messages([{"role": "system", "content": "Be brief."}, user])[0]["content"] == (
        AUTHORS_SYSTEM_PROMPT + "\n\nBe brief."
    )
    assert CTPO_TIR.messages([user]) == [ours, user]
    with pytest.raises(ValueError, match="choose one of authors, ctpo"):
        get_protocol("simpletir")


def test_authors_loop_runs_code_mid_turn_and_keeps_generating(sandbox: SandboxClient) -> None:
    turn = "Try it.\n```python\nprint(6*7)\n```\nIt should print 42."
    generate, seen = scripted([turn, "So \\boxed{42}."])
    trajectory = run_tool_loop(
        generate, [PROMPT[1]], sandbox, max_turns=5, max_tokens=1000, count_tokens=len, protocol=AUTHORS_TIR
    )
    assert seen[0][0] == {"role": "system", "content": AUTHORS_SYSTEM_PROMPT}
    assert seen[1][-1] == {"role": "tool", "content": "42\n"}
    assert (trajectory.tool_calls, trajectory.stop_reason) == (1, "answer")
    assert trajectory.full_text == f"{turn}\n42\n\nSo \\boxed{{42}}."
