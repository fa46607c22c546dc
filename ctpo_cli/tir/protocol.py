"""Tool-integrated reasoning: the formats shared by ``ctpo eval`` and training, selected by name.

Two protocols (``TIR_PROTOCOLS``, chosen with ``ctpo.tir`` in an experiment and ``ctpo eval --tir``):

``authors`` (the default: the authors' released run, horizon-llm/CTPO, ``ctpo.sh`` with their verl fork)
    The system prompt is :data:`AUTHORS_SYSTEM_PROMPT` (put in front of a dataset's own system message)
    and the chat template lists the ``code_interpreter`` tool (:data:`AUTHORS_TOOL_SCHEMA`). A turn is
    generated to the end of turn (no stop string). The turn's first tool call runs: a JSON call
    ``{"name": ..., "arguments": {...}}`` anywhere in the turn, else the first fenced code block anywhere
    (:func:`authors_tool_call`). The model sees the program's raw stdout then stderr (``sandbox status:
    <status>`` when both are empty and the program failed), cut to :data:`AUTHORS_TOOL_RESPONSE_CHARS`
    characters around the middle as verl's agent loop cuts it (:func:`authors_tool_output`); 30 s per program.

``ctpo`` (this project's cleaner alternative)
    1. The conversation starts with ``SYSTEM_PROMPT`` and the problem as the user message; no tool schema.
    2. An assistant turn is generated until the model ends its turn (end-of-turn / EOS token) or writes a
       stop string from ``STOP_STRINGS`` ("```output": a model that starts writing the result of its
       own code is cut there, the stop string itself is not part of the turn).
    3. If the turn *ends with* a complete fenced "```python" block (see ``extract_code``), that code is
       run in the sandbox and its result comes back as a ``{"role": "tool"}`` message formatted by
       ``format_tool_output`` (a "```output" block, up to 2,000 characters). Otherwise the turn is the
       final answer. 10 s per program.

Common to both:

4. At most ``max_turns`` assistant turns: code in the last allowed turn is not run (as verl's
   ``max_assistant_turns``), so a trajectory makes at most ``max_turns - 1`` tool calls.
5. Token budget: ``max_tokens`` counts every response token after the prompt: all assistant tokens plus
   the tokens of each tool message's content (as counted by the model's tokenizer; chat-template
   wrapper tokens are not counted). Each turn may generate at most what is left; the trajectory ends
   when a turn hits the limit or a tool result uses up the budget.

The strict answer is the last ``\\boxed{}`` in the assistant turns (``response_text``); the authors'
reward reads the whole response, tool output included (``full_text``; ``ctpo_cli.tir.scoring``).
``ToolLoop`` is the protocol as a step-by-step state machine so that a batched
driver (``ctpo_cli.eval.runner``) can advance many trajectories at once; ``run_tool_loop`` drives one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ctpo_cli.errors import ConfigError

SYSTEM_PROMPT = (
    "You are an expert mathematician. Solve the problem step by step. You can run Python: write code "
    "in a ```python code block and end your message right after the block; the code's printed output "
    "will come back to you in an ```output block. Use code to compute, search or check anything you "
    "are unsure of, as often as you need. Put the final answer in \\boxed{}."
)
"""System prompt of the ``ctpo`` protocol (training and ``ctpo eval``)."""

NO_TOOLS_SYSTEM_PROMPT = (
    "You are an expert mathematician. Solve the problem step by step and put the final answer in \\boxed{}."
)
"""System prompt for ``ctpo eval --no-tools``: no code execution is offered."""

STOP_STRINGS: tuple[str, ...] = ("```output",)
"""Generation stops here (excluded from the text): the model is about to write its code's result itself."""

AUTHORS = "authors"
CTPO = "ctpo"
CTPO_TOOL_NAME = "python"

CTPO_RUN_TIMEOUT = 10.0
"""Seconds per program under the ``ctpo`` protocol (the sandbox's default)."""

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


# --------------------------------------------------------------------------------------------------
# The authors' protocol (horizon-llm/CTPO: verl/experimental/agent_loop/tool_agent_loop.py and
# tool_parser.py of their verl fork, examples/sglang_multiturn/config/tool_config/
# local_sandbox_tool_config.yaml, verl/tools/local_sandbox_tool.py; Apache-2.0). Their prompt and tool
# schema are reproduced word for word: they are what the model was trained to read.

