"""Generation back-ends of ``ctpo eval``: ``hf`` (transformers, in process), ``vllm`` (offline engine) and
``openai`` (any OpenAI-compatible server), behind one :class:`Backend` protocol; ``auto`` picks one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from ctpo_cli.errors import BackendUnavailable, ConfigError, InputFileError
from ctpo_cli.eval.settings import BACKENDS, EvalSettings
from ctpo_cli.tir.protocol import GenerationResult, get_protocol


@dataclass(frozen=True)
class GenerationRequest:
    """Continue ``messages`` with one assistant turn of at most ``max_new_tokens`` tokens."""

    messages: list[dict[str, Any]]
    max_new_tokens: int
    seed: int


class Backend(Protocol):
    """A model that generates assistant turns for a batch of conversations."""

    default_batch_size: int
    context_window: int | None
    """Positions of the model (prompt + response) where the backend enforces them; None where the
    engine or server applies its own limit."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | Exception]:
        """One result per request, or the exception that request alone failed with (the sample is
        recorded as crashed); an error of the whole batch raises."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    tools: tuple[dict[str, Any], ...] = ()
    """Tool schemas the chat template lists (the tool protocol's)."""


class ChatTokenizer:
    """The model's tokenizer and chat template: the same prompt text for every backend.

    ``enable_thinking=False`` is passed to the template (Qwen3 then answers without a thinking block,
    the paper's setting; templates without the variable ignore it).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, path: str) -> ChatTokenizer:
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(path))
        except OSError as error:
            raise InputFileError(
                f"cannot load a tokenizer from {path}: {str(error).splitlines()[0]}"
            ) from error

    def render(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()) -> str:
        text = self.tokenizer.apply_chat_template(
            list(messages),
            tools=list(tools) or None,
            add_generation_prompt=True,
            tokenize=False,
            enable_thinking=False,
        )
        return str(text)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string (excluded) and whether one occurred."""
    positions = [text.find(s) for s in stop if s in text]
    return (text[: min(positions)], True) if positions else (text, False)


DecodeProgress = Callable[[int, int], None]
"""Called by a backend at each decoding step of a batch: (tokens decoded so far, the batch's budget)."""


class _StepCounter:
    """A ``generate`` streamer (transformers' ``BaseStreamer`` interface) that reports the decoding step:
    ``put`` receives the prompt once, then each step's tokens."""

    def __init__(self, budget: int, on_step: DecodeProgress) -> None:
        self.budget, self.on_step, self.steps = budget, on_step, -1

    def put(self, value: Any) -> None:
        self.steps += 1
        self.on_step(self.steps, self.budget)

    def end(self) -> None:
        self.on_step(self.budget, self.budget)


class HFBackend:
    """transformers ``generate`` on CPU or one GPU, a batch of conversations at a time.

    Sampling is seeded per batch from its first request's seed (per-request seeds are not possible
    inside one batched ``generate``). Requests of a batch may have different budgets: the batch runs to
    the largest and each sequence is cut to its own (``finish_reason="length"``). No sequence runs past
    the model's positions (``context_window``, its ``max_position_embeddings``): a budget that would is
    cut there, as vLLM's ``max_model_len`` does, and a prompt that fills the window gets an empty,
    ``length``-finished turn. ``on_step`` sees every decoding step (the runner's progress bar).
    """

    default_batch_size = 16

    def __init__(self, model: str, sampling: Sampling, on_step: DecodeProgress | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, StoppingCriteriaList, StopStringCriteria

        self.chat = ChatTokenizer.load(model)
        tokenizer = self.chat.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        device = "cuda" if torch.cuda.is_available() else "cpu"
        auto: Any = AutoModelForCausalLM  # transformers 5's from_pretrained decorator confuses mypy
        self.model = auto.from_pretrained(model, dtype="auto")
        self.model.to(device).eval()
        self.context_window: int | None = getattr(self.model.config, "max_position_embeddings", None)
        self.sampling = sampling
        self.on_step = on_step
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self.stopping = (
            StoppingCriteriaList([StopStringCriteria(tokenizer, list(sampling.stop))])
            if sampling.stop
            else None
        )
        self.torch = torch

    def count_tokens(self, text: str) -> int:
        return self.chat.count_tokens(text)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | Exception]:
        tokenizer = self.chat.tokenizer
        prompts = [self.chat.render(r.messages, self.sampling.tools) for r in requests]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(
            self.model.device
        )
        room = (
            [self.context_window - n for n in batch["attention_mask"].sum(dim=1).tolist()]
            if self.context_window is not None
            else [r.max_new_tokens for r in requests]
        )
        budgets = [max(0, min(r.max_new_tokens, free)) for r, free in zip(requests, room, strict=True)]
        rows: list[list[int]] = [[] for _ in requests]
        if max(budgets) > 0:
            rows = self._decode(batch, max(budgets), requests[0].seed)
        stops_at = self.eos_ids | {tokenizer.pad_token_id}  # pad fills rows a stop string ended
        results: list[GenerationResult | Exception] = []
        for budget, row in zip(budgets, rows, strict=True):
            end = next((i for i, token in enumerate(row) if token in stops_at), len(row))
            ids = row[: end + 1] if end < len(row) and row[end] in self.eos_ids else row[:end]
            finish = "stop" if end < len(row) else "length"
            if len(ids) > budget:
                ids, finish = ids[:budget], "length"
            text, stopped = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), self.sampling.stop)
            results.append(GenerationResult(text, len(ids), "stop" if stopped else finish))
        return results

    def _decode(self, batch: Any, budget: int, seed: int) -> list[list[int]]:
        """The new tokens of every row of ``batch`` (at most ``budget``), sampled under ``seed``."""
        self.torch.manual_seed(seed)
        sample = self.sampling.temperature > 0
        with self.torch.no_grad():
            output = self.model.generate(
                **batch,
                do_sample=sample,
                temperature=self.sampling.temperature if sample else None,
                top_p=self.sampling.top_p if sample else None,
                top_k=None,  # no top-k, whatever the model's generation_config says (Qwen3: 20)
                max_new_tokens=budget,
                stopping_criteria=self.stopping,
                pad_token_id=self.chat.tokenizer.pad_token_id,
                streamer=_StepCounter(budget, self.on_step) if self.on_step else None,
            )
        rows: list[list[int]] = output[:, batch["input_ids"].shape[1] :].tolist()
        return rows

    def close(self) -> None:
        del self.model


