"""The one place where Megatron-core's CUDA-only spots are bridged so it runs on CPU over gloo.

Applied only when `torch.cuda.is_available()` is False (a GPU machine runs Megatron as is),
idempotent, and safe to call before or after `parallel_state.initialize_model_parallel`.

What is bridged, how, and what is not: docs/design.md, "Megatron on CPU".
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types

import torch

log = logging.getLogger(__name__)

# Megatron modules whose `torch` global is replaced by the CPU view, and why each needs it.
_TORCH_VIEW_MODULES: dict[str, str] = {
    "megatron.core.utils": "GlobalMemoryBuffer.get_tensor allocates on current_device()",
    "megatron.core.tensor_parallel.mappings": "TP all-gather/reduce-scatter outputs on current_device()",
    "megatron.core.tensor_parallel.layers": "weight-grad buffers / vocab init on current_device()",
    "megatron.core.tensor_parallel.utils": "split/gather 1-d chunk buffers on current_device()",
    "megatron.core.tensor_parallel.random": "CUDA RNG get/set/seed calls act on the CPU generator",
    "megatron.core.transformer.utils": "get_default_causal_mask builds its mask with device='cuda'",
    "megatron.core.transformer.dot_product_attention": "softmax offset on current_device()",
    "megatron.core.transformer.attention": "inference KV cache on current_device()",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "RoPE moves inv_freq to current_device()",
    "megatron.core.models.gpt.gpt_model": "inference sequence offsets on current_device()",
    "megatron.core.pipeline_parallel.p2p_communication": "recv buffers on current_device(); cuda.synchronize()",
    "megatron.core.pipeline_parallel.schedules": "total_num_tokens created with device='cuda'",
    "megatron.core.distributed.param_and_grad_buffer": "DDP grad / param buffers on current_device()",
    "megatron.core.distributed.distributed_data_parallel": "DDP buffer (re)allocation on current_device()",
    "megatron.core.optimizer.optimizer": "found-inf / unit-scale tensors created with device='cuda'",
    "megatron.core.optimizer.distrib_optimizer": "param-state gather buffers on current_device()",
    "megatron.core.optimizer.clip_grads": "grad-norm / overflow tensors created with device='cuda'",
    "megatron.core.optimizer.grad_scaler": "loss-scale tensors created with device='cuda'",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "preload_tensors: torch.cuda.synchronize()",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "status flags on current_device() / 'cuda'",
}

_CPU = torch.device("cpu")
_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
              "empty_like", "zeros_like", "ones_like", "full_like")
_applied = False


def _cpu_device(device):
    """Map any CUDA device spec (str, torch.device, int index) to the CPU; leave others alone."""
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _factory(fn):
    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinning needs a CUDA context
        return fn(*args, **kwargs)

    wrapped.__name__ = getattr(fn, "__name__", "factory")
    wrapped.__doc__ = fn.__doc__
    return wrapped


class _CpuCudaView(types.ModuleType):
    """`torch.cuda` as the bridged Megatron modules see it on a machine without CUDA."""

    def __init__(self):
        super().__init__("torch.cuda", "megapuzzle CPU view of torch.cuda")

    def __getattr__(self, name):  # everything not bridged below is the real torch.cuda
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        # Used only as `device=` / `.to(...)` argument: the CPU is "the current device" here.
        return _CPU

    @staticmethod
    def synchronize(device=None):
        # CPU ops (and gloo's waited-on requests) are already synchronous.
        return None

    # The CUDA default generator's role (dropout outside fork(), seeded by
    # model_parallel_cuda_manual_seed) is played by the CPU generator.
    @staticmethod
    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state, device="cuda"):
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed):
        torch.manual_seed(seed)


class _CpuTorchView(types.ModuleType):
    """`torch` as the bridged Megatron modules see it: real torch, but CUDA devices map to CPU."""

    def __init__(self):
        super().__init__("torch", "megapuzzle CPU view of torch")
        self.cuda = _CpuCudaView()
        for name in _FACTORIES:
            setattr(self, name, _factory(getattr(torch, name)))

    def __getattr__(self, name):  # looked up live, so later patches of torch stay visible
        return getattr(torch, name)


_TORCH_VIEW = _CpuTorchView()


# ----------------------------------------------------------------------------- RNG tracker

def _make_cpu_rng_tracker_class(base):
    class CpuRNGStatesTracker(base):
        """Megatron's CudaRNGStatesTracker with its named states on the CPU generator.

        Same bookkeeping as the base class (distinct seeds, named states, fork() restores the
        state it found), so tensor-parallel dropout draws different masks per TP rank and the
        same masks across DP replicas, exactly as on GPU. Unlike the base class, fork() does not
        warn that "CPU RNG state changed within GPU RNG context": on CPU that is the point.
        """

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def _bridge_rng(random_mod) -> None:
    base = random_mod.CudaRNGStatesTracker
    if getattr(base, "_megapuzzle_cpu", False):
        return
    cls = _make_cpu_rng_tracker_class(base)
    cls._megapuzzle_cpu = True
    # initialize_rng_tracker() instantiates the module global `CudaRNGStatesTracker`; the
    # subclass keeps isinstance checks elsewhere (get_all_rng_states) true.
    random_mod.CudaRNGStatesTracker = cls
    # Activation recompute (CheckpointFunction) saves/restores "the CUDA state" through these.
    random_mod._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    random_mod._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # A tracker built before the bridge (plain CUDA one) would fail on first use: rebuild lazily.
    tracker = getattr(random_mod, "_CUDA_RNG_STATE_TRACKER", None)
    if tracker is not None and not isinstance(tracker, cls):
        random_mod._CUDA_RNG_STATE_TRACKER = None
        random_mod._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


# ----------------------------------------------------------------------------- tied embeddings

def _bridge_tied_embedding_setup() -> None:
    from megatron.core.models.common.language_module import language_module as lm

    orig = lm.LanguageModule.setup_embeddings_and_output_layer
    if getattr(orig, "_megapuzzle_cpu", False):
        return

    def setup_embeddings_and_output_layer(self, *args, **kwargs):
        # With tied embeddings and PP > 1 the original does `weight.data = weight.data.cuda()`
        # before all-reducing the first/last-stage copies. Tensor.cuda has no module-level
        # handle to redirect, so for the duration of this one call only it returns the tensor.
        saved = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t
        try:
            return orig(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = saved

    setup_embeddings_and_output_layer._megapuzzle_cpu = True
    setup_embeddings_and_output_layer.__wrapped__ = orig
    lm.LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


# ----------------------------------------------------------------------------- type() checks

_TENSOR_TYPE = torch.Tensor.type


def _cuda_type_name(t, *args, **kwargs):
    name = _TENSOR_TYPE(t, *args, **kwargs)
    if not args and not kwargs and name.startswith("torch.") and not name.startswith("torch.cuda."):
        return "torch.cuda." + name[len("torch."):]  # 'torch.BFloat16Tensor' -> 'torch.cuda.BFloat16Tensor'
    return name


def _with_cuda_type_names(fn):
    """`fn` with `Tensor.type()` naming CPU tensors as CUDA ones for the duration of the call."""
    if getattr(fn, "_megapuzzle_cpu", False):
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        saved = torch.Tensor.type
        torch.Tensor.type = _cuda_type_name
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = saved

    wrapped._megapuzzle_cpu = True
    return wrapped


def _bridge_optimizer_type_checks() -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    for cls in (optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        cls.__init__ = _with_cuda_type_names(cls.__init__)
    clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = clip
    optimizer.clip_grad_by_total_norm_fp32 = clip  # imported by name into the optimizer module


# ----------------------------------------------------------------------------- entry point

def apply_cpu_compat(force: bool = False) -> bool:
    """Bridge Megatron-core's CUDA-only spots when there is no CUDA. Returns True if bridged.

    Idempotent. `force=True` applies the bridges even with CUDA present (tests only).
    """
    global _applied
    if _applied:
        return True
    if torch.cuda.is_available() and not force:
        return False
    for name in _TORCH_VIEW_MODULES:
        mod = importlib.import_module(name)
        if getattr(mod, "torch", None) is not torch and not isinstance(mod.torch, _CpuTorchView):
            raise RuntimeError(f"cpu_compat: {name}.torch is not the torch module; Megatron-core "
                               f"changed, review megapuzzle/runtime/cpu_compat.py")
        mod.torch = _TORCH_VIEW
    _bridge_rng(importlib.import_module("megatron.core.tensor_parallel.random"))
    _bridge_tied_embedding_setup()
    _bridge_optimizer_type_checks()
    _applied = True
    log.debug("megatron-core CPU bridges applied to %d modules", len(_TORCH_VIEW_MODULES))
    return True


def cpu_compat_applied() -> bool:
    return _applied
