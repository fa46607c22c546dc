"""verl's own trainer on a CPU: a platform, FSDP engines for device ``cpu`` and a transformers rollout,
added through verl's registries (no file of verl is patched). Selected with ``VERL_PLATFORM=cpu``; the
``tiny-cpu`` preset (``ctpo.platform: cpu``) makes ``ctpo train`` set :data:`ENV` for verl.

* :mod:`~ctpo_cli.train.verl.cpu.platform`: ``PlatformRegistry.register("cpu")``: gloo collectives,
  ``torch.cpu`` plus the CUDA-style calls verl makes, logical Ray "GPU"s.
* :mod:`~ctpo_cli.train.verl.cpu.rollout`: ``RolloutReplicaRegistry.register("cpu_hf")``: a
  token-in/token-out generation server (transformers forward passes with a KV cache: log-probs,
  temperature/top-p/top-k, stop tokens and strings, per-request seeds) fed the trainer's weights at
  every step.
* :mod:`~ctpo_cli.train.verl.cpu.internals`: the three verl internals this leans on (the in-worker
  rollout dict, the gloo backend string, the device id), each checked against verl 0.9.1's code and
  failing loudly (:class:`~ctpo_cli.train.verl.cpu.internals.VerlInternalsChanged`) if verl changed.

The plugin (``ctpo_cli.train.verl.plugin``) calls :func:`register` only when ``VERL_PLATFORM=cpu``, so a
GPU run imports none of this. Importing this package itself imports neither torch nor verl.
"""

from __future__ import annotations

import importlib
import os

PLATFORM = "cpu"
ROLLOUT = "cpu_hf"

ENV = {
    "VERL_PLATFORM": PLATFORM,
    # verl's Ray Worker then calls the device module's set_device before its own process-group set-up,
    # where the platform creates a plain gloo group (internals.init_gloo_process_group).
    "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
}
"""Environment of a CPU run's verl process (inherited by its Ray cluster, workers included)."""


def selected() -> bool:
    """Whether this process runs verl on the CPU platform (``VERL_PLATFORM=cpu``)."""
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM


def register() -> None:
    """Register the platform, the FSDP engines for device ``cpu`` and the ``cpu_hf`` rollout (idempotent),
    after checking that the verl internals they rely on are as in verl 0.9.1."""
    # the platform first: verl's engine modules resolve the platform when they are imported
    importlib.import_module(f"{__name__}.platform")
    _register_engines_and_rollout()


def _register_engines_and_rollout() -> None:
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from ctpo_cli.train.verl.cpu import internals

    internals.check_process_group_workaround_applies()
    # public extension point (verl/workers/engine/base.py): verl registers these engines for cuda/npu only
    for model_type, engine in (
        ("language_model", FSDPEngineWithLMHead),
        ("value_model", FSDPEngineWithValueHead),
    ):
        registered = EngineRegistry._engines.get(model_type, {})
        backends = [b for b in ("fsdp", "fsdp2") if PLATFORM not in registered.get(b, {})]
        if backends:
            EngineRegistry.register(model_type=model_type, backend=backends, device=[PLATFORM])(engine)
    # loaded when verl asks for it: a worker may be importing the rollout module at this very moment
    RolloutReplicaRegistry.register(
        ROLLOUT, lambda: importlib.import_module(f"{__name__}.rollout").CpuReplica
    )
    internals.register_inworker_rollout(ROLLOUT, f"{__name__}.rollout.CpuServerAdapter")
