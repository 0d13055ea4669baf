"""The megatron-core CPU compatibility layer.

megatron-core 0.19 assumes CUDA in a handful of places that have nothing to do with the maths:
device lookups, stream synchronisation, the RNG tracker, a few literal ``device="cuda"``
arguments. On a CPU-only machine (our tests and CI) those places are the only thing standing
between megatron-core and a correct gloo run, so we answer each one with a small, named shim.

Rules:
- Shims are applied only when CUDA is unavailable (``apply_cpu_compat`` is a no-op otherwise), so
  nothing changes on a GPU cluster — except ``torch_adam_step_on_load``, which answers a bug of
  megatron's torch-Adam fallback, not of the CPU: ``apply_torch_adam_fixes`` applies it on a GPU
  too when neither TransformerEngine nor Apex provides megatron's fused Adam (found by the GPU
  test of an exact resume, tests/gpu); and ``RESHARDABLE_SAVE_BUCKET_PADDING``, a megatron bug
  of the distributed optimizer's save with several DDP buckets, applied on every device.
- Applying is idempotent, and every shim can be removed again (``remove_cpu_compat``), which lets
  the tests prove that each shim is needed: remove it, watch the megatron-core call it answers
  fail, put it back, watch it pass (tests/platform/test_megatron_cpu_compat.py).
- Each shim names the megatron-core code it answers in its ``answers`` field.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

_CPU = torch.device("cpu")


@dataclass
class Shim:
    """One named patch: each (module path, attribute, make) target is set to ``make(original)``."""

    name: str
    answers: str
    targets: list[tuple[str, str, Callable[[Any], Any]]]
    _originals: dict[tuple[str, str], Any] = field(default_factory=dict)

    @property
    def applied(self) -> bool:
        return bool(self._originals)

    def apply(self) -> None:
        if self.applied:
            return
        # Import every target module before patching any: a module imported after a patch would
        # bind the patched object by name and we would record it as the "original".
        owners = [_resolve(module_path) for module_path, _, _ in self.targets]
        for (module_path, attr, make), owner in zip(self.targets, owners):
            # Take a class attribute from the class dict so a classmethod stays a classmethod.
            in_class = isinstance(owner, type) and attr in vars(owner)
            original = vars(owner)[attr] if in_class else getattr(owner, attr)
            self._originals[(module_path, attr)] = original
            setattr(owner, attr, make(original))

    def remove(self) -> None:
        for (module_path, attr), original in self._originals.items():
            setattr(_resolve(module_path), attr, original)
        self._originals.clear()


def _resolve(path: str) -> Any:
    """'torch.cuda' -> the module; 'pkg.mod:Class' -> the class inside the module."""
    module_path, _, inner = path.partition(":")
    obj = importlib.import_module(module_path)
    for part in filter(None, inner.split(".")):
        obj = getattr(obj, part)
    return obj


# --- the shims' replacement objects -----------------------------------------------------------


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: on CPU every op is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event

    def synchronize(self) -> None:
        pass


def _cpu_rng_tracker_class(cuda_tracker_class: type) -> type:
    """A megatron RNG tracker that keeps CPU generator states instead of CUDA ones.

    Dropout and weight initialisation inside ``get_cuda_rng_tracker().fork()`` then draw from
    per-purpose CPU streams (the tensor-parallel stream differs per TP rank, the data-parallel one
    is shared), exactly the semantics megatron gives the CUDA streams.
    """

    class CpuRNGStatesTracker(cuda_tracker_class):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            generator = torch.Generator(device="cpu")
            generator.manual_seed(seed)
            self.states_[name] = generator.get_state()

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)

    CpuRNGStatesTracker.__name__ = "CpuRNGStatesTracker"
    return CpuRNGStatesTracker


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    """[sq, sq] bool, True above the diagonal (masked), as megatron's but on the CPU."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


