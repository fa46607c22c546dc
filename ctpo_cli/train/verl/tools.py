"""Tool-integrated reasoning in verl: the ``python`` tool, the fenced-block tool parser, the agent loop.

The protocol is :mod:`ctpo_cli.tir.protocol` (shared with ``ctpo eval``): the model ends a turn with a
```````python`` block, the sandbox runs it, the output comes back as a tool message (an
```````output`` block); the answer is the last ``\\boxed{}``. verl 0.9.1 gets it through three of its
extension points, without a fork:

* :class:`PythonSandboxTool`, a verl ``BaseTool`` named ``python`` with one argument ``code``,
  declared in the tool-config YAML (``experiments/verl/tools.yaml``, ``multi_turn.tool_config_path``).
  It sends the code to our sandbox service (``sandbox.client.SandboxClient``) and returns
  ``format_tool_output(...)``.
* :class:`PythonBlockToolParser`, registered in verl's tool-parser registry
  (``ToolParser.register``) as ``ctpo_python_block`` and selected with ``multi_turn.format``: the
  code block a turn ends with (``tools.extract_code``) becomes one call of ``python``. verl's built-in
  parsers only read JSON inside ``<tool_call>`` tags.
* :class:`PythonBlockAgentLoop`, verl's ``ToolAgentLoop`` registered through
  ``agent.agent_loop_config_path`` (``experiments/verl/agent_loops.yaml``) with three changes:
  tool schemas stay out of the chat template (Qwen3's template would otherwise add a "# Tools" section
  asking for ``<tool_call>`` JSON, contradicting the system prompt), generation stops at
  ``tools.STOP_STRINGS`` with the turn then closed like a finished one (:class:`StopStringGenerator`),
  and a conversation without a system message gets ``tools.SYSTEM_PROMPT`` (``ctpo data prepare``
  already writes it into every prompt).

Registration: importing this module registers the parser. verl imports it in every agent-loop worker
(a Ray actor) when it loads the tool class named in the tool config and when it instantiates the agent
loop, both before any parser is looked up, so the ``verl.plugins`` entry point need not import it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, cast

from verl.experimental.agent_loop.agent_loop import AgentLoopOutput
from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
from verl.experimental.agent_loop.tool_parser import FunctionCall, ToolParser
from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

from ctpo_cli.errors import ConfigError
from ctpo_cli.tir.protocol import FINISHED, STOP_STRINGS, SYSTEM_PROMPT, extract_code, format_tool_output
from sandbox.client import SandboxClient, SandboxUnavailable

logger = logging.getLogger(__name__)

TOOL_NAME = "python"
PARSER_NAME = "ctpo_python_block"
RETRY_DELAYS = (1.0, 4.0, 16.0)
"""Seconds to wait before each retry when the sandbox cannot be reached (then the call fails)."""

TOOL_SCHEMA = OpenAIFunctionToolSchema.model_validate(
    {
        "type": "function",
        "function": {
            "name": TOOL_NAME,
            "description": "Run Python code in a sandbox and return what it prints.",
            "parameters": {
                "type": "object",
                "properties": {"code": {"type": "string", "description": "The Python program to run."}},
                "required": ["code"],
            },
        },
    }
)


class PythonSandboxTool(BaseTool):
    """verl tool ``python``: runs ``code`` in the sandbox service, answers with its formatted output.

    Tool-config ``config`` keys: ``sandbox_url`` (required; the experiment's tool config reads
    ``$CTPO_SANDBOX_URL``, which ``ctpo train`` sets), ``run_timeout`` (seconds per program, default 10),
    ``memory_limit_mb`` (default 1024), ``http_timeout`` (seconds per request, queueing in the service
    included, default 300). A program's own failure (exception, timeout, memory) is a normal answer;
    an unreachable sandbox is retried (:data:`RETRY_DELAYS`), then raises, which verl's agent loop turns
    into an error message for the model and a warning in the log.
    """

    def __init__(self, config: dict[str, Any], tool_schema: OpenAIFunctionToolSchema | None = None) -> None:
        super().__init__(config, tool_schema or TOOL_SCHEMA)
        url = config.get("sandbox_url")
        if not url:
            raise ConfigError(
                "the python tool needs sandbox_url in its tool config (ctpo train sets $CTPO_SANDBOX_URL)"
            )
        self.run_timeout = float(config.get("run_timeout", 10.0))
        self.memory_limit_mb = int(config.get("memory_limit_mb", 1024))
        self.client = SandboxClient(str(url), timeout=float(config.get("http_timeout", 300.0)))

    def get_openai_tool_schema(self) -> OpenAIFunctionToolSchema:
        return TOOL_SCHEMA

    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs: Any
    ) -> tuple[ToolResponse, float, dict[str, Any]]:
        """Run ``parameters["code"]``; returns (tool message, reward 0, metrics)."""
        code = parameters.get("code")
        if not isinstance(code, str) or not code.strip():
            return ToolResponse(text=format_tool_output("", "no code to run", "Error", False)), 0.0, {}
        run = await self._run(code)
        text = format_tool_output(run.stdout, run.stderr, run.status, run.truncated)
        error = run.status != FINISHED or run.return_code != 0
        return (
            ToolResponse(text=text),
            0.0,
            {"status": run.status, "error": error, "seconds": run.execution_time},
        )

    async def _run(self, code: str) -> Any:
        """The sandbox's RunResult; retries while the service cannot be reached."""
        for delay in RETRY_DELAYS:
            try:
                return await self._call(code)
            except SandboxUnavailable as error:
                logger.warning("sandbox unavailable (%s); retrying in %.0f s", error, delay)
                await asyncio.sleep(delay)
        return await self._call(code)

    async def _call(self, code: str) -> Any:
        return await asyncio.to_thread(
            self.client.run_code, code, run_timeout=self.run_timeout, memory_limit_mb=self.memory_limit_mb
        )


