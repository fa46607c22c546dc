"""Every place where the CPU platform leans on verl 0.9.1 internals rather than a public extension point.

Each function checks that the internal it relies on still looks the way it did in verl 0.9.1 and
raises :class:`VerlInternalsChanged` (a ``RuntimeError``) otherwise, so an upgrade of verl breaks
loudly here instead of silently doing something else. Line numbers refer to verl 0.9.1.
"""

from __future__ import annotations

import inspect
import os
from datetime import timedelta

import torch

VERL_VERSION_TESTED = "0.9.1"


class VerlInternalsChanged(RuntimeError):
    """verl's internals no longer match what ctpo_cli.train.verl.cpu was written against."""


def _fail(what: str, where: str) -> VerlInternalsChanged:
    import verl

    return VerlInternalsChanged(
        f"ctpo CPU platform: {what} ({where}). ctpo_cli.train.verl.cpu was written against verl {VERL_VERSION_TESTED}; "
        f"this is verl {verl.__version__}. Re-read that verl code and update ctpo_cli/train/verl/cpu/internals.py."
    )


# ---------------------------------------------------------------------------------------------
# 1. In-worker rollout class: verl has no register function, only a private dict.
# ---------------------------------------------------------------------------------------------
def register_inworker_rollout(name: str, fqdn: str, mode: str = "async") -> None:
    """Make ``get_rollout_class(name, mode)`` return the class at ``fqdn``.

    verl 0.9.1 resolves the rollout class built inside each hybrid worker
    (``verl/workers/engine_workers.py:667``) through ``get_rollout_class``
    (``verl/workers/rollout/base.py:96``), which reads the module-private dict
    ``_ROLLOUT_REGISTRY`` (``verl/workers/rollout/base.py:89``) keyed by ``(name, mode)``.
    There is no public register function, so we add an entry to that dict.
    """
    from verl.workers.rollout import base as rollout_base

    registry = getattr(rollout_base, "_ROLLOUT_REGISTRY", None)
    getter = getattr(rollout_base, "get_rollout_class", None)
    where = "verl/workers/rollout/base.py:89,96"
    if not isinstance(registry, dict) or getter is None:
        raise _fail("_ROLLOUT_REGISTRY dict or get_rollout_class() is gone", where)
    if not all(isinstance(k, tuple) and len(k) == 2 for k in registry):
        raise _fail("_ROLLOUT_REGISTRY keys are no longer (name, mode) tuples", where)
    if "_ROLLOUT_REGISTRY" not in inspect.getsource(getter):
        raise _fail("get_rollout_class() no longer reads _ROLLOUT_REGISTRY", where)
    existing = registry.get((name, mode))
    if existing is not None and existing != fqdn:
        raise RuntimeError(
            f"ctpo CPU platform: rollout ({name!r}, {mode!r}) already registered as {existing}"
        )
    registry[(name, mode)] = fqdn


# ---------------------------------------------------------------------------------------------
# 2. Process group: verl builds a backend string torch rejects when the device is "cpu".
# ---------------------------------------------------------------------------------------------
def check_process_group_workaround_applies() -> None:
    """Verify that pre-creating a gloo process group still makes verl skip its own.

    ``initialize_global_process_group_ray`` (``verl/utils/distributed.py:83``) builds the backend
    string ``f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"`` (line 89), i.e.
    ``"cpu:gloo,cpu:gloo"`` on our platform, which torch rejects ("Duplicate device type cpu").
    No extension point covers it, but the function only initialises when
    ``not torch.distributed.is_initialized()`` (line 90). :func:`init_gloo_process_group` therefore
    creates a plain gloo group first (called from the platform's ``set_device``, which the Ray worker
    base class calls before the worker's own init: ``verl/single_controller/base/worker.py:281``).
    """
    from verl.utils import distributed as verl_dist

    where = "verl/utils/distributed.py:83-90"
    fn = getattr(verl_dist, "initialize_global_process_group_ray", None)
    if fn is None:
        raise _fail("initialize_global_process_group_ray() is gone", where)
    src = inspect.getsource(fn)
    if "if not torch.distributed.is_initialized()" not in src:
        raise _fail("initialize_global_process_group_ray() no longer skips an existing process group", where)
    if 'f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"' not in src:
        raise _fail(
            "the backend string changed (perhaps fixed upstream): the gloo pre-init may be unnecessary", where
        )


def init_gloo_process_group() -> bool:
    """Create the default process group with plain ``gloo`` inside a verl Ray worker.

    Only acts in processes that verl's ``RayWorkerGroup`` started (it sets ``WG_BACKEND=ray``,
    ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` in the actor's env:
    ``verl/single_controller/ray/base.py:632-640``). Returns True if a group now exists.
    See :func:`check_process_group_workaround_applies` for why. Collective timeout:
    ``$CTPO_PROCESS_GROUP_TIMEOUT_S`` seconds (default 1800).
    """
    if torch.distributed.is_initialized():
        return True
    env = os.environ
    if env.get("WG_BACKEND") != "ray" or not all(k in env for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR")):
        return False
    check_process_group_workaround_applies()
    torch.distributed.init_process_group(
        backend="gloo",
        rank=int(env["RANK"]),
        world_size=int(env["WORLD_SIZE"]),
        timeout=timedelta(seconds=int(env.get("CTPO_PROCESS_GROUP_TIMEOUT_S", "1800"))),
        init_method=env.get("DIST_INIT_METHOD") or "env://",
    )
    return True


# ---------------------------------------------------------------------------------------------
# 3. Device id: verl passes get_device_id() straight to .to()/torch.device().
# ---------------------------------------------------------------------------------------------
CPU_DEVICE_ID = "cpu"


def cpu_device_id() -> str:
    """The value our platform's ``current_device()`` returns: the string ``"cpu"``, not an int.

    ``PlatformBase.current_device`` is typed ``-> int`` (``verl/plugin/platform/platform_base.py``),
    but verl feeds ``get_device_id()`` (``verl/utils/device.py:114``) directly to ``.to()``,
    ``to_empty(device=...)`` and ``torch.device(...)``, e.g. ``verl/utils/fsdp_utils.py:59,507,509,
    527,640`` and ``verl/workers/engine/fsdp/transformer_impl.py:730,1028,1052,1552``. An int there
    means an accelerator index (``torch.device(0)`` is not the CPU), so we return ``"cpu"``. Any verl
    change that formats it (``f"{dev}:{id}"``) or casts it (``int(id)``) fails loudly with a torch
    or ValueError at that call site; :func:`check_device_id_usage` guards the two sites that matter
    most at import time.
    """
    return CPU_DEVICE_ID


def check_device_id_usage() -> None:
    """Loudly reject a verl whose FSDP helpers format/cast the device id instead of passing it on."""
    from verl.utils import fsdp_utils

    where = "verl/utils/fsdp_utils.py:507-509"
    src = inspect.getsource(fsdp_utils)
    if "model.to(device=get_device_id()" not in src and "to_empty(device=get_device_id())" not in src:
        raise _fail("fsdp_utils no longer passes get_device_id() straight to .to()", where)
    torch.device(cpu_device_id())  # must stay a valid torch device spec
