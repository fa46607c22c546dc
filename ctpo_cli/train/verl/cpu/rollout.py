"""A CPU rollout for verl's agent-loop (server) mode, built on plain transformers forward passes.

Three pieces, mirroring verl's vLLM rollout (``verl/workers/rollout/vllm_rollout/``):

* :class:`CpuGenerationServer`: a Ray actor holding an HF causal LM. ``generate(prompt_ids,
  sampling_params, request_id, ...)`` is token-in/token-out and returns verl's ``TokenOutput``
  (response ids, per-token log-probs, stop reason). This is what the agent loop reaches through
  ``LLMServerClient.generate`` (``verl/workers/rollout/llm_server.py:150``).
* :class:`CpuReplica`: a ``RolloutReplica`` (``verl/workers/rollout/replica.py``) that starts one
  server per replica; registered with ``RolloutReplicaRegistry`` under :data:`ROLLOUT_NAME`.
* :class:`CpuServerAdapter`: the ``BaseRollout`` built inside each hybrid trainer worker
  (``verl/workers/engine_workers.py:667``). It forwards the trainer's weights to its replica's
  server on every ``update_weights`` call (once per training step).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import zlib
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import ray
import torch
from torch.distributed.device_mesh import DeviceMesh
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig, RolloutConfig
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, TokenOutput

from ctpo_cli.train.verl.cpu import ROLLOUT as ROLLOUT_NAME

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

SERVER_NAME_PREFIX = f"{ROLLOUT_NAME}_server_"


def server_actor_name(replica_rank: int, node_rank: int = 0) -> str:
    return f"{SERVER_NAME_PREFIX}{replica_rank}_{node_rank}"


def _torch_threads() -> int:
    """Threads of the rollout server's forward passes: ``$CTPO_ROLLOUT_THREADS``, else every core."""
    return int(os.getenv("CTPO_ROLLOUT_THREADS", "0")) or max(1, (os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------
def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k / nucleus (top-p) set with -inf. ``logits``: [vocab]."""
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(0, sorted_idx, remove), float("-inf"))
    return logits


def request_seed(
    request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any], seed: int, full_determinism: bool
) -> int:
    """Per-request seed: ``sampling_params['seed']`` if given; with ``rollout.full_determinism``, derived
    from the prompt tokens and ``rollout.seed`` (the same prompt gives the same sample on any replica, so
    runs with one and two trainer workers sample alike; the n samples of one prompt are then identical);
    else from the request id (verl gives every request a fresh one)."""
    if sampling_params.get("seed") is not None:
        return int(sampling_params["seed"])
    key = bytes(str(prompt_ids), "ascii") if full_determinism else str(request_id).encode()
    return (zlib.crc32(key) ^ seed) & 0x7FFFFFFF


@torch.no_grad()
def sample_tokens(
    model: torch.nn.Module,
    prompt_ids: list[int],
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    stop_token_ids: set[int],
    seed: int,
    repetition_penalty: float = 1.0,
) -> tuple[list[int], list[float], str]:
    """Autoregressive sampling with a KV cache. Returns (token_ids, log_probs, finish_reason).

    Log-probs are vLLM's ``processed_logprobs`` (verl's default ``rollout.logprobs_mode``): the
    log-softmax of the temperature-scaled logits, which is what verl's actor recomputes
    (logits / temperature). top-k/top-p only restrict the sampling set. ``temperature == 0`` means
    greedy decoding with log-probs of the unscaled logits.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    past = None
    out_ids: list[int] = []
    out_lps: list[float] = []
    finish = "length"
    for _ in range(max_tokens):
        out = model(input_ids=input_ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1].float()
        if repetition_penalty != 1.0 and out_ids:
            seen = torch.tensor(sorted(set(prompt_ids) | set(out_ids)), device=logits.device)
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / repetition_penalty, vals * repetition_penalty)
        if temperature and temperature > 0:
            scaled = logits / temperature
            logprobs = torch.log_softmax(scaled, dim=-1)
            probs = torch.softmax(_filter_top_k_top_p(scaled, top_k, top_p), dim=-1)
            tok = int(torch.multinomial(probs.cpu(), 1, generator=gen).item())
        else:
            logprobs = torch.log_softmax(logits, dim=-1)
            tok = int(torch.argmax(logits).item())
        out_ids.append(tok)
        out_lps.append(float(logprobs[tok].item()))
        if tok in stop_token_ids:
            finish = "stop"
            break
        input_ids = torch.tensor([[tok]], dtype=torch.long, device=device)
    return out_ids, out_lps, finish