class _TorchOnCpu:
    """``torch`` as seen by a megatron module whose code writes ``device="cuda"`` literally.

    Tensor factories get their ``device`` argument rewritten to the CPU; every other attribute is
    torch's own. Set as the module's global ``torch``, it changes nothing but those literals.
    """

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "zeros_like", "ones_like",
                  "empty_like", "full_like", "arange")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._FACTORIES:
            def factory(*args, **kwargs):
                if _is_cuda(kwargs.get("device")):
                    kwargs["device"] = _CPU
                return attr(*args, **kwargs)

            return factory
        return attr


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):  # a bare int is a CUDA ordinal
        return True
    return torch.device(device).type == "cuda"


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _reporting_cuda_type_names(fn):
    """Run ``fn`` with ``Tensor.type()`` (no arguments) answering CUDA type names for CPU tensors,
    for megatron code that dispatches on ``param.type() == 'torch.cuda.FloatTensor'``."""
    original_type = torch.Tensor.type

    def cuda_named_type(self, *args, **kwargs):
        name = original_type(self, *args, **kwargs)
        if args or kwargs:
            return name
        return _CUDA_TYPE_NAMES.get(name, name)

    def wrapper(*args, **kwargs):
        torch.Tensor.type = cuda_named_type
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = original_type

    wrapper.__wrapped__ = fn
    return wrapper


def _reporting_cuda_type_names_classmethod(method):
    return classmethod(_reporting_cuda_type_names(method.__func__))


class _MissingIsNone(dict):
    def __missing__(self, key):
        return None


def _tolerating_missing_state(fn):
    """Wrap ``DistributedOptimizer._set_main_param_and_optimizer_states`` so a state key absent
    from the loaded tensors (torch Adam's per-parameter ``step``) is skipped, as the caller meant."""

    def wrapper(self, model_param, tensors):
        return fn(self, model_param, _MissingIsNone(tensors))

    wrapper.__wrapped__ = fn
    return wrapper


def _unaliasing_adam_steps(fn):
    """Wrap ``DistributedOptimizer.load_state_dict`` so every parameter gets its own ``step``
    tensor: megatron assigns one shared tensor to all of them, and torch Adam increments
    ``state['step']`` in place once per parameter, so a resumed run's bias correction would
    advance by the number of parameters per step."""

    def wrapper(self, state_dict):
        result = fn(self, state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
        return result

    wrapper.__wrapped__ = fn
    return wrapper


def _with_tensor_cuda_as_identity(fn):
    """Run ``fn`` with ``Tensor.cuda()`` returning the tensor itself (CPU only)."""

    def wrapper(*args, **kwargs):
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original

    wrapper.__wrapped__ = fn
    return wrapper


def _constant(value):
    return lambda original: value


SHIMS: list[Shim] = [
    Shim(
        name="current_device_is_cpu",
        answers=(
            "torch.cuda.current_device() used as a tensor device: "
            "models/common/embeddings/rotary_pos_embedding.py RotaryEmbedding.get_emb, "
            "utils.py GlobalMemoryBuffer.get_tensor, tensor_parallel/layers.py and mappings.py "
            "buffers, distributed/param_and_grad_buffer.py, optimizer/distrib_optimizer.py"
        ),
        targets=[("torch.cuda", "current_device", _constant(lambda: _CPU))],
    ),
    Shim(
        name="cuda_sync_is_noop",
        answers=(
            "torch.cuda.synchronize() in pipeline_parallel/p2p_communication.py "
            "(_communicate, after batched isend/irecv) and dist_checkpointing strategies"
        ),
        targets=[("torch.cuda", "synchronize", _constant(lambda device=None: None))],
    ),
    Shim(
        name="cuda_streams_are_null",
        answers=(
            "torch.cuda.current_stream()/Stream/stream() in distributed/param_and_grad_buffer.py "
            "(start_grad_sync, finish_grad_sync) and distributed_data_parallel.py"
        ),
        targets=[
            ("torch.cuda", "current_stream", _constant(lambda device=None: _NullStream())),
            ("torch.cuda", "Stream", _constant(_NullStream)),
            ("torch.cuda", "stream", _constant(lambda stream=None: contextlib.nullcontext())),
        ],
    ),
    Shim(
        name="cpu_rng_tracker",
        answers=(
            "tensor_parallel/random.py CudaRNGStatesTracker.add/fork (torch.cuda.get_rng_state, "
            "torch.cuda.default_generators) used by model_parallel_cuda_manual_seed and "
            "every get_cuda_rng_tracker().fork()"
        ),
        targets=[
            ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker", _cpu_rng_tracker_class)
        ],
    ),
]


SHIMS.append(
    Shim(
        name="no_cuda_rng_state",
        answers=(
            "tensor_parallel/random.py _get_all_rng_states / _set_all_rng_states call "
            "_get_cuda_rng_state / _set_cuda_rng_state (torch.cuda.get_rng_state): "
            "CheckpointFunction saves and restores them around every recomputed forward "
            "(activation recompute: full layers in recompute.py, selective core attention in "
            "transformer/attention.py). On CPU there is no CUDA stream to save: the CPU state "
            "and the tracker's (CPU) states are saved beside it"
        ),
        targets=[
            ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state",
             _constant(lambda device="cuda", clone=False, graph_safe=False:
                       torch.empty(0, dtype=torch.uint8))),
            ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state",
             _constant(lambda new_state, device=-1, graph_safe=False: None)),
        ],
    )
)


