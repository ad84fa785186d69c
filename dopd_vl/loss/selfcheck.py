"""The Triton backend checks itself before a run trusts it (docs/design.md §2).

At the first use of `loss_backend: triton` on a device, one chunk of random hidden states, one row
per route of the objective, goes through both backends with the run's real output embeddings (so
the real vocabulary, hidden sizes, dtype and device): the loss, the per-token losses and the
gradient with respect to the hidden states must agree within the dtype's tolerance. The trainer
falls back to the torch backend when they do not (or when the kernels raise), with one warning
naming the figures; an explicit `loss_backend: triton` raises instead.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from dopd_vl.errors import BackendCheckError
from dopd_vl.loss.chunked import TargetStates, chunked_objective_loss

__all__ = ["BackendCheck", "check_triton_backend", "checked_triton_backend", "TOLERANCE"]

logger = logging.getLogger(__name__)

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
"""Largest relative difference accepted between the backends, by the output embedding's dtype:
both compute in fp32 (float64 kept); half-precision heads differ in where they round."""


@dataclass
class BackendCheck:
    passed: bool
    max_rel_error: float | None  # over the loss, per-token losses and hidden-state gradient
    tolerance: float
    rows: int  # one per route
    error: str | None = None  # the exception the kernels raised, if any

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.error:
            return f"the Triton kernels raised {self.error}"
        return (
            f"the Triton kernels differ from the torch path by {self.max_rel_error:.3g} (relative; tolerance "
            f"{self.tolerance:g}) on {self.rows} rows"
        )


def check_triton_backend(
    objective, student_head: Tensor, view_heads: dict[str, Tensor], vocab_size: int, seed: int = 0
) -> BackendCheck:
    """Compare the kernel path with the torch path on one random row per route of `objective`.

    `student_head` / `view_heads[view]` are the output embeddings of the student and of the model
    that scores each view the routes name (on the run's device, in the run's dtype).
    """
    routes = [r for r, spec in enumerate(objective.routes) if spec is not None]
    views = sorted({v for r in routes for v in objective.routes[r].views})
    device, dtype = student_head.device, student_head.dtype
    generator = torch.Generator().manual_seed(seed)

    def hidden_states(n: int, head: Tensor) -> Tensor:
        """Random states scaled so that their logits spread like a trained model's (std ~2), not a
        near-uniform distribution whose tiny divergences rounding would swamp."""
        h = torch.randn(n, head.shape[1], generator=generator, dtype=torch.float64).to(
            device=head.device, dtype=head.dtype
        )
        with torch.no_grad():
            spread = (h @ head[:vocab_size].T).float().std(dim=-1).mean().clamp_min(1e-6)
        return (h.float() * (2.0 / spread)).to(head.dtype)

    n = len(routes)
    route = torch.tensor(routes, dtype=torch.long, device=device)
    ids = torch.randint(0, vocab_size, (n,), generator=generator).to(device)
    weight = torch.full((n,), 1.0 / max(n, 1), dtype=torch.float64, device=device)
    targets = {
        v: TargetStates(
            hidden_states(n, view_heads[v]),
            view_heads[v].detach(),
            -torch.rand(n, generator=generator, dtype=torch.float64).to(device) * 5,
        )
        for v in views
    }
    hidden = hidden_states(n, student_head)
    results = {}
    try:
        for backend in ("torch", "triton"):
            h = hidden.clone().requires_grad_()
            out = chunked_objective_loss(
                objective,
                h,
                student_head.detach(),
                ids,
                route,
                weight,
                targets,
                vocab_size,
                chunk_size=max(n, 1),
                backend=backend,
            )
            (grad,) = torch.autograd.grad(out.loss, h)
            results[backend] = (out.loss.detach().double(), out.token_loss.double(), grad.double())
    except Exception as err:  # noqa: BLE001 - any failure of the kernels means: do not use them
        return BackendCheck(False, None, TOLERANCE.get(dtype, 1e-4), n, f"{type(err).__name__}: {err}"[:500])
    error = max(_rel(a, b) for a, b in zip(results["triton"], results["torch"]))
    tolerance = TOLERANCE.get(dtype, 1e-4)
    return BackendCheck(bool(error <= tolerance), error, tolerance, n)


def checked_triton_backend(
    requested: str,
    objective,
    student_head: Tensor,
    view_heads: dict[str, Tensor],
    vocab_size: int,
    seed: int = 0,
    any_failed=lambda failed: failed,
) -> tuple[str, BackendCheck]:
    """(the backend to use, the check): `triton` when the kernels pass; otherwise `torch` with one
    warning for `requested="auto"`, a BackendCheckError for an explicit `triton`. `any_failed`
    turns this process's verdict into all processes' (the trainer reduces it)."""
    check = check_triton_backend(objective, student_head, view_heads, vocab_size, seed)
    if not any_failed(not check.passed):
        logger.info("loss_backend %s: the Triton kernels passed their self-check (%s)", requested, check.to_dict())
        return "triton", check
    if requested == "triton":
        raise BackendCheckError(
            f"loss_backend triton: {check.describe()}; set loss_backend: torch (or auto, which falls back to it)"
        )
    logger.warning("loss_backend auto: %s; this run uses the torch backend", check.describe())
    return "torch", check


def _rel(value: Tensor, reference: Tensor) -> float:
    """Largest difference relative to the reference's largest magnitude; inf if anything is not finite."""
    if not (torch.isfinite(value).all() and torch.isfinite(reference).all()):
        return float("inf")
    scale = reference.abs().max().clamp_min(1e-12)
    return float((value - reference).abs().max() / scale)
