"""Tool-integrated reasoning inside verl, on CPU: the parsers of both protocols on real text and tokens,
the tools against a real sandbox service (loaded through verl's tool-config loader), and verl's
multi-turn agent loop driven end to end with a scripted model in place of vLLM (which needs a GPU):
its output trains only on tokens the model sampled, under both protocols."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import pytest
import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from ctpo_cli.algo.losses import get_policy_loss
from ctpo_cli.tir.protocol import AUTHORS_SYSTEM_PROMPT, AUTHORS_TOOL_NAME, STOP_STRINGS, SYSTEM_PROMPT
from ctpo_cli.train.experiments import EXPERIMENTS_DIR, build_job, compose_experiment
from ctpo_cli.train.local.model import CHAT_TEMPLATE, build_tokenizer
from ctpo_cli.train.verl.reward import authors_score, strict_score
from ctpo_cli.train.verl.tools import (
    AUTHORS_PARSER_NAME,
    PARSER_NAME,
    TOOL_NAME,
    AuthorsAgentLoop,
    CodeInterpreterTool,
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


def test_authors_parser_calls_the_first_block_anywhere(tokenizer: Any) -> None:
    from verl.experimental.agent_loop.tool_parser import ToolParser

    parser = ToolParser.get_tool_parser(AUTHORS_PARSER_NAME, tokenizer)
    turn = CODE_TURN + "\nand then more text.\n```python\nprint(0)\n```"
    text, calls = asyncio.run(parser.extract_tool_calls(tokenizer.encode(turn + "<|im_end|>")))
    assert text == turn and [(c.name, c.arguments) for c in calls] == [
        (AUTHORS_TOOL_NAME, '{"code": "print(6 * 7)", "timeout": 30.0}')
    ]


def test_authors_tool_answers_with_raw_output(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaded by verl from experiments/verl/tools-authors.yaml; verl's agent loop cuts the message."""
    from verl.tools.tool_registry import initialize_tools_from_config

    monkeypatch.setenv("CTPO_SANDBOX_URL", service.url)
    (tool,) = initialize_tools_from_config(str(EXPERIMENTS_DIR / "verl" / "tools-authors.yaml"))
    assert isinstance(tool, CodeInterpreterTool) and tool.name == AUTHORS_TOOL_NAME

    async def run(parameters: dict[str, Any]) -> str:
        response, _, _ = await tool.execute("id", parameters)
        assert response.text is not None
        return response.text

    assert asyncio.run(run({"code": "print(6 * 7)", "timeout": 30})) == "42\n"
    assert "ZeroDivisionError" in asyncio.run(run({"code": "1 / 0"}))
    assert (
        asyncio.run(run({"code": "print(1)", "language": "bash"}))
        == "sandbox blocked unsupported language: bash"
    )


def test_tool_runs_code_in_the_sandbox(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaded by verl from experiments/verl/tools-ctpo.yaml (sandbox URL from $CTPO_SANDBOX_URL)."""
    from verl.tools.tool_registry import initialize_tools_from_config

    monkeypatch.setenv("CTPO_SANDBOX_URL", service.url)
    (tool,) = initialize_tools_from_config(str(EXPERIMENTS_DIR / "verl" / "tools-ctpo.yaml"))
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
    """Stands in for verl's vLLM server manager: answers each generate() with the next scripted turn,
    every token with its own log-prob (-0.001, -0.002, ...), so that the output shows which tokens
    were sampled. A turn ending with a stop string is returned as vLLM returns it: with the stop
    string's tokens and no end-of-turn token."""

    def __init__(self, tokenizer: Any, turns: list[str]) -> None:
        self.tokenizer = tokenizer
        self.turns = list(turns)
        self.requests: list[dict[str, Any]] = []
        self.sampled: list[tuple[list[int], list[float]]] = []

    async def generate(
        self, *, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any], **_: Any
    ) -> Any:
        from verl.workers.rollout.replica import TokenOutput

        self.requests.append(
            {"prompt": self.tokenizer.decode(prompt_ids), "sampling_params": sampling_params}
        )
        turn = self.turns.pop(0)
        ids = self.tokenizer.encode(turn if turn.endswith(tuple(STOP_STRINGS)) else turn + "<|im_end|>")
        start = sum(len(tokens) for tokens, _ in self.sampled)
        log_probs = [-0.001 * (start + i + 1) for i in range(len(ids))]
        self.sampled.append((ids, log_probs))
        return TokenOutput(token_ids=list(ids), log_probs=list(log_probs), stop_reason="completed")