AUTHORS_SYSTEM_PROMPT = (
    "Solve the following problem step by step. You can write executable Python code to help your reasoning. "
    "The code will be executed by an external sandbox, and execution output will be returned as observation text "
    "starting with 'Code execution result:'. Use that result in your next step.\n\n"
    "Code format:\n"
    "1) When you want to run code, output exactly one fenced code block.\n"
    "2) Use ```python ... ``` format.\n"
    "3) Write complete code with required imports.\n"
    "4) Use print() for key intermediate values and final computed result.\n\n"
    "Answer format:\n"
    "1) If you are ready to finish, output the final answer in boxed format.\n"
    "2) The final line must be: \\boxed{your_final_answer}\n"
    "3) Do not add extra text after the final \\boxed{...}."
)
"""The authors' system prompt (their ``DEFAULT_TOOL_USE_SYSTEM_PROMPT``), put in front of the prompt's own
system message, if any, with a blank line between."""

AUTHORS_TOOL_NAME = "code_interpreter"
AUTHORS_TOOL_SCHEMA: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": AUTHORS_TOOL_NAME,
        "description": "Execute Python code in local sandbox and return stdout/stderr.",
        "parameters": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "Python code to execute."},
                "timeout": {"type": "number", "description": "Optional run timeout in seconds."},
                "language": {"type": "string", "description": "Optional language tag, default is python."},
            },
            "required": ["code"],
        },
    },
}
"""The tool the chat template lists under the authors' protocol (their tool config's ``tool_schema``)."""

AUTHORS_TOOL_RESPONSE_CHARS = 256
"""verl's default ``multi_turn.max_tool_response_length``, which the authors do not override."""

AUTHORS_RUN_TIMEOUT = 30.0
"""Seconds per program: their tool's ``default_timeout`` and the timeout their parser writes into a call."""

AUTHORS_MAX_TIMEOUT = 45.0
"""The most a call may ask for with its ``timeout`` argument (their ``strict_max_timeout``)."""


def _blocked(*rules: tuple[str, str]) -> tuple[tuple[re.Pattern[str], str], ...]:
    return tuple((re.compile(pattern, re.IGNORECASE), reason) for pattern, reason in rules)


AUTHORS_BLOCKED_CODE = _blocked(
    # relaxed
    (r"\brm\s+-rf\s+/", "shell rm -rf /"),
    (r"\brm\s+-rf\b", "shell rm -rf"),
    (r"\bshutil\.(rmtree|move)\s*\(", "shutil destructive op"),
    (r"\bos\.(remove|unlink|rmdir|removedirs|rename)\s*\(", "os destructive op"),
    (r"\bpathlib\.Path\([^)]*\)\.(unlink|rmdir|rename)\s*\(", "pathlib destructive op"),
    (r"\bsubprocess\.(run|Popen|call|check_call|check_output)\s*\(", "subprocess"),
    (r"\bos\.(system|popen)\s*\(", "os.system / os.popen"),
    (r"\b(import\s+socket|import\s+requests|import\s+httpx|import\s+urllib)\b", "network access"),
    (r"\b(curl|wget|nc|ncat)\b", "network shell tool"),
    (r"\bwhile\s+True\s*:", "infinite loop pattern"),
    (r"\bpip\s+install\b", "runtime package install"),
    (r"\bapt(-get)?\s+install\b", "runtime apt install"),
    # strict only
    (r"\beval\s*\(", "eval"),
    (r"\bexec\s*\(", "exec"),
    (r"\b__import__\s*\(", "__import__"),
    (r"\bpickle\.loads\s*\(", "pickle.loads"),
    (r"\bmarshal\.loads\s*\(", "marshal.loads"),
    (r"\bctypes\b", "ctypes"),
    (r"\bcffi\b", "cffi"),
    (r"\bopen\s*\([^)]*,\s*[\"'](w|a|x|wb|ab|xb)[\"']", "file write via open"),
    (r"\bpathlib\.Path\([^)]*\)\.(write_text|write_bytes|touch)\s*\(", "pathlib write"),
    (r"\bmultiprocessing\b", "multiprocessing"),
    (r"\bthreading\b", "threading"),
    (r"\bos\.environ\b", "environment variable access"),
)
"""The authors' tool refuses code that matches one of these patterns (case-insensitive), answering
``sandbox blocked potentially dangerous code: <reason>`` instead of running it: their
``LocalSandboxTool._build_dangerous_patterns`` in ``strict`` mode (``block_dangerous_code: true``,
``safety_mode: strict`` in their tool config), in their order (the first match names the reason).
It shapes what the model sees, so the ``authors`` protocol reproduces it; ``ctpo`` blocks nothing."""


def authors_blocked(code: str) -> str | None:
    """The authors' tool's answer when ``code`` matches :data:`AUTHORS_BLOCKED_CODE`, else None."""
    reason = next((reason for pattern, reason in AUTHORS_BLOCKED_CODE if pattern.search(code)), None)
    return None if reason is None else f"sandbox blocked potentially dangerous code: {reason}"


