"""Tool-integrated reasoning inside verl, on CPU: the fenced-block parser on real text and tokens, the
``python`` tool against a real sandbox service (loaded through verl's tool-config loader), and verl's
multi-turn agent loop driven end to end with a scripted model in place of vLLM (which needs a GPU)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import pytest
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from ctpo_cli.tir.protocol import STOP_STRINGS, SYSTEM_PROMPT
from ctpo_cli.train.experiments import EXPERIMENTS_DIR, build_job, compose_experiment
from ctpo_cli.train.local.model import CHAT_TEMPLATE, build_tokenizer
from ctpo_cli.train.verl.reward import compute_score
from ctpo_cli.train.verl.tools import (
    PARSER_NAME,
    TOOL_NAME,
    PythonBlockAgentLoop,
    PythonSandboxTool,
    StopStringGenerator,
    python_call,
    stop_string_tokens,
)
from sandbox.client import SandboxClient
from sandbox.server import Service, running_service

CODE_TURN = "Let me compute it.\n```python\nprint(6 * 7)\n```"
ANSWER_TURN = "The program printed 42, so the answer is \\boxed{42}."


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    with running_service() as running:
        yield running


@pytest.fixture
def tokenizer() -> Any:
    """A real Hugging Face tokenizer (character level, Qwen chat tokens) whose chat template, like
    Qwen3's, lists the tools it is given in a system block."""
    tok = build_tokenizer()
    tok.chat_template = (
        "{% if tools %}<|im_start|>system\nTOOLS {{ tools | tojson }}<|im_end|>\n{% endif %}" + CHAT_TEMPLATE
    )
    return tok


def test_parser_calls_python_only_for_a_turn_ending_with_a_block() -> None:
    (call,) = python_call(CODE_TURN)
    assert call.name == TOOL_NAME and call.arguments == '{"code": "print(6 * 7)"}'
    assert python_call(CODE_TURN + "\n```output")  # a kept stop string does not matter
    assert python_call(CODE_TURN + "\nAnd it prints 42, so \\boxed{42}.") == []  # the model did not wait
    assert python_call(ANSWER_TURN) == []
    assert python_call("```python\n\n```") == []


def test_registered_parser_decodes_tokens(tokenizer: Any) -> None:
    """Looked up by name in verl's registry, as ToolAgentLoop does; the end-of-turn token is skipped."""
    from verl.experimental.agent_loop.tool_parser import ToolParser

    parser = ToolParser.get_tool_parser(PARSER_NAME, tokenizer)
    ids = tokenizer.encode(CODE_TURN + "<|im_end|>")
    text, calls = asyncio.run(parser.extract_tool_calls(ids))
    assert text == CODE_TURN and [c.name for c in calls] == [TOOL_NAME]


def test_tool_runs_code_in_the_sandbox(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaded by verl from experiments/verl/tools.yaml (sandbox URL from $CTPO_SANDBOX_URL)."""
    from verl.tools.tool_registry import initialize_tools_from_config

    monkeypatch.setenv("CTPO_SANDBOX_URL", service.url)
    (tool,) = initialize_tools_from_config(str(EXPERIMENTS_DIR / "verl" / "tools.yaml"))
    assert isinstance(tool, PythonSandboxTool) and tool.name == TOOL_NAME

    async def run(code: str) -> tuple[str, dict[str, Any]]:
        response, reward, metrics = await tool.execute("id", {"code": code})
        assert reward == 0.0 and response.text is not None
        return response.text, metrics

    text, metrics = asyncio.run(run("print(6 * 7)"))
    assert text == "```output\n42\n```" and metrics["error"] is False
    text, metrics = asyncio.run(run("1 / 0"))
    assert "ZeroDivisionError" in text and metrics["error"] is True
    text, _ = asyncio.run(run("import time\nprint('started', flush=True)\ntime.sleep(60)"))
    assert "started" in text and "[execution stopped: TimeLimitExceeded]" in text


def test_tool_without_a_sandbox_url_says_so() -> None:
    with pytest.raises(ValueError, match="CTPO_SANDBOX_URL"):
        PythonSandboxTool({"type": "native", "sandbox_url": None})


class ScriptedModel:
    """Stands in for verl's vLLM server manager: answers each generate() with the next scripted turn."""

    def __init__(self, tokenizer: Any, turns: list[str]) -> None:
        self.tokenizer = tokenizer
        self.turns = list(turns)
        self.requests: list[dict[str, Any]] = []

    async def generate(
        self, *, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any], **_: Any
    ) -> Any:
        from verl.workers.rollout.replica import TokenOutput

        self.requests.append(
            {"prompt": self.tokenizer.decode(prompt_ids), "sampling_params": sampling_params}
        )
        turn = self.turns.pop(0)
        ids = self.tokenizer.encode(turn if turn.endswith(tuple(STOP_STRINGS)) else turn + "<|im_end|>")
        return TokenOutput(token_ids=ids, log_probs=[-0.5] * len(ids), stop_reason="completed")


