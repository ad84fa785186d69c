"""The chunked path of the routed loss, what the trainer runs (docs/design.md §2).

It takes final hidden states and output embeddings, works on token chunks, never holds
[tokens, vocab] for more than one chunk, and computes the student gradient inside the forward
(Liger / TRL style) so backward is a scale. Each chunk goes through one of two backends: `torch`
(autograd per chunk, every device) or `triton` (the fused kernels beside this module, kernels.py).
Scoring keeps per view only what this path needs (`TargetStates`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from dopd_vl.loss.route_terms import route_divergence
from dopd_vl.method.divergences import entropy, upcast
from dopd_vl.method.objectives import Objective
from dopd_vl.method.plan import shifted_target

__all__ = [
    "TargetStates",
    "ChunkedLossOutput",
    "chunked_objective_loss",
    "chunked_token_logprobs",
    "target_states",
    "chunk_logits",
    "auto_chunk_size",
]


@dataclass
class TargetStates:
    """What scoring keeps of one target view, over the valid tokens (flattened, [N, ...]).

    Final hidden states (not logits) plus the sampled token's log-prob: O(N*H) memory, and target
    logits are recomputed chunk by chunk only for tokens routed to this view.
    """

    hidden: Tensor  # [N, H], no grad
    head_weight: Tensor  # [V_rows, H] output embedding of the model that produced `hidden`
    token_logprob: (
        Tensor | None
    )  # [N] log-prob of the sampled token (routing signal, sampled support); None where nothing reads it
    entropy: Tensor | None = None  # [N] entropy of the view's distribution (metrics only)


@dataclass
class ChunkedLossOutput:
    loss: Tensor  # scalar; gradient to the student's hidden states and output embedding
    token_loss: Tensor  # [N] route-weighted divergence per token (detached)
    student_entropy: Tensor  # [N] entropy of the student's distribution per token (detached)
    student_logprob: Tensor | None = None  # [N] log p of each sampled token, when asked (engine health metric)


def auto_chunk_size(
    device: torch.device, vocab_size: int, free_bytes: int | None = None, backend: str = "torch"
) -> int:
    """Tokens per chunk of the routed loss for a device (`loss_chunk_size: auto`).

    CPU: 64 (measured fastest there). CUDA: big chunks keep the GPU busy (at V = 151,936 on an H200
    a chunk of 2048 ran 2.7-4.5x faster than 64 in bf16), so the largest multiple of 64 up to 2048
    whose intermediates fit min(4 GiB, 10% of the free memory): ~7 fp32 [chunk, V] buffers for the
    torch backend, ~12 bytes per vocabulary entry for the Triton kernels (bf16 logits of the student
    and a target, a bf16 copy for the top-K tail, the fp32 gradient).

    Args:
        device: where the loss runs.
        vocab_size: the tokenizer's vocabulary.
        free_bytes: free device memory; None: asked of the device.
        backend: `torch` or `triton`.

    Returns:
        A multiple of 64 in [64, 2048] on CUDA; 64 elsewhere.
    """
    if device.type != "cuda":
        return 64
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    budget = min(4 * 2**30, free_bytes // 10)
    per_token = (7 * 4 if backend == "torch" else 12) * vocab_size
    return int(max(64, min(2048, (budget // per_token) // 64 * 64)))


def chunk_logits(hidden: Tensor, head_weight: Tensor, vocab_size: int) -> Tensor:
    """Logits of a chunk over the tokenizer's vocabulary: matmul in the weight's dtype, then fp32.

    Args:
        hidden: [n, H] hidden states.
        head_weight: [V_rows, H] output embedding (rows beyond `vocab_size` are lm-head padding).
        vocab_size: the tokenizer's vocabulary.

    Returns:
        [n, vocab_size] logits, upcast to float32 (float64 stays float64).
    """
    return upcast(hidden.to(head_weight.dtype) @ head_weight[:vocab_size].T)


@torch.no_grad()
def chunked_token_logprobs(
    hidden: Tensor,
    head_weight: Tensor,
    token_ids: Tensor,
    vocab_size: int,
    chunk_size: int = 256,
    with_entropy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Sampled-token log-probs (and entropies) from hidden states, one [chunk, V] block at a time.
    Without the entropy, log p(token) = z_token - logsumexp(z): no [chunk, V] log-softmax.

    Args:
        hidden: [N, H] final hidden states.
        head_weight: [V_rows, H] the output embedding.
        token_ids: [N] the tokens to score.
        vocab_size: the tokenizer's vocabulary.
        chunk_size: tokens per block.
        with_entropy: also compute each token's entropy.

    Returns:
        ([N] log p(token), [N] entropy or None): float32, float64 for float64 hidden states.
    """
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logprob = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
    ent = torch.empty_like(logprob) if with_entropy else None
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        logits = chunk_logits(hidden[sl], head_weight, vocab_size)
        if with_entropy:
            logp = logits.log_softmax(-1)
            logprob[sl] = logp.gather(-1, token_ids[sl, None]).squeeze(-1)
            ent[sl] = entropy(logp)
        else:
            logprob[sl] = logits.gather(-1, token_ids[sl, None]).squeeze(-1) - logits.logsumexp(-1)
    return logprob, ent