class VLLMBackend:
    """vLLM's offline engine (GPU): every request of a batch scheduled together, one sample each with
    its own seed; prefix caching shares the prompt of a problem's samples."""

    default_batch_size = 4096

    def __init__(self, model: str, sampling: Sampling, seed: int) -> None:
        from vllm import LLM, SamplingParams

        self.chat = ChatTokenizer.load(model)
        self.context_window: int | None = None
        self.llm = LLM(model=model, seed=seed, enable_prefix_caching=True)
        self.sampling = sampling
        self.params = SamplingParams

    def count_tokens(self, text: str) -> int:
        return self.chat.count_tokens(text)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | Exception]:
        prompts = [
            {"prompt_token_ids": self.chat.encode(self.chat.render(r.messages, self.sampling.tools))}
            for r in requests
        ]
        params = [
            self.params(
                n=1,
                temperature=self.sampling.temperature,
                top_p=self.sampling.top_p,
                max_tokens=r.max_new_tokens,
                stop=list(self.sampling.stop),
                seed=r.seed,
            )
            for r in requests
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            GenerationResult(
                o.outputs[0].text,
                len(o.outputs[0].token_ids),
                "length" if o.outputs[0].finish_reason == "length" else "stop",
            )
            for o in outputs
        ]

    def close(self) -> None:
        del self.llm


RETRY_ATTEMPTS = 6
"""Tries of one request to an OpenAI-compatible server (waits of about 1, 2, 4, 8, 16 s between them)."""


def is_transient(error: BaseException) -> bool:
    """An error that a later try may not meet: the connection failed, was reset or timed out, or the
    server answered 429 (too many requests) or 5xx."""
    import httpx

    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code == 429 or error.response.status_code >= 500
    return isinstance(error, httpx.TransportError)