def small_config(tmp_path: Path) -> DictConfig:
    """The experiment's verl config (validated), with lengths that fit the character-level tokenizer."""
    experiment = compose_experiment(
        "ctpo",
        "qwen3-0.6b-1gpu",
        overrides=["data.max_prompt_length=1024", "data.max_response_length=1024"],
        runs_dir=tmp_path,
    )
    return build_job(experiment).config


def test_a_turn_cut_at_the_stop_string_ends_like_a_finished_turn(tokenizer: Any) -> None:
    from verl.workers.rollout.replica import TokenOutput

    class Client:
        async def generate(self, *, sampling_params: dict[str, Any], **_: Any) -> TokenOutput:
            assert sampling_params["stop"] == ["</s>", *STOP_STRINGS]
            ids = tokenizer.encode(CODE_TURN + "\n```output")  # vLLM keeps the stop string's tokens
            return TokenOutput(token_ids=ids, log_probs=[-1.0] * len(ids))

    output = asyncio.run(
        StopStringGenerator(Client(), tokenizer).generate(sampling_params={"stop": ["</s>"]})
    )
    assert tokenizer.decode(output.token_ids) == CODE_TURN + "\n<|im_end|>"
    assert output.log_probs == [-1.0] * (len(output.token_ids) - 1) + [0.0]
    finished = tokenizer.encode(CODE_TURN + "<|im_end|>")
    assert stop_string_tokens(tokenizer, finished) == 0 and stop_string_tokens(tokenizer, finished[:-1]) == 0


def test_agent_loop_runs_a_tool_turn_end_to_end(
    tokenizer: Any, service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    monkeypatch.setenv("CTPO_SANDBOX_URL", service.url)
    config = small_config(tmp_path)
    model = ScriptedModel(
        tokenizer, [CODE_TURN + "\n```output", ANSWER_TURN]
    )  # the first cut at the stop string
    tool = PythonSandboxTool({"type": "native", "sandbox_url": service.url})

    agent = config.actor_rollout_ref.rollout.agent
    entries = OmegaConf.load(agent.agent_loop_config_path)
    assert isinstance(entries, ListConfig)
    (entry,) = [e for e in entries if e.name == agent.default_agent_loop]

    async def run() -> Any:
        # built as verl's AgentLoopWorker builds it, from the experiment's agent-loop file
        loop = hydra.utils.instantiate(
            config=entry,
            trainer_config=DictConfigWrap(config),
            server_manager=model,
            tokenizer=tokenizer,
            processor=None,
            hf_model_type=None,
            dataset_cls=RLHFDataset,
            data_config=DictConfigWrap(config.data),
            tools=ToolListWrap([tool]),
        )
        assert isinstance(loop, PythonBlockAgentLoop)
        return await loop.run(
            {"temperature": 1.0, "top_p": 1.0}, raw_prompt=[{"role": "user", "content": "What is 6 times 7?"}]
        )

    output = asyncio.run(run())
    first, second = model.requests
    assert first["sampling_params"]["stop"] == list(STOP_STRINGS)
    assert first["prompt"].startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>")  # system prompt added
    assert "TOOLS" not in first["prompt"]  # no tool schemas in the chat template
    assert second["prompt"].endswith(
        "<|im_start|>tool\n```output\n42\n```<|im_end|>\n<|im_start|>assistant\n"
    )

    response = tokenizer.decode(output.response_ids)
    assert response.startswith(CODE_TURN) and response.rstrip().endswith(ANSWER_TURN + "<|im_end|>")
    code_tokens = len(tokenizer.encode(CODE_TURN + "\n<|im_end|>"))  # "```output" replaced by the end of turn
    answer_tokens = len(tokenizer.encode(ANSWER_TURN + "<|im_end|>"))
    context_tokens = len(output.response_ids) - code_tokens - answer_tokens  # tool message + chat scaffolding
    assert output.response_mask == [1] * code_tokens + [0] * context_tokens + [1] * answer_tokens
    assert output.num_turns == 4  # user, assistant, tool, assistant
    assert compute_score("x", tokenizer.decode(output.response_ids, skip_special_tokens=True), "42") == 1.0
    assert SandboxClient(service.url).health()


def test_agent_loop_config_names_our_loop() -> None:
    (entry,) = yaml.safe_load((EXPERIMENTS_DIR / "verl" / "agent_loops.yaml").read_text())
    assert entry == {
        "name": "ctpo_python_agent",
        "_target_": f"{PythonBlockAgentLoop.__module__}.{PythonBlockAgentLoop.__qualname__}",
    }