_JSON_CALL = re.compile(
    r'\{\s*"name"\s*:\s*"(?P<name>[^"]+)"\s*,\s*"arguments"\s*:\s*(?P<arguments>\{.*?\})\s*\}', re.DOTALL
)
_ANY_CODE_BLOCK = re.compile(r"```(?:py|python)?\n(.*?)\n```", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the tool's name and its arguments."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def code(self) -> str | None:
        code = self.arguments.get("code")
        return code if isinstance(code, str) else None


def authors_tool_call(text: str) -> ToolCall | None:
    """The call an assistant turn makes under the authors' protocol, else None.

    The first JSON object ``{"name": ..., "arguments": {...}}`` anywhere in the turn (the form the chat
    template's tool section asks for, inside or outside ``<tool_call>`` tags); failing that, the first
    non-empty fenced code block anywhere (```````python``, ```````py`` or bare), as a ``code_interpreter``
    call with their 30 s timeout. Text after the call does not matter. (Their parser finds every call;
    verl runs ``max_parallel_calls`` = 1 of them, the first.)
    """
    for match in _JSON_CALL.finditer(text):
        try:
            arguments = json.loads(match.group("arguments"))
        except ValueError:
            continue
        if isinstance(arguments, dict):
            return ToolCall(match.group("name"), arguments)
    for match in _ANY_CODE_BLOCK.finditer(text):
        code = match.group(1).strip()
        if code:
            return ToolCall(AUTHORS_TOOL_NAME, {"code": code, "timeout": AUTHORS_RUN_TIMEOUT})
    return None


def authors_program(arguments: dict[str, Any]) -> tuple[str | None, float, str]:
    """What their ``code_interpreter`` tool runs for ``arguments``: (code or None, timeout, message).

    The code is cut to 20,000 characters and, when it holds a fenced block, replaced by the block's
    content; the timeout is the call's ``timeout`` (default 30 s) clamped to [1, 45] s; a language
    other than Python, and code their block list refuses (:data:`AUTHORS_BLOCKED_CODE`), get their
    message (code None).
    """
    language = str(arguments.get("language", "python")).strip().lower()
    if language != "python":
        return None, AUTHORS_RUN_TIMEOUT, f"sandbox blocked unsupported language: {language}"
    code = str(arguments.get("code", ""))[:20000]
    block = _ANY_CODE_BLOCK.search(code)
    if block:
        code = block.group(1).strip()
    try:
        timeout = float(int(float(str(arguments.get("timeout", AUTHORS_RUN_TIMEOUT)).strip())))
    except (TypeError, ValueError):
        timeout = AUTHORS_RUN_TIMEOUT
    timeout = min(max(1.0, timeout), AUTHORS_MAX_TIMEOUT)
    blocked = authors_blocked(code)
    return (None, timeout, blocked) if blocked else (code, timeout, "")


def authors_tool_output(stdout: str, stderr: str, status: str) -> str:
    """What their tool answers: stdout then stderr, raw; ``sandbox status: <status>`` when both are
    empty and the program did not finish by itself. Not yet cut (:func:`cut_tool_response`)."""
    text = stdout + stderr
    if not text and status != FINISHED:
        return f"sandbox status: {status}"
    return text


def cut_tool_response(text: str, max_chars: int = AUTHORS_TOOL_RESPONSE_CHARS) -> str:
    """A tool message longer than ``max_chars`` cut as verl's agent loop cuts it (``middle``): its first
    and last ``max_chars // 2`` characters around ``...(truncated)...``."""
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return text[:half] + "...(truncated)..." + text[-half:]


def with_system_prompt(messages: Sequence[dict[str, Any]], prompt: str, merge: bool) -> list[dict[str, Any]]:
    """``messages`` with the protocol's system prompt.

    A leading system message equal to a protocol's own prompt is replaced (``ctpo data prepare``
    writes the ``ctpo`` one into training prompts: the two protocols are never mixed). Otherwise
    ``merge`` (the authors' rule) puts ``prompt`` in front of the dataset's own system message with a
    blank line between; without ``merge`` (``ctpo``) a dataset's own system message is kept as it is.
    """
    messages = [dict(m) for m in messages]
    if messages and messages[0].get("role") == "system":
        content = str(messages[0].get("content", ""))
        if content in (SYSTEM_PROMPT, AUTHORS_SYSTEM_PROMPT) or not content.strip():
            messages = messages[1:]
        elif merge:
            return [{"role": "system", "content": f"{prompt}\n\n{content}"}, *messages[1:]]
        else:
            return messages
    return [{"role": "system", "content": prompt}, *messages]


def authors_tool_message(stdout: str, stderr: str, status: str, truncated: bool) -> str:
    """The authors' tool message: :func:`authors_tool_output` cut by :func:`cut_tool_response`."""
    return cut_tool_response(authors_tool_output(stdout, stderr, status))


def authors_call_program(call: ToolCall) -> tuple[str | None, float, str]:
    """:func:`authors_program` for a ``code_interpreter`` call; verl's unknown-tool answer otherwise."""
    if call.name != AUTHORS_TOOL_NAME:
        return None, AUTHORS_RUN_TIMEOUT, unknown_tool(call.name, AUTHORS_TOOL_NAME)
    return authors_program(call.arguments)


def ctpo_call_program(call: ToolCall) -> tuple[str | None, float, str]:
    """The ``ctpo`` protocol's program: the block's code, 10 s."""
    return call.code, CTPO_RUN_TIMEOUT, ""


def unknown_tool(name: str, known: str) -> str:
    """verl's answer to a call of a tool that does not exist (``ToolAgentLoop._call_tool``)."""
    return f"Unknown function '{name}'. Available tools: ['{known}']"


def ctpo_tool_call(text: str) -> ToolCall | None:
    """The ``ctpo`` protocol's call: the ```````python`` block the turn ends with (:func:`extract_code`)."""
    code = extract_code(text)
    return None if code is None else ToolCall(CTPO_TOOL_NAME, {"code": code})


@dataclass(frozen=True)
class TirProtocol:
    """One tool-integrated-reasoning protocol (see the module docstring)."""

    name: str
    system_prompt: str
    merge_system: bool
    """Whether the system prompt goes in front of a dataset's own system message (else that one stays)."""
    tool_schemas: tuple[dict[str, Any], ...]
    """Tools listed in the chat template (``tools=`` of ``apply_chat_template``)."""
    stop_strings: tuple[str, ...]
    run_timeout: float
    max_tool_response_chars: int
    """verl's ``multi_turn.max_tool_response_length`` for this protocol (characters of a tool message)."""
    find_call: Callable[[str], ToolCall | None]
    """The call an assistant turn makes, else None."""
    program: Callable[[ToolCall], tuple[str | None, float, str]]
    """(code to run or None, timeout in seconds, the tool's answer when nothing runs) for a call."""
    tool_message: Callable[[str, str, str, bool], str]
    """The tool message for a program's (stdout, stderr, status, sandbox-truncated)."""
    blocked_code: tuple[tuple[re.Pattern[str], str], ...]
    """The (pattern, reason) list ``program`` refuses code by (empty: it refuses none)."""
    summary: str

    def messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation with this protocol's system prompt (:func:`with_system_prompt`)."""
        return with_system_prompt(messages, self.system_prompt, self.merge_system)


TIR_PROTOCOLS: dict[str, TirProtocol] = {
    AUTHORS: TirProtocol(
        AUTHORS,
        AUTHORS_SYSTEM_PROMPT,
        merge_system=True,
        tool_schemas=(AUTHORS_TOOL_SCHEMA,),
        stop_strings=(),
        run_timeout=AUTHORS_RUN_TIMEOUT,
        max_tool_response_chars=AUTHORS_TOOL_RESPONSE_CHARS,
        find_call=authors_tool_call,
        program=authors_call_program,
        tool_message=authors_tool_message,
        blocked_code=AUTHORS_BLOCKED_CODE,
        summary="the authors' released run: their prompt and code_interpreter schema, the first code "
        "block anywhere runs unless their block list refuses it, turns end at end of turn, raw output cut "
        "to 256 characters, 30 s",
    ),
    CTPO: TirProtocol(
        CTPO,
        SYSTEM_PROMPT,
        merge_system=False,
        tool_schemas=(),
        stop_strings=STOP_STRINGS,
        run_timeout=CTPO_RUN_TIMEOUT,
        max_tool_response_chars=4096,
        find_call=ctpo_tool_call,
        program=ctpo_call_program,
        tool_message=format_tool_output,
        blocked_code=(),
        summary="ctpo's: a turn ending with a ```python block runs it, generation stops at ```output, "
        "an ```output block of up to 2,000 characters, 10 s, no tool schema in the chat template",
    ),
}
"""The protocols by name; ``authors`` reproduces the paper's runs and is the default everywhere."""


def get_protocol(name: str) -> TirProtocol:
    """The protocol called ``name``; a one-line ConfigError naming the choices otherwise."""
    try:
        return TIR_PROTOCOLS[name]
    except KeyError:
        raise ConfigError(
            f"unknown tool protocol {name!r}; choose one of {', '.join(TIR_PROTOCOLS)}"
        ) from None


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
        """All assistant turns joined (tool output excluded): where the strict answer is looked for."""
        return join_turns(turn.text for turn in self.turns)

    @property
    def full_text(self) -> str:
        """Assistant turns and tool messages in order: what the authors' reward reads."""
        return whole_response((turn.text, turn.tool.content if turn.tool else None) for turn in self.turns)


def whole_response(turns: Iterable[tuple[str, str | None]]) -> str:
    """The whole response from (assistant text, tool message or None) per turn, tool messages included:
    what the authors' reward scores (their verl decodes the response tokens, where the chat template's
    role markers also appear)."""
    return join_turns(part for text, tool in turns for part in (text, tool) if part)


class ToolLoop:
    """The protocol above for one trajectory, advanced by its driver step by step.

    ``request()`` gives the messages to continue and how many tokens the next turn may use;
    ``add_generation()`` records the turn and returns the tool call to run (None when the trajectory
    is done); ``add_tool_result()`` records its result. ``done`` / ``trajectory()`` at the end.
    ``messages`` are used as given: :meth:`TirProtocol.messages` adds the protocol's system prompt.
    """

    def __init__(
        self,
        messages: Sequence[dict[str, Any]],
        max_turns: int,
        max_tokens: int,
        protocol: TirProtocol,
        tools: bool = True,
    ):
        if max_turns < 1 or max_tokens < 1:
            raise ValueError(f"max_turns and max_tokens must be >= 1 (got {max_turns}, {max_tokens})")
        self.messages = [dict(m) for m in messages]
        self.max_turns = max_turns
        self.max_tokens = max_tokens
        self.protocol = protocol
        self.tools = tools
        self.turns: list[Turn] = []
        self.pending: ToolCall | None = None
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

    def add_generation(self, result: GenerationResult) -> ToolCall | None:
        """Record an assistant turn; the tool call to execute, or None when the trajectory is done."""
        if self.done:
            raise RuntimeError("the trajectory is finished")
        self.messages.append({"role": "assistant", "content": result.text})
        self.used_tokens += result.num_tokens
        call = self.protocol.find_call(result.text) if self.tools else None
        self.turns.append(
            Turn(result.text, result.num_tokens, result.finish_reason, call.code if call else None)
        )
        if result.finish_reason == "length" or self.used_tokens >= self.max_tokens:
            self.stop_reason = "max_tokens"
        elif call is None:
            self.stop_reason = "answer"
        elif len(self.turns) >= self.max_turns:
            self.stop_reason = "max_turns"
        self.pending = None if self.done else call
        return self.pending

    def add_tool_result(self, result: ToolResult) -> None:
        """Record the result of the call that ``add_generation`` asked for."""
        turn = self.turns[-1]
        if self.done or self.pending is None:
            raise RuntimeError("no tool call is pending")
        self.pending = None
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
    sandbox: CodeRunner, call: ToolCall, count_tokens: Callable[[str], int], protocol: TirProtocol
) -> ToolResult:
    """Run ``call`` in the sandbox and format its result for the model, as ``protocol`` does.

    A program error (exception, non-zero exit, timeout, memory limit) is a normal tool result with
    ``error=True``, and so is a call the protocol refuses (an unknown tool, another language); only a
    sandbox that cannot be reached raises (the caller records a crashed sample).
    """
    code, timeout, refusal = protocol.program(call)
    if code is None or not code.strip():
        content = refusal or protocol.tool_message("", "no code to run", "Error", False)
        return ToolResult(content, count_tokens(content), "Error", True)
    run = sandbox.run_code(code, run_timeout=timeout)
    content = protocol.tool_message(run.stdout, run.stderr, run.status, run.truncated)
    return ToolResult(content, count_tokens(content), run.status, failed(run.status, run.return_code))


def run_tool_loop(
    generate: Callable[[list[dict[str, Any]], int], GenerationResult],
    messages: Sequence[dict[str, Any]],
    sandbox_client: CodeRunner,
    max_turns: int,
    max_tokens: int,
    count_tokens: Callable[[str], int],
    protocol: TirProtocol,
) -> Trajectory:
    """One trajectory: ``generate(messages, max_new_tokens)`` for each turn, code run in the sandbox."""
    loop = ToolLoop(protocol.messages(messages), max_turns, max_tokens, protocol)
    while not loop.done:
        call = loop.add_generation(generate(*loop.request()))
        if call is not None:
            loop.add_tool_result(execute(sandbox_client, call, count_tokens, protocol))
    return loop.trajectory()