class OpenAIBackend:
    """Any OpenAI-compatible server (e.g. ``vllm serve CHECKPOINT``) through ``/v1/completions``.

    The prompt is rendered here with the model's own chat template (the tokenizer is loaded from
    ``--model``), exactly as the other backends and training render it; tool messages then need no
    tool-call ids. The served model name is the server's first entry of ``/v1/models``.
    """

    default_batch_size = 64

    def __init__(self, model: str, base_url: str, sampling: Sampling, timeout: float = 600.0) -> None:
        import httpx

        self.chat = ChatTokenizer.load(model)
        self.context_window: int | None = None
        self.sampling = sampling
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout, transport=httpx.HTTPTransport(retries=3)
        )
        try:
            models = self.http.get("/v1/models").raise_for_status().json()["data"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
            raise BackendUnavailable(
                f"no OpenAI-compatible server at {base_url} ({error!r}); start one with `vllm serve {model}`"
            ) from error
        self.served = str(models[0]["id"])
        self.threads = ThreadPoolExecutor(
            max_workers=self.default_batch_size, thread_name_prefix="ctpo-openai"
        )

    def count_tokens(self, text: str) -> int:
        return self.chat.count_tokens(text)

    def _one(self, request: GenerationRequest) -> GenerationResult:
        payload = {
            "model": self.served,
            "prompt": self.chat.render(request.messages, self.sampling.tools),
            "max_tokens": request.max_new_tokens,
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "top_k": -1,  # vLLM extension: no top-k, not the model's generation_config default (Qwen3: 20)
            "stop": list(self.sampling.stop) or None,
            "seed": request.seed,
            "n": 1,
        }
        body = self._post(payload)
        choice = body["choices"][0]
        text, _ = cut_at_stop(choice["text"], self.sampling.stop)
        tokens = body.get("usage", {}).get("completion_tokens") or self.count_tokens(text)
        return GenerationResult(
            text, int(tokens), "length" if choice.get("finish_reason") == "length" else "stop"
        )

    @retry(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential_jitter(initial=1.0, max=30.0),
        stop=stop_after_attempt(RETRY_ATTEMPTS),
        reraise=True,
    )
    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/completions; a transient failure (:func:`is_transient`) is retried with exponential
        backoff and jitter, up to RETRY_ATTEMPTS tries; then (or on any other error) it raises."""
        reply: dict[str, Any] = self.http.post("/v1/completions", json=payload).raise_for_status().json()
        return reply

    def _safe(self, request: GenerationRequest) -> GenerationResult | Exception:
        try:
            return self._one(request)
        except Exception as error:  # HTTP error after retries, a malformed reply: this sample only
            return error

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | Exception]:
        return list(self.threads.map(self._safe, requests))

    def close(self) -> None:
        self.threads.shutdown()
        self.http.close()


def resolve_backend(settings: EvalSettings) -> str:
    """``auto``: openai with ``--base-url``, vLLM when it is installed and a GPU is visible, else hf."""
    if settings.backend not in BACKENDS:
        raise ConfigError(f"unknown backend {settings.backend!r}; choose one of {', '.join(BACKENDS)}")
    if settings.backend == "openai" and not settings.base_url:
        raise ConfigError("--backend openai needs --base-url (e.g. http://localhost:8000 of `vllm serve`)")
    if settings.backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise BackendUnavailable(
                "the vllm backend needs vLLM (pip install 'ctpo[gpu]'); use --backend hf on CPU"
            ) from None
    if settings.backend != "auto":
        return settings.backend
    if settings.base_url:
        return "openai"
    import importlib.util

    import torch

    return "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "hf"


def make_backend(settings: EvalSettings, backend: str, on_step: DecodeProgress | None = None) -> Backend:
    """The backend named ``backend``; ``on_step`` follows decoding where the backend can report it (hf)."""
    protocol = get_protocol(settings.tir)
    sampling = (
        Sampling(settings.temperature, settings.top_p, protocol.stop_strings, protocol.tool_schemas)
        if settings.tools
        else Sampling(settings.temperature, settings.top_p, ())
    )
    if backend == "hf":
        return HFBackend(settings.model, sampling, on_step)
    if backend == "vllm":
        return VLLMBackend(settings.model, sampling, settings.seed)
    assert settings.base_url
    return OpenAIBackend(settings.model, settings.base_url, sampling)
