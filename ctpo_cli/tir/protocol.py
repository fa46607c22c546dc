"""Tool-integrated reasoning: the one format shared by ``ctpo eval`` and training.

Protocol (what the model sees and does):

1. The conversation starts with ``SYSTEM_PROMPT`` and the problem as the user message.
2. An assistant turn is generated until the model ends its turn (end-of-turn / EOS token) or writes a
   stop string from ``STOP_STRINGS`` ("```output": a model that starts writing the result of its
   own code is cut there, the stop string itself is not part of the turn).
3. If the turn *ends with* a complete fenced "```python" block (see ``extract_code``), that code is
   run in the sandbox and its result comes back as a ``{"role": "tool"}`` message formatted by
   ``format_tool_output`` (a "```output" block). Otherwise the turn is the final answer.
4. At most ``max_turns`` assistant turns: code in the last allowed turn is not run (as verl's
   ``max_assistant_turns``), so a trajectory makes at most ``max_turns - 1`` tool calls.
5. Token budget: ``max_tokens`` counts every response token after the prompt: all assistant tokens plus
   the tokens of each tool message's content (as counted by the model's tokenizer; chat-template
   wrapper tokens are not counted). Each turn may generate at most what is left; the trajectory ends
   when a turn hits the limit or a tool result uses up the budget.

The answer is the last ``\\boxed{}`` in the assistant turns (``response_text``); tool output never
counts as an answer. ``ToolLoop`` is the protocol as a step-by-step state machine so that a batched
driver (``ctpo_cli.eval.runner``) can advance many trajectories at once; ``run_tool_loop`` drives one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

SYSTEM_PROMPT = (
    "You are an expert mathematician. Solve the problem step by step. You can run Python: write code "
    "in a ```python code block and end your message right after the block; the code's printed output "
    "will come back to you in an ```output block. Use code to compute, search or check anything you "
    "are unsure of, as often as you need. Put the final answer in \\boxed{}."
)
"""System prompt for tool-integrated reasoning (training and ``ctpo eval``)."""

NO_TOOLS_SYSTEM_PROMPT = (
    "You are an expert mathematician. Solve the problem step by step and put the final answer in \\boxed{}."
)
"""System prompt for ``ctpo eval --no-tools``: no code execution is offered."""

STOP_STRINGS: tuple[str, ...] = ("```output",)
"""Generation stops here (excluded from the text): the model is about to write its code's result itself."""

FINISHED = "Finished"
"""Sandbox status of a program that ended by itself (others: ``TimeLimitExceeded``, ``Error``)."""

MAX_TOOL_OUTPUT_CHARS = 2000
"""Longer tool output keeps its first and last halves around an omission note."""

_CODE_BLOCK = re.compile(r"```python[ \t]*\n(.*?)\n[ \t]*```[ \t]*$", re.DOTALL)


def extract_code(text: str) -> str | None:
    """The code of the "```python" block an assistant turn ends with, else None.

    Precisely: after removing trailing whitespace and a trailing "```output" (a stop string some
    backends keep), the turn must end with a closing fence "```"; the block it closes must open
    with "```python" followed by a line break, and no fence may appear inside the code. Code followed
    by more prose is not run: the model did not stop to wait for the result.
    """
    text = text.rstrip()
    for stop in STOP_STRINGS:
        text = text.removesuffix(stop).rstrip()
    start = text.rfind("```python")
    if start < 0:
        return None
    match = _CODE_BLOCK.fullmatch(text, start)
    if match is None or "```" in match.group(1):
        return None
    code = match.group(1)
    return code if code.strip() else None


def format_tool_output(
    stdout: str, stderr: str, status: str, truncated: bool, max_chars: int = MAX_TOOL_OUTPUT_CHARS
) -> str:
    """What the model sees after its code ran: an "```output" block.

    stdout, then stderr (tracebacks), then a note when the program did not end by itself
    (``TimeLimitExceeded``, a sandbox ``Error``) and when the sandbox truncated its output; output longer than ``max_chars`` keeps its head and
    tail. Empty output says so, since forgetting ``print`` is the usual cause.
    """
    body = "\n".join(part.rstrip("\n") for part in (stdout, stderr) if part.strip())
    if len(body) > max_chars:
        half = max_chars // 2
        body = f"{body[:half]}\n[... {len(body) - 2 * half} characters omitted ...]\n{body[-half:]}"
    notes = []
    if status != FINISHED:
        notes.append(f"[execution stopped: {status}]")
    if truncated:
        notes.append("[output truncated]")
    if not body and not notes:
        body = "[no output: print() the values you need]"
    return "```output\n" + "\n".join([body, *notes] if body else notes) + "\n```"


@dataclass(frozen=True)
class GenerationResult:
    """One generated assistant turn: its text (stop string excluded), token count and why it ended."""

    text: str
    num_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (hit max_new_tokens)


@dataclass(frozen=True)
class ToolResult:
    """A code execution as the trajectory records it."""

    content: str  # the tool message (format_tool_output)
    num_tokens: int
    status: str
    error: bool  # status other than Finished, or a non-zero exit code (exceptions, MemoryError, ...)


@dataclass
class Turn:
    """One assistant turn, and the tool call it made (if any)."""

    text: str
    num_tokens: int
    finish_reason: str
    code: str | None = None
    tool: ToolResult | None = None