SHIMS.append(
    Shim(
        name="cpu_causal_mask",
        answers=(
            'transformer/utils.py get_default_causal_mask builds its mask with device="cuda"; '
            "fusions/fused_softmax.py FusedScaleMaskSoftmax.forward_torch_softmax imports it by name"
        ),
        targets=[
            ("megatron.core.transformer.utils", "get_default_causal_mask", _constant(_cpu_causal_mask)),
            ("megatron.core.fusions.fused_softmax", "get_default_causal_mask", _constant(_cpu_causal_mask)),
        ],
    )
)


SHIMS.append(
    Shim(
        name="cuda_literal_devices",
        answers=(
            'literal device="cuda" tensor factories: optimizer/optimizer.py (FP32Optimizer._scale, '
            "MixedPrecisionOptimizer found_inf, _get_model_parallel_group flag), "
            "optimizer/clip_grads.py (get_grad_norm_fp32, clip_grad_by_total_norm_fp32, "
            "count_zeros_fp32), pipeline_parallel/schedules.py (total_num_tokens), "
            "dist_checkpointing/strategies/state_dict_saver.py, utils.py (l2 norms)"
        ),
        targets=[
            (module, "torch", _constant(_TorchOnCpu()))
            for module in (
                "megatron.core.optimizer.optimizer",
                "megatron.core.optimizer.clip_grads",
                "megatron.core.pipeline_parallel.schedules",
                "megatron.core.dist_checkpointing.strategies.state_dict_saver",
                "megatron.core.utils",
            )
        ],
    )
)
SHIMS.append(
    Shim(
        name="cuda_type_name_checks",
        answers=(
            "param.type() == 'torch.cuda.FloatTensor' checks: optimizer/clip_grads.py "
            "clip_grad_by_total_norm_fp32 (an assert; optimizer/optimizer.py imports it by name) "
            "and optimizer/distrib_optimizer.py DistributedOptimizer."
            "_build_model_and_main_param_groups (raises TypeError for CPU params)"
        ),
        targets=[
            ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32",
             _reporting_cuda_type_names),
            ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32",
             _reporting_cuda_type_names),
            ("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer",
             "_build_model_and_main_param_groups", _reporting_cuda_type_names_classmethod),
        ],
    )
)


SHIMS.append(
    Shim(
        name="torch_adam_step_on_load",
        answers=(
            "optimizer/distrib_optimizer.py, loading with torch Adam (no Apex/TransformerEngine, "
            "so always on CPU): load_parameter_state_from_fully_reshardable skips 'step' when "
            "collecting the loaded tensors, then _set_main_param_and_optimizer_states indexes "
            "every tensor of the live state, 'step' included (KeyError); and load_state_dict "
            "('Extract step, for non-Apex/TE support') gives all parameters one shared step "
            "tensor, which torch Adam then increments once per parameter"
        ),
        targets=[
            ("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer",
             "_set_main_param_and_optimizer_states", _tolerating_missing_state),
            ("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer",
             "load_state_dict", _unaliasing_adam_steps),
        ],
    )
)


SHIMS.append(
    Shim(
        name="tied_embedding_sync_on_cpu",
        answers=(
            "models/common/language_module/language_module.py "
            "LanguageModule.setup_embeddings_and_output_layer: with tied embeddings and PP > 1 "
            "it moves the shared weight with weight.data.cuda() before all-reducing it over the "
            "embedding group"
        ),
        targets=[
            ("megatron.core.models.common.language_module.language_module:LanguageModule",
             "setup_embeddings_and_output_layer", _with_tensor_cuda_as_identity),
        ],
    )
)


