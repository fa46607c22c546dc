"""Tool-integrated reasoning in verl: the sandbox tools, the tool parsers and the agent loops of the two
protocols of :mod:`ctpo_cli.tir.protocol` (shared with ``ctpo eval``), selected by ``ctpo.tir``
(``experiments/tir/<name>.yaml``). verl 0.9.1 gets them through three of its extension points, without
a fork:

* Tools, verl ``BaseTool`` subclasses declared in a tool-config YAML (``multi_turn.tool_config_path``)
  that send the code to our sandbox service (``sandbox.client.SandboxClient``):
  :class:`CodeInterpreterTool` (``authors``: ``code_interpreter``, arguments ``code``, ``timeout``,
  ``language``; answers with the raw output, which verl's agent loop cuts to
  ``max_tool_response_length`` = 256 characters) and :class:`PythonSandboxTool` (``ctpo``: ``python``,
  argument ``code``; answers with an ```````output`` block).
* Tool parsers, registered in verl's registry (``ToolParser.register``) and selected with
  ``multi_turn.format``: ``ctpo_authors`` (the first JSON call or fenced code block anywhere in the
  turn, ``tir.protocol.authors_tool_call``) and ``ctpo_python_block`` (the ```````python`` block a turn
  ends with, ``tir.protocol.extract_code``).
* Agent loops, verl's ``ToolAgentLoop`` registered through ``agent.agent_loop_config_path``
  (``experiments/verl/agent_loops.yaml``): :class:`AuthorsAgentLoop` only sets the system prompt (the
  chat template lists the tool, generation runs to the end of turn, as in the authors' run);
  :class:`PythonBlockAgentLoop` also keeps tool schemas out of the chat template and stops generation
  at ``STOP_STRINGS`` (:class:`StopStringGenerator`).

No token the policy did not sample is trained on. A turn cut at a stop string drops the stop string's
tokens; the end-of-turn token that closes the turn before the tool message is then added by
:class:`ClosingTurnBuilder` as a *boundary token* of verl's continuous-token builder, which verl gives
response mask 0 and log-prob 0: it is context, like the tool message, so it gets no gradient and does
not advance CTPO's position t (method.md (2)).

Registration: importing this module registers the parsers. verl imports it in every agent-loop worker
(a Ray actor) when it loads the tool class named in the tool config and when it instantiates the agent
loop, both before any parser is looked up, so the ``verl.plugins`` entry point need not import it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any, cast

from verl.experimental.agent_loop.agent_loop import AgentLoopOutput
from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
from verl.experimental.agent_loop.tool_parser import FunctionCall, ToolParser
from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

from ctpo_cli.errors import ConfigError
from ctpo_cli.tir.protocol import (
    AUTHORS,
    AUTHORS_TOOL_SCHEMA,
    CTPO,
    CTPO_TOOL_NAME,
    FINISHED,
    STOP_STRINGS,
    TIR_PROTOCOLS,
    TirProtocol,
    ToolCall,
    authors_tool_output,
    format_tool_output,
)
from sandbox.client import SandboxClient, SandboxUnavailable

logger = logging.getLogger(__name__)

TOOL_NAME = CTPO_TOOL_NAME
PARSER_NAME = "ctpo_python_block"
AUTHORS_PARSER_NAME = "ctpo_authors"
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
AUTHORS_SCHEMA = OpenAIFunctionToolSchema.model_validate(AUTHORS_TOOL_SCHEMA)


class SandboxTool(BaseTool):
    """A verl tool that runs a call's program in the sandbox service as its protocol says.

    Tool-config ``config`` keys: ``sandbox_url`` (required; the experiment's tool config reads
    ``$CTPO_SANDBOX_URL``, which ``ctpo train`` sets), ``memory_limit_mb`` (default 1024),
    ``http_timeout`` (seconds per request, queueing in the service included, default 300). The
    per-program timeout is the protocol's. A program's own failure (exception, timeout, memory) is a
    normal answer; an unreachable sandbox is retried (:data:`RETRY_DELAYS`), then raises, which verl's
    agent loop turns into an error message for the model and a warning in the log.
    """

    protocol: TirProtocol
    schema: OpenAIFunctionToolSchema

    def __init__(self, config: dict[str, Any], tool_schema: OpenAIFunctionToolSchema | None = None) -> None:
        super().__init__(config, tool_schema or self.schema)
        url = config.get("sandbox_url")
        if not url:
            raise ConfigError(
                f"the {self.name} tool needs sandbox_url in its tool config (ctpo train sets $CTPO_SANDBOX_URL)"
            )
        self.memory_limit_mb = int(config.get("memory_limit_mb", 1024))
        self.client = SandboxClient(str(url), timeout=float(config.get("http_timeout", 300.0)))

    def get_openai_tool_schema(self) -> OpenAIFunctionToolSchema:
        return self.schema

    def render(self, stdout: str, stderr: str, status: str, truncated: bool) -> str:
        """The tool message for a program's result."""
        raise NotImplementedError

    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs: Any
    ) -> tuple[ToolResponse, float, dict[str, Any]]:
        """Run the call's program; returns (tool message, reward 0, metrics)."""
        code, timeout, refusal = self.protocol.program(ToolCall(self.name, dict(parameters)))
        if code is None or not code.strip():
            text = refusal or self.render("", "no code to run", "Error", False)
            return ToolResponse(text=text), 0.0, {"status": "Error", "error": True}
        run = await self._run(code, timeout)
        text = self.render(run.stdout, run.stderr, run.status, run.truncated)
        error = run.status != FINISHED or run.return_code != 0
        return (
            ToolResponse(text=text),
            0.0,
            {"status": run.status, "error": error, "seconds": run.execution_time},
        )

    async def _run(self, code: str, timeout: float) -> Any:
        """The sandbox's RunResult; retries while the service cannot be reached."""
        for delay in RETRY_DELAYS:
            try:
                return await self._call(code, timeout)
            except SandboxUnavailable as error:
                logger.warning("sandbox unavailable (%s); retrying in %.0f s", error, delay)
                await asyncio.sleep(delay)
        return await self._call(code, timeout)

    async def _call(self, code: str, timeout: float) -> Any:
        return await asyncio.to_thread(
            self.client.run_code, code, run_timeout=timeout, memory_limit_mb=self.memory_limit_mb
        )