def join_turns(texts: Iterable[str]) -> str:
    """The assistant turns of a trajectory as one text, in which the final ``\\boxed{}`` is the answer."""
    return "\n".join(texts)


@dataclass
class Trajectory:
    """A finished tool-integrated trajectory."""

    messages: list[dict[str, Any]]  # full conversation, prompt included
    turns: list[Turn]
    stop_reason: str  # "answer", "max_turns" or "max_tokens"

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    @property
    def tool_calls(self) -> int:
        return sum(turn.tool is not None for turn in self.turns)

    @property
    def tool_errors(self) -> int:
        return sum(turn.tool is not None and turn.tool.error for turn in self.turns)

    @property
    def response_tokens(self) -> int:
        """Assistant tokens plus tool-output tokens: what the ``max_tokens`` budget limits."""
        return sum(turn.num_tokens + (turn.tool.num_tokens if turn.tool else 0) for turn in self.turns)

    @property
    def response_text(self) -> str:
        """All assistant turns joined (tool output excluded): where the answer is looked for."""
        return join_turns(turn.text for turn in self.turns)


class ToolLoop:
    """The protocol above for one trajectory, advanced by its driver step by step.

    ``request()`` gives the messages to continue and how many tokens the next turn may use;
    ``add_generation()`` records the turn and returns the code to run (None when the trajectory is
    done); ``add_tool_result()`` records what the code printed. ``done`` / ``trajectory()`` at the end.
    """

    def __init__(
        self, messages: Sequence[dict[str, Any]], max_turns: int, max_tokens: int, tools: bool = True
    ):
        if max_turns < 1 or max_tokens < 1:
            raise ValueError(f"max_turns and max_tokens must be >= 1 (got {max_turns}, {max_tokens})")
        self.messages = [dict(m) for m in messages]
        self.max_turns = max_turns
        self.max_tokens = max_tokens
        self.tools = tools
        self.turns: list[Turn] = []
        self.used_tokens = 0
        self.stop_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def request(self) -> tuple[list[dict[str, Any]], int]:
        """Messages so far and the token budget of the next assistant turn."""
        if self.done:
            raise RuntimeError("the trajectory is finished")
        return self.messages, self.max_tokens - self.used_tokens

    def add_generation(self, result: GenerationResult) -> str | None:
        """Record an assistant turn; the code to execute, or None when the trajectory is done."""
        if self.done:
            raise RuntimeError("the trajectory is finished")
        self.messages.append({"role": "assistant", "content": result.text})
        self.used_tokens += result.num_tokens
        code = extract_code(result.text) if self.tools else None
        self.turns.append(Turn(result.text, result.num_tokens, result.finish_reason, code))
        if result.finish_reason == "length" or self.used_tokens >= self.max_tokens:
            self.stop_reason = "max_tokens"
        elif code is None:
            self.stop_reason = "answer"
        elif len(self.turns) >= self.max_turns:
            self.stop_reason = "max_turns"
        return None if self.done else code

    def add_tool_result(self, result: ToolResult) -> None:
        """Record the result of the code that ``add_generation`` asked for."""
        turn = self.turns[-1]
        if self.done or turn.code is None or turn.tool is not None:
            raise RuntimeError("no tool call is pending")
        turn.tool = result
        self.messages.append({"role": "tool", "content": result.content})
        self.used_tokens += result.num_tokens
        if self.used_tokens >= self.max_tokens:
            self.stop_reason = "max_tokens"

    def trajectory(self) -> Trajectory:
        if self.stop_reason is None:
            raise RuntimeError("the trajectory is not finished")
        return Trajectory(self.messages, self.turns, self.stop_reason)


def failed(status: str, return_code: int | None) -> bool:
    """Whether a sandbox run counts as a tool error: it did not finish by itself, or exited non-zero."""
    return status != FINISHED or return_code != 0


class CodeRunner(Protocol):
    """What the loop needs from a sandbox client (``sandbox.client.SandboxClient`` has it)."""

    def run_code(
        self, code: str, stdin: str = "", run_timeout: float = 10.0, memory_limit_mb: int = 1024
    ) -> Any: ...


def execute(
    sandbox: CodeRunner, code: str, count_tokens: Callable[[str], int], run_timeout: float = 10.0
) -> ToolResult:
    """Run ``code`` in the sandbox and format its result for the model.

    A program error (exception, non-zero exit, timeout, memory limit) is a normal tool result with
    ``error=True``; only a sandbox that cannot be reached raises (the caller records a crashed sample).
    """
    run = sandbox.run_code(code, run_timeout=run_timeout)
    content = format_tool_output(run.stdout, run.stderr, run.status, run.truncated)
    return ToolResult(content, count_tokens(content), run.status, failed(run.status, run.return_code))


def run_tool_loop(
    generate: Callable[[list[dict[str, Any]], int], GenerationResult],
    messages: Sequence[dict[str, Any]],
    sandbox_client: CodeRunner,
    max_turns: int,
    max_tokens: int,
    count_tokens: Callable[[str], int],
    run_timeout: float = 10.0,
) -> Trajectory:
    """One trajectory: ``generate(messages, max_new_tokens)`` for each turn, code run in the sandbox."""
    loop = ToolLoop(messages, max_turns, max_tokens)
    while not loop.done:
        code = loop.add_generation(generate(*loop.request()))
        if code is not None:
            loop.add_tool_result(execute(sandbox_client, code, count_tokens, run_timeout))
    return loop.trajectory()