# ---------------------------------------------------------------------------------------------
# Server (Ray actor)
# ---------------------------------------------------------------------------------------------
class CpuGenerationServer:
    """Token-in/token-out generation server; the method set mirrors ``vLLMHttpServer``."""

    def __init__(
        self,
        config: RolloutConfig | Any,
        model_config: Any,
        rollout_mode: RolloutMode,
        replica_rank: int,
        node_rank: int = 0,
    ) -> None:
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(_torch_threads())
        self.config: RolloutConfig = omega_conf_to_dataclass(config)  # type: ignore[arg-type]
        self.model_config: HFModelConfig = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.rollout_mode = rollout_mode
        self.replica_rank = replica_rank
        self.node_rank = node_rank
        self.global_steps: int | None = None
        self.weight_version = 0
        self._lock = asyncio.Lock()
        self._aborted = False

        path = self.model_config.local_path
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="sdpa"
        )
        self.model.eval()
        eos = (
            self.model_config.generation_config.eos_token_id if self.model_config.generation_config else None
        )
        if eos is None:
            eos = self.model_config.tokenizer.eos_token_id
        self.eos_token_ids: set[int] = set(eos if isinstance(eos, list) else [eos])
        self.max_model_len = self.config.max_model_len or (
            self.config.prompt_length + self.config.response_length
        )

    # -- identity ---------------------------------------------------------------------------
    def get_server_address(self) -> tuple[str, int]:
        # No HTTP endpoint: the agent loop uses the actor handle. Addresses only key verl's router.
        return f"{ROLLOUT_NAME}-replica-{self.replica_rank}", self.node_rank

    # -- weights ----------------------------------------------------------------------------
    def load_weights(self, state_dict: dict[str, torch.Tensor], global_steps: int | None = None) -> dict:
        """Load trainer weights (HF names). Fails loudly on missing/unexpected/mis-shaped tensors."""
        result = self.model.load_state_dict(state_dict, strict=False)
        own = dict(self.model.named_parameters())
        missing = [k for k in own if k not in state_dict]
        if result.unexpected_keys or missing:
            raise RuntimeError(
                f"{ROLLOUT_NAME}: weight sync mismatch: unexpected={result.unexpected_keys} missing={missing}"
            )
        self.weight_version += 1
        if global_steps is not None:
            self.global_steps = global_steps
        return {"num_tensors": len(state_dict), "weight_version": self.weight_version}

    # -- generation -------------------------------------------------------------------------
    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: list[Any] | None = None,
        video_data: list[Any] | None = None,
        audio_data: list[Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        priority: int = 0,
        **kwargs: Any,
    ) -> TokenOutput:
        if image_data or video_data or audio_data:
            raise NotImplementedError(f"{ROLLOUT_NAME}: multimodal inputs are not supported")
        params = dict(sampling_params)
        prompt_ids = [int(t) for t in prompt_ids]
        max_possible = self.max_model_len - len(prompt_ids)
        if max_possible < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room within {self.max_model_len}")
        max_tokens = params.pop("max_tokens", params.pop("max_new_tokens", None))
        if max_tokens is None:
            max_tokens = min(
                self.config.response_length,
                self.config.prompt_length + self.config.response_length - len(prompt_ids),
            )
        max_tokens = max(1, min(int(max_tokens), max_possible))
        ignore_eos = params.get("ignore_eos", self.config.ignore_eos)
        stop_ids = set() if ignore_eos else set(self.eos_token_ids)
        stop_ids |= set(params.get("stop_token_ids") or [])
        base_seed = self.config.seed if self.config.full_determinism else self.config.seed + self.replica_rank
        seed = request_seed(request_id, prompt_ids, params, base_seed, self.config.full_determinism)
        top_k = params.get("top_k", -1)
        top_k = -1 if top_k is None else int(top_k)

        async with self._lock:  # one request at a time; the forward pass runs off the event loop
            if self._aborted:
                return TokenOutput(
                    token_ids=[], stop_reason="aborted", extra_fields={"global_steps": self.global_steps}
                )
            token_ids, log_probs, finish = await asyncio.to_thread(
                sample_tokens,
                self.model,
                prompt_ids,
                max_tokens=max_tokens,
                temperature=float(params.get("temperature", 1.0)),
                top_p=float(params.get("top_p", 1.0)),
                top_k=top_k,
                stop_token_ids=stop_ids,
                seed=seed,
                repetition_penalty=float(params.get("repetition_penalty", 1.0) or 1.0),
            )
        stop_strings = params.get("stop") or []
        if stop_strings:
            token_ids, log_probs = self._truncate_at_stop_strings(token_ids, log_probs, stop_strings)
        return TokenOutput(
            token_ids=token_ids,
            log_probs=log_probs if params.get("logprobs") else None,
            stop_reason="completed",
            num_preempted=0,
            extra_fields={"global_steps": self.global_steps, "finish_reason": finish, "seed": seed},
        )

    def _truncate_at_stop_strings(
        self, token_ids: list[int], log_probs: list[float], stops: Iterable[str]
    ) -> tuple[list[int], list[float]]:
        tok = self.model_config.tokenizer
        for i in range(1, len(token_ids) + 1):
            text = tok.decode(token_ids[:i])
            if any(s and s in text for s in stops):
                return token_ids[:i], log_probs[:i]
        return token_ids, log_probs

    # -- lifecycle no-ops (same names as vLLMHttpServer) --------------------------------------
    async def wake_up(self, tags: list[str] | None = None) -> None:
        return None

    async def sleep(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:
        return None

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    async def wait_for_requests_to_drain(self) -> None:
        async with self._lock:
            return

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        self._aborted = bool(reject_request)
        return {"aborted_count": 0, "request_ids": []}

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True) -> dict:
        return {"aborted": False, "request_id": request_id}

    async def resume_generation(self) -> None:
        self._aborted = False

    async def resume_engine_generation(self) -> None:
        self._aborted = False

    async def open_submission_gate(self) -> None:
        self._aborted = False

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# Replica (driver side)
# ---------------------------------------------------------------------------------------------
class CpuReplica(RolloutReplica):
    """One :class:`CpuGenerationServer` per replica; only the hybrid (colocated-in-trainer) mode."""

    async def launch_servers(self) -> None:
        if self.rollout_mode != RolloutMode.HYBRID:
            raise NotImplementedError(
                f"{ROLLOUT_NAME}: only hybrid mode is implemented, got {self.rollout_mode}"
            )
        if self.nnodes != 1:
            raise NotImplementedError(f"{ROLLOUT_NAME}: one node per replica only")
        node_id = await self.workers[0].__ray_call__.remote(lambda w: ray.get_runtime_context().get_node_id())
        server_cls = ray.remote(CpuGenerationServer)
        server = server_cls.options(
            name=server_actor_name(self.replica_rank),
            num_cpus=0,  # the CPUs are accounted to the trainer bundles; see README
            scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=False
            ),
            max_concurrency=self.max_concurrency,
        ).remote(
            config=self.config,
            model_config=self.model_config,
            rollout_mode=self.rollout_mode,
            replica_rank=self.replica_rank,
        )
        self.servers = [server]
        address, port = await server.get_server_address.remote()
        self._server_handle = server
        self._server_address = f"{address}:{port}"