def small_config(tmp_path: Path, tir: str) -> DictConfig:
    """The experiment's verl config (validated) for protocol ``tir``, with lengths that fit the
    character-level tokenizer."""
    experiment = compose_experiment(
        "ctpo",
        "qwen3-0.6b-1gpu",
        overrides=["data.max_prompt_length=4096", "data.max_response_length=1024", f"ctpo.tir={tir}"],
        runs_dir=tmp_path,
    )
    return build_job(experiment).config


def test_a_turn_cut_at_the_stop_string_loses_the_stop_string_only(tokenizer: Any) -> None:
    from verl.workers.rollout.replica import TokenOutput

    class Client:
        async def generate(self, *, sampling_params: dict[str, Any], **_: Any) -> TokenOutput:
            assert sampling_params["stop"] == ["</s>", *STOP_STRINGS]
            ids = tokenizer.encode(CODE_TURN + "\n```output")  # vLLM keeps the stop string's tokens
            return TokenOutput(token_ids=ids, log_probs=[-1.0] * len(ids))

    output = asyncio.run(
        StopStringGenerator(Client(), tokenizer).generate(sampling_params={"stop": ["</s>"]})
    )
    assert tokenizer.decode(output.token_ids) == CODE_TURN + "\n"  # nothing added in its place
    assert output.log_probs == [-1.0] * len(output.token_ids)
    finished = tokenizer.encode(CODE_TURN + "<|im_end|>")
    assert stop_string_tokens(tokenizer, finished) == 0 and stop_string_tokens(tokenizer, finished[:-1]) == 0


def run_agent_loop(config: DictConfig, tokenizer: Any, model: ScriptedModel, tool: Any) -> Any:
    """One trajectory of the experiment's agent loop, built as verl's AgentLoopWorker builds it."""
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    agent = config.actor_rollout_ref.rollout.agent
    entries = OmegaConf.load(agent.agent_loop_config_path)
    assert isinstance(entries, ListConfig)
    (entry,) = [e for e in entries if e.name == agent.default_agent_loop]

    async def run() -> Any:
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
        output = await loop.run(
            {"temperature": 1.0, "top_p": 1.0}, raw_prompt=[{"role": "user", "content": "What is 6 times 7?"}]
        )
        return loop, output

    return asyncio.run(run())


def assert_trains_only_sampled_tokens(output: Any, model: ScriptedModel) -> None:
    """Every token with response mask 1 is a token the model sampled, in order, with its own log-prob; so CTPO's position t counts only them, and the loss gives no
    gradient to any other position, whatever the trainer's log-prob there."""
    mask = torch.tensor(output.response_mask)
    ids = torch.tensor(output.response_ids)
    rollout = torch.tensor(output.response_logprobs, dtype=torch.float64)
    sampled = {lp: i for tokens, lps in model.sampled for i, lp in zip(tokens, lps, strict=True)}
    trained = list(zip(rollout[mask == 1].tolist(), ids[mask == 1].tolist(), strict=True))
    assert all(sampled.get(lp) == i for lp, i in trained)  # each one a sampled token, with its log-prob
    assert [lp for lp, _ in trained] == sorted((lp for lp, _ in trained), reverse=True)  # in order, once
    assert (rollout[mask == 0] == 0).all()
    # verl's actor calls our loss with these (B, L) tensors; an unsampled token's log-prob is garbage
    log_prob = torch.where(mask == 1, rollout, torch.full_like(rollout, 5.0)).unsqueeze(0)
    log_prob = log_prob.clone().requires_grad_(True)
    loss, _ = get_policy_loss("ctpo")(
        old_log_prob=rollout.unsqueeze(0),
        log_prob=log_prob,
        advantages=torch.ones(1, len(mask), dtype=torch.float64),
        response_mask=mask.unsqueeze(0).bool(),
    )
    loss.backward()
    assert log_prob.grad is not None
    assert (log_prob.grad[0, mask == 0] == 0).all() and (log_prob.grad[0, mask == 1] != 0).all()