def target_states(
    hidden: Tensor,
    head_weight: Tensor,
    token_ids: Tensor,
    vocab_size: int,
    chunk_size: int = 256,
    with_entropy: bool = True,
    with_logprob: bool = True,
) -> TargetStates:
    """Scoring output of one view over N valid tokens: hidden states and, where something reads them,
    sampled-token log-probs and entropies. Without either, no pass over the vocabulary happens here
    at all: the loss recomputes the logits it needs per chunk.

    Args:
        hidden: [N, H] the view's final hidden states (no gradient).
        head_weight: [V_rows, H] the output embedding of the model that produced them.
        token_ids: [N] the sampled tokens.
        vocab_size: the tokenizer's vocabulary.
        chunk_size: tokens per block of the log-prob pass.
        with_entropy: compute the entropies (EOPD's split, metrics).
        with_logprob: compute the sampled-token log-probs (routing signals, sampled routes).

    Returns:
        TargetStates of the view.
    """
    hidden = hidden.detach()
    if not (with_logprob or with_entropy):
        return TargetStates(hidden, head_weight.detach(), None, None)
    logprob, ent = chunked_token_logprobs(hidden, head_weight.detach(), token_ids, vocab_size, chunk_size, with_entropy)
    return TargetStates(hidden, head_weight.detach(), logprob, ent)


