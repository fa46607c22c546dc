"""A verl platform for running the trainer on the host CPU.

Registered as ``cpu`` with ``verl.plugin.platform.PlatformRegistry`` and selected with
``VERL_PLATFORM=cpu``. Notable choices (each documented where it is made):

* ``ray_resource_name()`` is ``"GPU"``: verl's resource-pool check counts only GPU/NPU resources
  (``verl/single_controller/ray/base.py:228-231``), so the run advertises logical GPUs with
  ``+ray_kwargs.ray_init.num_gpus=N`` and each trainer worker takes one.
* ``current_device()`` returns ``"cpu"`` (see :func:`ctpo_cli.train.verl.cpu.internals.cpu_device_id`).
* ``set_device()`` (platform and device module) creates the gloo process group (see
  :func:`ctpo_cli.train.verl.cpu.internals.init_gloo_process_group`); it is reached early only when
  ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1`` is set for the workers.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry

from ctpo_cli.train.verl.cpu import PLATFORM as PLATFORM_NAME
from ctpo_cli.train.verl.cpu import internals


def _mem_get_info(device: Any = None) -> tuple[int, int]:
    """(free, total) host memory in bytes, mirroring ``torch.cuda.mem_get_info``."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    except ImportError:  # pragma: no cover - psutil is a Ray dependency
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, pages


def _zero(*args: Any, **kwargs: Any) -> int:
    return 0


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _set_device(device_index: Any = None) -> None:
    internals.init_gloo_process_group()


def _build_device_module() -> types.ModuleType:
    """A ``torch.cpu``-like namespace with the ``torch.cuda`` functions verl calls.

    ``torch.cpu`` lacks ``empty_cache``, ``mem_get_info``, ``memory_allocated`` & co., the RNG-state
    functions and ``get_device_name`` (used by ``verl/utils/flops_counter.py:76-80`` when the device
    module is not ``torch.cpu`` itself).
    """
    mod = types.ModuleType(
        "ctpo_cli.train.verl.cpu.device_module", "torch.cpu plus no-op CUDA-style memory API"
    )
    attrs: dict[str, Any] = {
        name: getattr(torch.cpu, name)
        for name in (
            "is_available",
            "device_count",
            "synchronize",
            "current_stream",
            "stream",
            "Stream",
            "Event",
        )
    }
    attrs.update(
        current_device=internals.cpu_device_id,
        # verl's Ray Worker calls get_torch_device().set_device(local_rank) before the worker's own
        # process-group init (verl/single_controller/base/worker.py:281): our hook for the gloo group.
        set_device=_set_device,
        empty_cache=_noop,
        ipc_collect=_noop,
        reset_peak_memory_stats=_noop,
        set_per_process_memory_fraction=_noop,
        memory_allocated=_zero,
        memory_reserved=_zero,
        max_memory_allocated=_zero,
        max_memory_reserved=_zero,
        mem_get_info=_mem_get_info,
        get_rng_state=lambda *a, **k: torch.get_rng_state(),
        set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
        manual_seed=torch.manual_seed,
        manual_seed_all=torch.manual_seed,
        get_device_name=lambda *a, **k: "CPU",
        is_initialized=lambda: True,
    )
    for name, value in attrs.items():
        setattr(mod, name, value)
    return mod


_DEVICE_MODULE = _build_device_module()


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """verl platform backed by the host CPU, gloo collectives and logical Ray "GPU"s."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Never auto-detected: selected explicitly with VERL_PLATFORM=cpu.
        return False

    def current_device(self) -> int:  # returns the string "cpu": see internals.cpu_device_id
        _check_device_id_once()
        return internals.cpu_device_id()  # type: ignore[return-value]

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        _set_device(device_index)

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray hands out our logical devices as "GPU", so this is the variable it would set.
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str) -> Iterator[None]:
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


@functools.lru_cache(maxsize=1)
def _check_device_id_once() -> None:
    internals.check_device_id_usage()