def test_ctpo_protocol_never_trains_the_token_that_closes_a_cut_turn(
    tokenizer: Any, service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first turn is cut at the stop string: its stop tokens are dropped and the end-of-turn token
    that closes it before the tool message is context (mask 0), not a trained token with log-prob 0."""
    monkeypatch.setenv("CTPO_SANDBOX_URL", service.url)
    model = ScriptedModel(tokenizer, [CODE_TURN + "\n```output", ANSWER_TURN])
    tool = PythonSandboxTool({"type": "native", "sandbox_url": service.url})
    loop, output = run_agent_loop(small_config(tmp_path, "ctpo"), tokenizer, model, tool)
    assert isinstance(loop, PythonBlockAgentLoop)

    first, second = model.requests
    assert first["sampling_params"]["stop"] == list(STOP_STRINGS)
    assert first["prompt"].startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>")  # system prompt added
    assert "TOOLS" not in first["prompt"]  # no tool schemas in the chat template
    # (verl's default continuous-token builder adds no newline after the end of turn; its Qwen one does)
    assert second["prompt"].endswith(
        f"{CODE_TURN}\n<|im_end|><|im_start|>tool\n```output\n42\n```<|im_end|>\n<|im_start|>assistant\n"
    )
    response = tokenizer.decode(output.response_ids)
    assert response.startswith(CODE_TURN + "\n<|im_end|>") and response.rstrip().endswith(
        ANSWER_TURN + "<|im_end|>"
    )
    code_tokens = len(tokenizer.encode(CODE_TURN + "\n"))  # "```output" dropped
    answer_tokens = len(tokenizer.encode(ANSWER_TURN + "<|im_end|>"))
    context_tokens = len(output.response_ids) - code_tokens - answer_tokens  # end of turn, tool message
    assert output.response_mask == [1] * code_tokens + [0] * context_tokens + [1] * answer_tokens
    assert output.response_ids[code_tokens] == tokenizer.eos_token_id  # the closing token is context
    assert_trains_only_sampled_tokens(output, model)
    assert output.num_turns == 4  # user, assistant, tool, assistant
    assert strict_score("x", tokenizer.decode(output.response_ids, skip_special_tokens=True), "42") == 1.0
    assert SandboxClient(service.url).health()


def test_authors_protocol_end_to_end(
    tokenizer: Any, service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Their prompt and tool schema, a block mid-turn runs, the raw output comes back, every turn ends
    with its own sampled end-of-turn token, and only sampled tokens are trained on."""
    monkeypatch.setenv("CTPO_SANDBOX_URL", service.url)
    first_turn = CODE_TURN + "\nIt will print the product."
    model = ScriptedModel(tokenizer, [first_turn, ANSWER_TURN])
    tool = CodeInterpreterTool({"type": "native", "sandbox_url": service.url})
    loop, output = run_agent_loop(small_config(tmp_path, "authors"), tokenizer, model, tool)
    assert isinstance(loop, AuthorsAgentLoop)

    first, second = model.requests
    assert not first["sampling_params"].get("stop")  # generation runs to the end of turn
    prompt = tokenizer.decode(tokenizer.encode(AUTHORS_SYSTEM_PROMPT))  # (this tokenizer lacks "\n\n")
    assert f"<|im_start|>system\n{prompt}<|im_end|>" in first["prompt"]
    assert 'TOOLS [{"type": "function", "function": {"name": "code_interpreter"' in first["prompt"]  # listed
    assert second["prompt"].endswith("<|im_start|>tool\n42\n<|im_end|>\n<|im_start|>assistant\n")
    first_tokens = len(tokenizer.encode(first_turn + "<|im_end|>"))
    answer_tokens = len(tokenizer.encode(ANSWER_TURN + "<|im_end|>"))
    context_tokens = len(output.response_ids) - first_tokens - answer_tokens
    assert output.response_mask == [1] * first_tokens + [0] * context_tokens + [1] * answer_tokens
    assert_trains_only_sampled_tokens(output, model)
    text = tokenizer.decode(output.response_ids, skip_special_tokens=True)
    assert authors_score("x", text, "42") == 1.0 == strict_score("x", text, "42")


def test_agent_loop_config_names_our_loops() -> None:
    entries = yaml.safe_load((EXPERIMENTS_DIR / "verl" / "agent_loops.yaml").read_text())
    assert entries == [
        {
            "name": "ctpo_authors_agent",
            "_target_": f"{AuthorsAgentLoop.__module__}.{AuthorsAgentLoop.__qualname__}",
        },
        {
            "name": "ctpo_python_agent",
            "_target_": f"{PythonBlockAgentLoop.__module__}.{PythonBlockAgentLoop.__qualname__}",
        },
    ]