def _pad_between_buckets(optimizer, state: dict) -> None:
    """Lay each flat world tensor of ``get_parameter_state_dp_zero`` (buckets back to back, their
    padding dropped) out as the buffer is (zeros in the padding), in place."""
    for gbuf_idx, by_dtype in state.items():
        if not isinstance(gbuf_idx, int):  # "buckets_coalesced"
            continue
        buffer = optimizer.buffers[gbuf_idx]
        for tensors in by_dtype.values():
            for key, flat in tensors.items():
                if not torch.is_tensor(flat) or flat.numel() != buffer.numel_unpadded:
                    continue
                padded, start = flat.new_zeros(buffer.numel), 0
                for bucket in buffer.buckets:
                    end = start + bucket.numel_unpadded
                    padded[bucket.offset:bucket.offset + bucket.numel_unpadded] = flat[start:end]
                    start = end
                tensors[key] = padded


def _with_padded_world_tensors(original):
    def sharded_param_state_fully_reshardable(self, *args, **kwargs):
        gather = self.get_parameter_state_dp_zero

        def gather_padded(*gather_args, **gather_kwargs):
            state = gather(*gather_args, **gather_kwargs)
            if state is not None:
                _pad_between_buckets(self, state)
            return state

        self.get_parameter_state_dp_zero = gather_padded  # for this call only
        try:
            return original(self, *args, **kwargs)
        finally:
            del self.get_parameter_state_dp_zero

    return sharded_param_state_fully_reshardable


# Not a CPU shim (so not in SHIMS): a megatron-core bug on any device, applied by
# ``training.optim.build_optimizer`` (found by tests/training/test_overlap_features.py).
RESHARDABLE_SAVE_BUCKET_PADDING = Shim(
    name="reshardable_save_bucket_padding",
    answers=(
        "optimizer/distrib_optimizer.py sharded_param_state_fully_reshardable slices the world "
        "tensors of get_parameter_state_dp_zero at param_index_map's buffer offsets, which count "
        "the padding between buckets that get_parameter_state_dp_zero drops ('param range exceeds "
        "unpadded buffer', its TODO issue #504): with more than one bucket (overlap_grad_reduce, "
        "bucket_size) every parameter after the first padded bucket saved another's Adam state"
    ),
    targets=[("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer",
              "sharded_param_state_fully_reshardable", _with_padded_world_tensors)],
)


def _shims_by_name(names) -> list[Shim]:
    known = {shim.name: shim for shim in SHIMS}
    unknown = set(names) - set(known)
    if unknown:
        raise ValueError(f"unknown CPU compat shims {sorted(unknown)}; known: {sorted(known)}")
    return [known[n] for n in names]


def apply_cpu_compat(skip: tuple[str, ...] = (), force: bool = False) -> list[str]:
    """Apply every shim (except ``skip``) when CUDA is unavailable. Returns the applied names.

    ``force`` applies them even with CUDA present (tests only).
    """
    if torch.cuda.is_available() and not force:
        return []
    _shims_by_name(skip)  # validate names
    applied = []
    for shim in SHIMS:
        if shim.name in skip:
            continue
        shim.apply()
        applied.append(shim.name)
    return applied


def apply_torch_adam_fixes() -> list[str]:
    """Apply ``torch_adam_step_on_load`` where megatron's optimizer falls back to torch's Adam
    (no TransformerEngine / Apex: always on CPU, and on GPUs without them). Returns the names."""
    from megatron.core import optimizer

    if not getattr(optimizer, "USING_PYTORCH_OPTIMIZER", False):
        return []
    (shim,) = _shims_by_name(["torch_adam_step_on_load"])
    shim.apply()
    return [shim.name]


def remove_cpu_compat(names: tuple[str, ...] | None = None) -> None:
    """Undo shims (all of them by default)."""
    for shim in _shims_by_name(names) if names is not None else SHIMS:
        shim.remove()


@contextlib.contextmanager
def without_shim(name: str):
    """Temporarily remove one shim (tests use it to show the shim is needed)."""
    (shim,) = _shims_by_name([name])
    was_applied = shim.applied
    shim.remove()
    try:
        yield
    finally:
        if was_applied:
            shim.apply()
