"""Collectives over the run's processes (docs/design.md §4): one rank accessor, one gather, one
reduce and one "did any process" flag, used by every layer above. With one process each is the
identity, so the same code runs under `python`, `accelerate launch` and `torchrun`.

Every function but `process_rank` is a collective: every process must call it, in the same order.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["process_rank", "gather", "gather_list", "reduce_sum", "any_process"]


def process_rank() -> int:
    """This process's rank in an initialised process group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather(accelerator, values: Tensor) -> Tensor:
    """Concatenate a variable-length 1-D tensor over processes, in rank order (exact, no sampling)."""
    if accelerator.num_processes == 1:
        return values
    values = values.to(accelerator.device)
    lengths = accelerator.gather(torch.tensor([values.numel()], device=accelerator.device))
    padded = accelerator.pad_across_processes(values, dim=0)
    rows = accelerator.gather(padded[None]).reshape(len(lengths), -1)
    return torch.cat([row[: int(n)] for row, n in zip(rows, lengths)])


def gather_list(accelerator, items: list) -> list:
    """Every process's list (picklable items), concatenated in rank order: the order `gather` gives tensors."""
    if accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(list(items))


def reduce_sum(accelerator, values: Tensor | float | int) -> Tensor | float:
    """The element-wise sum over processes: a tensor for a tensor, a float for a number (in float64,
    so counts stay exact)."""
    if not isinstance(values, Tensor):
        return float(reduce_sum(accelerator, torch.tensor(float(values), dtype=torch.float64)))
    values = values.to(accelerator.device)
    return accelerator.reduce(values, "sum") if accelerator.num_processes > 1 else values


def any_process(accelerator, flag: bool) -> bool:
    """Whether `flag` is true on any process (also a barrier): one process's signal or failure
    stops them all at the same point."""
    return reduce_sum(accelerator, float(bool(flag))) > 0