def python_call(text: str) -> list[FunctionCall]:
    """The tool calls of one assistant turn: one ``python`` call if it ends with a code block, else none."""
    code = extract_code(text)
    if code is None:
        return []
    return [FunctionCall(name=TOOL_NAME, arguments=json.dumps({"code": code}, ensure_ascii=False))]


@ToolParser.register(PARSER_NAME)
class PythonBlockToolParser(ToolParser):
    """verl tool parser ``ctpo_python_block``: a turn ending with a ```````python`` block calls ``python``.

    The turn's tokens are decoded without special tokens (the end-of-turn token would otherwise hide
    the closing fence); the text is returned unchanged as the assistant message's content.
    """

    async def extract_tool_calls(
        self, responses_ids: list[int], tools: list[OpenAIFunctionToolSchema] | None = None
    ) -> tuple[str, list[FunctionCall]]:
        text = await asyncio.to_thread(self.tokenizer.decode, responses_ids, skip_special_tokens=True)
        return text, python_call(text)


class PythonBlockAgentLoop(ToolAgentLoop):
    """verl's ToolAgentLoop for the ```````python`` protocol (see the module docstring).

    Registered under the name ``ctpo_python_agent`` by ``experiments/verl/agent_loops.yaml``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tool_schemas = []  # the tools stay callable; only the chat template no longer lists them
        self.server_manager = cast(Any, StopStringGenerator(self.server_manager, self.tokenizer))

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        kwargs["raw_prompt"] = with_system_prompt(list(kwargs["raw_prompt"]))
        output: AgentLoopOutput = await super().run(sampling_params, **kwargs)
        return output


class StopStringGenerator:
    """Wraps verl's LLM client: generation stops at :data:`STOP_STRINGS`, and a turn cut there ends
    like any finished turn.

    vLLM returns the tokens that spelled the stop string and no end-of-turn token, so the chat would
    go on inside the assistant turn. Those tokens are replaced by the end-of-turn token (log-prob 0):
    the turn is what ``ctpo eval`` records (the stop string is not part of it) and the tool message
    follows a closed turn, as after a model that stopped by itself.
    """

    def __init__(self, client: Any, tokenizer: Any) -> None:
        self.client = client
        self.tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    async def generate(self, *, sampling_params: dict[str, Any], **kwargs: Any) -> Any:
        stops = [*(sampling_params.get("stop") or []), *STOP_STRINGS]
        output = await self.client.generate(sampling_params={**sampling_params, "stop": stops}, **kwargs)
        cut = stop_string_tokens(self.tokenizer, output.token_ids)
        if cut:
            keep = len(output.token_ids) - cut
            output.token_ids = [*output.token_ids[:keep], self.tokenizer.eos_token_id]
            if output.log_probs is not None:
                output.log_probs = [*output.log_probs[:keep], 0.0]
        return output


def stop_string_tokens(tokenizer: Any, token_ids: list[int]) -> int:
    """How many trailing tokens spell (part of) a stop string the turn ends with; 0 if it does not."""
    if not token_ids or token_ids[-1] == tokenizer.eos_token_id:
        return 0
    text = tokenizer.decode(token_ids, skip_special_tokens=True).rstrip()
    stop = next((stop for stop in STOP_STRINGS if text.endswith(stop)), None)
    if stop is None:
        return 0
    before = text[: len(text) - len(stop)]
    for keep in range(len(token_ids) - 1, -1, -1):
        if before.startswith(tokenizer.decode(token_ids[:keep], skip_special_tokens=True)):
            return len(token_ids) - keep
    return len(token_ids)


def with_system_prompt(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` starting with a system message: :data:`SYSTEM_PROMPT` is prepended when none is there."""
    if messages and messages[0].get("role") == "system":
        return messages
    return [{"role": "system", "content": SYSTEM_PROMPT}, *messages]