# ---------------------------------------------------------------------------------------------
# In-worker adapter
# ---------------------------------------------------------------------------------------------
async def _iterate(
    weights: Iterable[tuple[str, torch.Tensor]] | AsyncIterator[tuple[str, torch.Tensor]],
) -> AsyncIterator[tuple[str, torch.Tensor]]:
    """verl hands the weights over as a plain or an async iterator, depending on the engine."""
    if isinstance(weights, AsyncIterator):
        async for item in weights:
            yield item
    else:
        for item in weights:
            yield item


class CpuServerAdapter(BaseRollout):
    """``BaseRollout`` living in each trainer worker; pushes weights to its replica's server."""

    def __init__(
        self,
        config: RolloutConfig,
        model_config: HFModelConfig,
        device_mesh: DeviceMesh,
        replica_rank: int = -1,
    ) -> None:
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ["RANK"])
        rollout_world_size = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // rollout_world_size if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % rollout_world_size
        self._server: ray.actor.ActorHandle | None = None

    def _server_handle(self) -> ray.actor.ActorHandle | None:
        if self.rollout_rank != 0:
            return None
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]) -> None:
        return None

    async def release(self) -> None:
        return None

    @torch.no_grad()
    async def update_weights(
        self,
        weights: Iterator[tuple[str, torch.Tensor]] | AsyncIterator[tuple[str, torch.Tensor]],
        wire_format: str = "named_tensors",
        global_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        if wire_format != "named_tensors":
            raise NotImplementedError(f"{ROLLOUT_NAME}: wire_format {wire_format!r} is not supported")
        if kwargs.get("peft_config") is not None:
            raise NotImplementedError(f"{ROLLOUT_NAME}: LoRA adapter sync is not supported")
        start = time.time()
        server = self._server_handle()
        state: dict[str, torch.Tensor] = {}
        # Every rank must drain the generator: producing a full tensor is a collective under FSDP.
        async for name, tensor in _iterate(weights):
            if server is not None:
                state[name] = tensor.detach().to("cpu", copy=True).contiguous()
        if server is not None:
            info = await server.load_weights.remote(state, global_steps)
            logger.info(
                "%s: synced %s tensors in %.2fs", ROLLOUT_NAME, info["num_tensors"], time.time() - start
            )

    def generate_sequences(self, prompts: Any) -> Any:
        raise NotImplementedError(f"{ROLLOUT_NAME}: use the agent loop (server mode)")