class CodeInterpreterTool(SandboxTool):
    """``code_interpreter`` of the ``authors`` protocol: the raw stdout and stderr (verl's agent loop cuts
    the message to ``max_tool_response_length``, 256 characters in the authors' run)."""

    protocol = TIR_PROTOCOLS[AUTHORS]
    schema = AUTHORS_SCHEMA

    def render(self, stdout: str, stderr: str, status: str, truncated: bool) -> str:
        return authors_tool_output(stdout, stderr, status)


class PythonSandboxTool(SandboxTool):
    """``python`` of the ``ctpo`` protocol: an ```````output`` block (``format_tool_output``)."""

    protocol = TIR_PROTOCOLS[CTPO]
    schema = TOOL_SCHEMA

    def render(self, stdout: str, stderr: str, status: str, truncated: bool) -> str:
        return format_tool_output(stdout, stderr, status, truncated)


def protocol_calls(protocol: TirProtocol, text: str) -> list[FunctionCall]:
    """The tool calls of one assistant turn under ``protocol``: its first call, or none."""
    call = protocol.find_call(text)
    if call is None:
        return []
    return [FunctionCall(name=call.name, arguments=json.dumps(call.arguments, ensure_ascii=False))]


def python_call(text: str) -> list[FunctionCall]:
    """The ``ctpo`` protocol's calls: one ``python`` call if the turn ends with a code block, else none."""
    return protocol_calls(TIR_PROTOCOLS[CTPO], text)


class ProtocolToolParser(ToolParser):
    """A verl tool parser for one protocol. The turn's tokens are decoded without special tokens (the
    end-of-turn token would otherwise hide a closing fence); the text is returned unchanged as the
    assistant message's content."""

    protocol: TirProtocol

    async def extract_tool_calls(
        self, responses_ids: list[int], tools: list[OpenAIFunctionToolSchema] | None = None
    ) -> tuple[str, list[FunctionCall]]:
        text = await asyncio.to_thread(self.tokenizer.decode, responses_ids, skip_special_tokens=True)
        return text, protocol_calls(self.protocol, text)


