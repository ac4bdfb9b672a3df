"""Run an unmodified GPT-NeoX checkout on CPU (tests, smoke runs, a login node without a GPU).

Switched on only by ``NEXTLONG_NEOX_CPU=1`` in the environment of ``python deepy.py train.py ...``;
the ``.pth`` hook (:mod:`neox_plugin._hook`) then calls :func:`install` in the launcher and in every
rank it starts. Nothing here runs otherwise.

GPT-NeoX (``megatron/``) and DeeperSpeed address the device through ``torch.cuda``: ``initialize``
asserts ``torch.cuda.is_available()``, sets ``torch.cuda.set_device(rank % device_count)``, seeds
the model-parallel RNG tracker with ``torch.cuda.manual_seed``/``get_rng_state``, allocates with
``device=torch.cuda.current_device()``, builds batches with ``torch.cuda.LongTensor``, moves modules
and tensors with ``.cuda()``, and reports ``torch.cuda.memory_*``. :func:`patch_torch` answers those
calls with the CPU: one "device" per local rank (``LOCAL_SIZE``, set by DeepSpeed's launcher), the
device is ``"cpu"``, ``.cuda()`` returns its receiver, the CUDA RNG calls use torch's CPU generator,
memory figures are 0 and NVTX ranges do nothing. DeepSpeed itself runs on its CPU accelerator
(``DS_ACCELERATOR=cpu``, set here unless already set); the config must use ``distributed_backend:
gloo``, ``precision: fp32`` and no fused or flash kernels (``configs/neox/tiny_cpu.yml``).

The patch is applied when ``torch`` is first imported (the hook's finder), so processes that never
import torch pay nothing.

One DeepSpeed patch rides on the same switch (:func:`patch_deepspeed_engine`, applied when
``deepspeed.runtime.engine`` is imported): loading weights only (GPT-NeoX's ``finetune: true`` or
``no_load_optim: true``, DeepSpeed's ``load_module_only``) calls ``optimizer.refresh_fp32_params()``, which
DeepSpeed's mixed-precision and ZeRO wrappers define and a plain fp32 optimizer (``FusedAdam``, torch's
``Adam``; what ``precision: fp32`` with ZeRO stage 0 gives, the only set-up that trains on CPU here) does not:
``AttributeError: 'FusedAdam' object has no attribute 'refresh_fp32_params'``. The bug is not CPU-specific
(DeepSpeed issue #7132: fp32 without ZeRO fails the same way on a GPU); bf16 or fp16, or any ZeRO stage, wraps
the optimizer in a class that has the method, so the recipes (bf16 + ZeRO 1) are not affected. For a plain
optimizer the parameters it steps ARE the module's parameters, which the load has just overwritten in place,
so there is nothing to refresh: :func:`add_fp32_refresh` gives such an optimizer a no-op method, only after
checking that every parameter it holds is one of the module's.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from types import ModuleType
from typing import Any

#: Environment switch; any value but empty/0/false/no/off turns CPU support on.
ENV_SWITCH = "NEXTLONG_NEOX_CPU"
#: Attribute set on ``torch.cuda`` (and on ``DeepSpeedEngine``) once patched.
MARKER = "_nextlong_cpu"
#: DeepSpeed module whose engine gets :func:`patch_deepspeed_engine`.
DEEPSPEED_ENGINE = "deepspeed.runtime.engine"
#: Logged when :func:`add_fp32_refresh` gives an optimizer the no-op method.
REFRESH_NOTE = "fp32 optimizer: refresh_fp32_params is a no-op (its parameters are the module's, loaded in place)"

logger = logging.getLogger(__name__)


def enabled() -> bool:
    """True when :data:`ENV_SWITCH` asks for CPU support."""
    return os.environ.get(ENV_SWITCH, "").strip().lower() not in ("", "0", "false", "no", "off")


def _device_count() -> int:
    """Local ranks on this node (DeepSpeed's launcher exports ``LOCAL_SIZE``); 1 outside a launcher."""
    try:
        return max(1, int(os.environ.get("LOCAL_SIZE", "1")))
    except ValueError:
        return 1


def _noop_fn(name: str) -> Any:
    """A new do-nothing function (a distinct object per attribute: torch._dynamo keys rules by object)."""

    def fn(*_args: Any, **_kwargs: Any) -> None:
        return None

    fn.__name__ = fn.__qualname__ = name
    return fn


def _zero_fn(name: str) -> Any:
    """A new function returning 0 (memory figures)."""

    def fn(*_args: Any, **_kwargs: Any) -> int:
        return 0

    fn.__name__ = fn.__qualname__ = name
    return fn


class _Nvtx:
    """``torch.cuda.nvtx`` without CUDA: ranges are no-ops."""

    range_push = staticmethod(_noop_fn("range_push"))
    range_pop = staticmethod(_noop_fn("range_pop"))
    mark = staticmethod(_noop_fn("mark"))

    @staticmethod
    def range(*_args: Any, **_kwargs: Any) -> Any:
        import contextlib

        return contextlib.nullcontext()


class _Event:
    """``torch.cuda.Event`` on CPU: records wall-clock time (ms), as GPT-NeoX's timers read it."""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        self._t: float | None = None

    def record(self, *_args: Any, **_kwargs: Any) -> None:
        import time

        self._t = time.perf_counter()

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _Event) -> float:
        if self._t is None or end._t is None:
            raise RuntimeError("Event.elapsed_time: both events must be recorded")
        return (end._t - self._t) * 1000.0