class _ChunkedRoutedLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student_hidden,
        head_weight,
        objective,
        response_ids,
        route,
        token_weight,
        targets,
        vocab_size,
        chunk_size,
        backend,
    ):
        c = objective.config
        n_tokens = student_hidden.shape[0]
        want_grad_hidden, want_grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(student_hidden) if want_grad_hidden else None
        # The output embedding's gradient: fp32 for the torch backend; the head's own dtype for the
        # kernels (each chunk's matmul accumulates in fp32; no fp32 [V, H] buffer beside the weight).
        grad_weight_dtype = head_weight.dtype if backend == "triton" else upcast(head_weight[:0]).dtype
        grad_weight = (
            torch.zeros(head_weight.shape, dtype=grad_weight_dtype, device=head_weight.device)
            if want_grad_weight
            else None
        )
        token_loss = torch.zeros(
            n_tokens, dtype=upcast(torch.empty(0, dtype=student_hidden.dtype)).dtype, device=student_hidden.device
        )
        student_entropy = torch.zeros_like(token_loss)
        total = token_loss.new_zeros(())
        for start in range(0, n_tokens, chunk_size):
            sl = slice(start, min(start + chunk_size, n_tokens))
            route_c, ids_c = route[sl], response_ids[sl]
            if backend == "triton":  # fused kernels (kernels.py): same loss and gradient, fewer buffers
                grad_logits, chunk_loss, chunk_entropy = _triton_chunk(
                    objective,
                    student_hidden[sl],
                    head_weight,
                    route_c,
                    ids_c,
                    token_weight[sl],
                    targets,
                    sl,
                    vocab_size,
                )
                weighted = (chunk_loss.to(token_loss.dtype) * token_weight[sl].to(token_loss.dtype)).sum()
                token_loss[sl], student_entropy[sl] = (
                    chunk_loss.to(token_loss.dtype),
                    chunk_entropy.to(student_entropy.dtype),
                )
                total = total + weighted
                _add_chunk_gradient(
                    grad_logits, head_weight, student_hidden[sl], vocab_size, sl, grad_hidden, grad_weight
                )
                continue
            with torch.enable_grad():
                logits = chunk_logits(student_hidden[sl].detach(), head_weight.detach(), vocab_size).requires_grad_()
                student_logp = logits.log_softmax(-1)
                chunk_loss = logits.new_zeros(route_c.shape)
                for r, spec in enumerate(objective.routes):
                    sel = (route_c == r).nonzero().squeeze(-1)
                    if spec is None or sel.numel() == 0:
                        continue
                    # A route that holds the whole chunk (single-route objectives) needs no [chunk, V] row copies.
                    rows = slice(None) if sel.numel() == route_c.numel() else sel
                    view = targets[spec.target]
                    target_logp = None
                    if spec.support != "sampled":  # full-vocabulary target work only where a route needs it
                        with torch.no_grad():
                            target_logp = chunk_logits(view.hidden[sl][rows], view.head_weight, vocab_size).log_softmax(
                                -1
                            )
                    token_logprob = (
                        {v: targets[v].token_logprob[sl][rows] for v in spec.views} if spec.support == "sampled" else {}
                    )
                    d = route_divergence(spec, c, student_logp[rows], target_logp, ids_c[rows], token_logprob)
                    chunk_loss = d if isinstance(rows, slice) else chunk_loss.index_put((sel,), d)
                weighted = (chunk_loss * token_weight[sl].to(chunk_loss.dtype)).sum()
                grad_logits = None  # stays None when every token of the chunk is on a switched-off route
                if (want_grad_hidden or want_grad_weight) and weighted.requires_grad:
                    (grad_logits,) = torch.autograd.grad(weighted, logits)
            token_loss[sl] = chunk_loss.detach()
            student_entropy[sl] = entropy(student_logp.detach())
            total = total + weighted.detach()
            if grad_logits is not None:
                _add_chunk_gradient(
                    grad_logits, head_weight, student_hidden[sl], vocab_size, sl, grad_hidden, grad_weight
                )
        ctx.weight_dtype = head_weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(token_loss, student_entropy)
        return total, token_loss, student_entropy

    @staticmethod
    def backward(ctx, grad_total, _grad_token_loss, _grad_entropy):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_total.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_total).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None, None, None, None, None


def _add_chunk_gradient(
    grad_logits: Tensor,
    head_weight: Tensor,
    hidden: Tensor,
    vocab_size: int,
    sl: slice,
    grad_hidden: Tensor | None,
    grad_weight: Tensor | None,
) -> None:
    """Chain a chunk's logit gradient through logits = hidden @ W^T into the hidden states and W."""
    grad_logits = grad_logits.to(head_weight.dtype)
    if grad_hidden is not None:
        grad_hidden[sl] = (grad_logits @ head_weight[:vocab_size]).to(grad_hidden.dtype)
    if grad_weight is not None:
        if grad_weight.dtype == head_weight.dtype:  # accumulate in place: no [V, H] temporary
            grad_weight[:vocab_size].addmm_(grad_logits.T, hidden.to(head_weight.dtype))
        else:
            grad_weight[:vocab_size] += (grad_logits.T @ hidden.to(head_weight.dtype)).to(grad_weight.dtype)