@ToolParser.register(PARSER_NAME)
class PythonBlockToolParser(ProtocolToolParser):
    """``ctpo_python_block``: a turn ending with a ```````python`` block calls ``python``."""

    protocol = TIR_PROTOCOLS[CTPO]


@ToolParser.register(AUTHORS_PARSER_NAME)
class AuthorsToolParser(ProtocolToolParser):
    """``ctpo_authors``: the first JSON call or fenced code block anywhere in the turn (their parser's
    code-block fallback, with their strict Hermes branch disabled as in their fork)."""

    protocol = TIR_PROTOCOLS[AUTHORS]


class ProtocolAgentLoop(ToolAgentLoop):
    """verl's ToolAgentLoop with a protocol's system prompt (``TirProtocol.messages``)."""

    protocol: TirProtocol

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        kwargs["raw_prompt"] = self.protocol.messages(list(kwargs["raw_prompt"]))
        output: AgentLoopOutput = await super().run(sampling_params, **kwargs)
        return output


class AuthorsAgentLoop(ProtocolAgentLoop):
    """The ``authors`` protocol: the chat template lists ``code_interpreter``, turns end at end of turn.

    Registered under the name ``ctpo_authors_agent`` by ``experiments/verl/agent_loops.yaml``.
    """

    protocol = TIR_PROTOCOLS[AUTHORS]


class PythonBlockAgentLoop(ProtocolAgentLoop):
    """The ``ctpo`` protocol (see the module docstring): no tool schemas in the chat template, generation
    stops at :data:`STOP_STRINGS`, the turn is then closed by a boundary token that is never trained on.

    Registered under the name ``ctpo_python_agent`` by ``experiments/verl/agent_loops.yaml``.
    """

    protocol = TIR_PROTOCOLS[CTPO]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tool_schemas = []  # the tools stay callable; only the chat template no longer lists them
        self.server_manager = cast(Any, StopStringGenerator(self.server_manager, self.tokenizer))
        self.continuous_token_builder = cast(
            Any, ClosingTurnBuilder(self.continuous_token_builder, cast(Any, self.tokenizer).eos_token_id)
        )


class StopStringGenerator:
    """Wraps verl's LLM client: generation stops at :data:`STOP_STRINGS`, whose tokens are dropped.

    vLLM returns the tokens that spelled the stop string and no end-of-turn token. Those tokens (which
    the policy did sample) are removed with their log-probs, so the turn is what ``ctpo eval`` records
    (the stop string is not part of it); nothing is added in their place: :class:`ClosingTurnBuilder`
    closes the turn as context.
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
            output.token_ids = output.token_ids[:keep]
            if output.log_probs is not None:
                output.log_probs = output.log_probs[:keep]
        return output


class ClosingTurnBuilder:
    """verl's continuous-token builder, plus one rule: context (a tool message) merged after an assistant
    turn that does not end with the end-of-turn token (a turn cut at a stop string) is preceded by that
    token, declared a boundary token (``MergeResult.inserted_token_ids``), which verl's
    ``align_response_metadata`` gives response mask 0 and log-prob 0: not sampled, never trained on,
    not counted in t."""

    def __init__(self, builder: Any, end_of_turn: int) -> None:
        self.builder = builder
        self.end_of_turn = end_of_turn

    def __getattr__(self, name: str) -> Any:
        return getattr(self.builder, name)

    def merge_context_tokens(
        self,
        previous_messages: list[dict[str, Any]],
        updated_messages: list[dict[str, Any]],
        runtime_token_ids: list[int],
        *,
        tools: list[dict[str, Any]] | None = None,
    ) -> Any:
        if not runtime_token_ids or runtime_token_ids[-1] == self.end_of_turn:
            return self.builder.merge_context_tokens(
                previous_messages, updated_messages, runtime_token_ids, tools=tools
            )
        closed = [*runtime_token_ids, self.end_of_turn]
        result = self.builder.merge_context_tokens(previous_messages, updated_messages, closed, tools=tools)
        if result.removed_prefix_token_count:
            raise RuntimeError(
                "verl's continuous-token builder removed prefix tokens after a closed turn; "
                "ClosingTurnBuilder cannot align the response mask (verl changed?)"
            )
        return dataclasses.replace(result, inserted_token_ids=[self.end_of_turn, *result.inserted_token_ids])


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