def patch_torch(torch: ModuleType) -> None:
    """Make ``torch.cuda`` (and ``.cuda()``) address the CPU. Idempotent."""
    cuda = torch.cuda
    if getattr(cuda, MARKER, False):
        return
    gen = torch.default_generator  # the CPU generator; torch.manual_seed calls cuda.manual_seed_all: no recursion

    cuda.is_available = lambda: True
    cuda.device_count = _device_count
    cuda.current_device = lambda: "cpu"
    cuda.set_device = _noop_fn("set_device")
    cuda.synchronize = _noop_fn("synchronize")
    cuda.empty_cache = _noop_fn("empty_cache")

    def _manual_seed(seed: int) -> None:
        gen.manual_seed(int(seed))

    def _manual_seed_all(seed: int) -> None:
        gen.manual_seed(int(seed))

    cuda.manual_seed = _manual_seed
    cuda.manual_seed_all = _manual_seed_all
    cuda.seed = _noop_fn("seed")
    cuda.seed_all = _noop_fn("seed_all")
    cuda.initial_seed = lambda: gen.initial_seed()
    cuda.get_rng_state = lambda device=None: gen.get_state()
    cuda.get_rng_state_all = lambda: [gen.get_state()]
    cuda.set_rng_state = lambda state, device=None: gen.set_state(state)
    cuda.set_rng_state_all = lambda states: gen.set_state(states[0])
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved",
                 "memory_cached", "max_memory_cached"):
        setattr(cuda, name, _zero_fn(name))
    cuda.reset_peak_memory_stats = _noop_fn("reset_peak_memory_stats")
    cuda.reset_max_memory_allocated = _noop_fn("reset_max_memory_allocated")
    cuda.memory_stats = lambda *a, **k: {}
    cuda.get_device_name = lambda *a, **k: "cpu"
    cuda.get_device_capability = lambda *a, **k: (0, 0)
    cuda.Event = _Event
    cuda.nvtx = _Nvtx
    for name in ("Long", "Float", "Int", "Half", "BFloat16", "Byte", "Bool", "Double", "Char", "Short"):
        setattr(cuda, f"{name}Tensor", getattr(torch, f"{name}Tensor"))

    def _tensor_cuda(self: Any, *_args: Any, **_kwargs: Any) -> Any:
        return self

    def _module_cuda(self: Any, *_args: Any, **_kwargs: Any) -> Any:
        return self

    torch.Tensor.cuda = _tensor_cuda
    torch.nn.Module.cuda = _module_cuda
    setattr(cuda, MARKER, True)


def patched() -> bool:
    """True when ``torch`` is imported and patched."""
    torch = sys.modules.get("torch")
    return torch is not None and getattr(getattr(torch, "cuda", None), MARKER, False)


def install() -> bool:
    """Prepare this process for CPU runs when :func:`enabled`; returns whether it did.

    Sets ``DS_ACCELERATOR=cpu`` unless set, and patches ``torch`` now if it is already imported
    (otherwise the hook patches it on import).
    """
    if not enabled():
        return False
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "cuda"):
        patch_torch(torch)
    return True


def add_fp32_refresh(optimizer: Any, module: Any) -> bool:
    """Give a plain fp32 optimizer a no-op ``refresh_fp32_params``; returns whether it did.

    Nothing changes when ``optimizer`` is None, already has the method (DeepSpeed's fp16/bf16/ZeRO wrappers,
    which keep separate fp32 master weights and must copy them), or holds a tensor that is not one of
    ``module``'s parameters (a master copy: then a refresh would be needed, and DeepSpeed's error stays).
    """
    if optimizer is None or hasattr(optimizer, "refresh_fp32_params"):
        return False
    own = {id(p) for p in module.parameters()}
    groups = getattr(optimizer, "param_groups", None)
    if not groups or any(id(p) not in own for g in groups for p in g["params"]):
        return False

    def refresh_fp32_params() -> None:
        return None

    optimizer.refresh_fp32_params = refresh_fp32_params
    logger.warning(REFRESH_NOTE)  # a warning: GPT-NeoX's ranks configure no logging, and DeepSpeed is patched here
    return True


def patch_deepspeed_engine(engine_module: ModuleType) -> None:
    """Before ``DeepSpeedEngine._load_checkpoint``, apply :func:`add_fp32_refresh` to the engine's optimizer.

    ``_load_checkpoint`` loads the module's weights in place, then, with ``load_module_only``, calls
    ``self.optimizer.refresh_fp32_params()``. Idempotent.
    """
    cls = engine_module.DeepSpeedEngine
    if getattr(cls, MARKER, False):
        return
    original = cls._load_checkpoint

    @functools.wraps(original)
    def _load_checkpoint(self: Any, *args: Any, **kwargs: Any) -> Any:
        add_fp32_refresh(getattr(self, "optimizer", None), self.module)
        return original(self, *args, **kwargs)

    cls._load_checkpoint = _load_checkpoint
    setattr(cls, MARKER, True)


def apply_patch(name: str, module: ModuleType) -> None:
    """Post-import callback of the hook for ``torch`` and ``deepspeed.runtime.engine``."""
    if name == "torch":
        patch_torch(module)
    elif name == DEEPSPEED_ENGINE:
        patch_deepspeed_engine(module)