def _triton_chunk(objective, hidden, head_weight, route_c, ids_c, token_weight_c, targets, sl, vocab_size):
    """One chunk through the fused kernels: logits stay in the head's dtype (bf16 on GPUs)."""
    from dopd_vl.loss.kernels import routed_chunk_loss

    logits = hidden.detach().to(head_weight.dtype) @ head_weight.detach()[:vocab_size].T

    def target_logits(view: str, sel: Tensor) -> Tensor:
        v = targets[view]
        return v.hidden[sl][sel].to(v.head_weight.dtype) @ v.head_weight[:vocab_size].T

    def token_logprob(view: str, sel: Tensor) -> Tensor:
        return targets[view].token_logprob[sl][sel]

    loss, grad, ent = routed_chunk_loss(objective, logits, route_c, ids_c, token_weight_c, target_logits, token_logprob)
    return grad, loss, ent


def chunked_objective_loss(
    objective: Objective,
    student_hidden: Tensor,
    student_head_weight: Tensor,
    response_ids: Tensor,
    route: Tensor,
    token_weight: Tensor,
    targets: dict[str, TargetStates],
    vocab_size: int,
    chunk_size: int = 64,
    backend: str = "torch",
    target_shift: Tensor | None = None,
) -> ChunkedLossOutput:
    """Routed loss over N valid tokens from hidden states: what the trainer runs.

    Student logits exist for one chunk at a time; target logits are computed only for the tokens of
    the chunk routed to a non-sampled route of that target. At V = 152k a chunk of 64 tokens keeps
    each [chunk, V] fp32 intermediate near 39 MB; larger chunks were no faster on CPU
    (bench/loss_bench.py) and cost proportionally more memory.

    Args:
        objective: from `build_objective`.
        student_hidden: [N, H] the student's final hidden states at the valid positions, with gradient.
        student_head_weight: [V_rows, H] the student's output embedding (gradient flows to it too).
        response_ids: [N] the sampled tokens.
        route: [N] route index per token, the token plan's (`plan_tokens`) with step-wide statistics
            (-1: no loss).
        token_weight: [N] normalisation factor per token, the token plan's with step totals.
        targets: view -> TargetStates of every scoring view the objective needs.
        vocab_size: the tokenizer's vocabulary (lm-head rows beyond it are never scored).
        chunk_size: tokens per chunk.
        backend: `torch` (autograd per chunk, everywhere) or `triton` (dopd_vl/loss/kernels.py: CUDA,
            or the interpreter on CPU); both compute the same loss and gradient.
        target_shift: [N] the token plan's shift of the sampled route's target log-prob (uni_opd's
            margin), or None.

    Returns:
        ChunkedLossOutput: the scalar loss, the per-token loss and the student's per-token entropy.

    Raises:
        ValueError: a target view is missing, a head has fewer rows than `vocab_size` or does not
            fit its hidden states, or the backend is unknown.
    """
    missing = {v for spec in objective.routes if spec is not None for v in spec.views} - set(targets)
    if missing:
        raise ValueError(f"objective {objective.name!r} needs target states of views {sorted(missing)}")
    for name, view in targets.items():
        if view.head_weight.shape[0] < vocab_size or view.head_weight.shape[1] != view.hidden.shape[-1]:
            raise ValueError(
                f"view {name!r}: output embedding {tuple(view.head_weight.shape)} does not fit vocab {vocab_size} / "
                f"hidden {view.hidden.shape[-1]}"
            )
    if student_head_weight.shape[0] < vocab_size:
        raise ValueError(
            f"student output embedding has {student_head_weight.shape[0]} rows, fewer than the tokenizer's {vocab_size}"
        )
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be torch or triton, got {backend!r}")
    if target_shift is not None:  # uni_opd's margin: the sampled route's target log-prob (its reward) shifted
        target = objective.routes[0].target
        shifted = shifted_target(targets[target].token_logprob, target_shift)
        targets = {**targets, target: dataclasses.replace(targets[target], token_logprob=shifted)}
    loss, token_loss, student_entropy = _ChunkedRoutedLoss.apply(
        student_hidden,
        student_head_weight,
        objective,
        response_ids,
        route,
        token_weight,
        targets,
        vocab_size,
        chunk_size,
        backend,
    )
    return ChunkedLossOutput(loss, token_loss, student_entropy)
