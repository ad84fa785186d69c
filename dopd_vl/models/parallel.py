"""Sharded models with PyTorch FSDP2 (`parallel: fsdp`, docs/design.md §4.6).

`shard_model` applies `fully_shard` to every transformer block (the classes a model lists in
`_no_split_modules`: Qwen3's decoder layers; Qwen3-VL's text layers and vision blocks) and then to a
`ModelCall` wrapper around the model, whose unit holds the rest:
the embeddings, the final norm, the output embedding, the vision merger. Every use of a sharded model
runs inside that wrapper's forward (`call_model`), so FSDP's root hooks run around it:

- the routed loss reads the output embedding once per micro-batch: FSDP gathers the root unit in
  the forward's pre-hook, the chunk loop reads the gathered weight, its gradient lands on the
  unsharded parameter and FSDP reduce-scatters it after backward (a tied embedding is one parameter
  of that unit, so both uses add into one gradient);
- scoring a frozen model gathers its root unit the same way; a root is not resharded after forward,
  so the gathered head stays for the loss's chunks (which recompute target logits from it) until
  `release` at the end of the step;
- generation gathers every unit once for the whole rollout (`generate_with_full_weights`): per-layer
  gathering would all-gather every layer again for every generated token. The cost is the whole
  model in the compute dtype on each device while sampling, what DDP holds all the time.
The engine is PyTorch's; this module only decides what is a unit and when it is gathered.

The collectives over processes live in dopd_vl/distributed.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dopd_vl.errors import ModelError

__all__ = [
    "ModelCall",
    "call_model",
    "decoder_blocks",
    "shard_model",
    "generate_with_full_weights",
    "release",
    "is_sharded",
    "full_tensor",
    "full_state_dict",
]


class ModelCall(nn.Module):
    """A model behind one forward: `wrapper(fn, *args)` returns `fn(model, *args)`. Under FSDP the
    wrapper is the root unit, so its hooks (gather the root unit, lazy init) run around `fn`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)


def call_model(model: nn.Module, fn: Callable, *args: Any) -> Any:
    """`fn(model, *args)`, through the wrapper's forward when `model` is a (sharded) ModelCall."""
    return model(fn, *args) if isinstance(model, ModelCall) else fn(model, *args)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded DTensor gathered from every process (a collective), else itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def is_sharded(model: nn.Module | None) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (its `_no_split_modules` classes), each one FSDP unit."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ModelError(
            f"{type(model).__name__} names no transformer block classes in _no_split_modules; parallel: fsdp cannot "
            f"shard it per block"
        )
    return blocks


def shard_model(wrapper: ModelCall, dtype: torch.dtype, device: torch.device) -> ModelCall:
    """fully_shard every block, then the wrapper (the root unit), over all processes. Gradients
    are reduced in float32 when the weights are bfloat16 / float16 (as DDP's all-reduce is not)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(
        param_dtype=dtype, reduce_dtype=torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    )
    for block in decoder_blocks(wrapper.model):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(wrapper, mesh=mesh, mp_policy=policy)
    return wrapper


def generate_with_full_weights(wrapper: ModelCall, fn: Callable, *args: Any) -> Any:
    """`fn(model, *args)` (a rollout) with every unit gathered once and kept whole until it returns."""
    from torch.distributed.fsdp import FSDPModule

    def whole(model: nn.Module, *inner: Any) -> Any:
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:  # inside the root's forward: FSDP is initialised, the root unit gathered
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            return fn(model, *inner)
        finally:
            for unit in units:
                unit.set_reshard_after_forward(True, recurse=False)

    try:
        return wrapper(whole, *args)
    finally:
        release(wrapper)


def release(wrapper: nn.Module | None) -> None:
    """Reshard every unit of a sharded model and clear FSDP's per-iteration bookkeeping (a frozen
    model never runs backward, which is where FSDP would clear it)."""
    if is_sharded(wrapper):
        wrapper.reset_iter_state()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model, on the CPU of the main process (a collective: every
    process calls it; the others get an empty dict, so no process holds two copies), without the
    output embedding when it is tied to the input embedding."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if (
        head is not None and head.weight is embedding.weight
    ):  # tied: gathered as two tensors, saved once (as save_pretrained does)
        state.pop(next(f"{name}.weight" for name, module in model.named_modules() if module is head), None)
    return state
