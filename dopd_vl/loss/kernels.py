"""Fused Triton kernels for one chunk of the routed loss (docs/design.md §2).

The torch path of `chunked_objective_loss` differentiates each chunk with autograd, which holds
about seven [chunk, V] fp32 buffers (logits, log-softmax, target log-softmax, their exps, the
gradient). Here the same loss and gradient come from kernels that stream over the vocabulary in
blocks and keep the student's logits (in the head's dtype, e.g. bf16), one target's logits for the
rows routed to it, the fp32 gradient and, for top-K routes, a copy of the routed rows for the tail. Math is fp32
(float64 inputs stay float64, as
`divergences.upcast` does, which lets the tests compare with the float64 reference tightly).

Per route, by support:

* `full`: one kernel computes each row's log-normalisers and entropy (online logsumexp), another
  the divergence (rkl, fkl or js) and, in a second pass over the vocabulary, its gradient.
* `topk`: the K cells are chosen with `torch.topk` on the chunk; the tail cell's logsumexp runs
  over the row with the K entries set to -inf (in place, then restored); the divergence of the
  K+1 cells and its gradient with respect to the cells are small torch work; the gradient with
  respect to the logits is g_tail*exp(z - tail) - G*exp(z - lse) over the vocabulary (a kernel)
  plus g_k at the K cells, G being the sum of the cell gradients.
* `sampled`: coef*(onehot(y) - softmax(z)), the same kernel plus the sampled cells.

The divergences' cell-level definitions are `dopd_vl.method.divergences` (one place); only the
full-vocabulary sums and their gradients are written out here, and the tests hold both backends
to the float64 reference path. On CPU the kernels run under Triton's interpreter
(`TRITON_INTERPRET=1`), which is how the test suite checks them without a GPU.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from dopd_vl.method.divergences import divergence

try:  # Triton ships with CUDA builds of torch; CPU installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

__all__ = ["triton_available", "resolve_loss_backend", "routed_chunk_loss", "compile_variants", "BLOCK_V"]

BLOCK_V = 1024
_KINDS = {"rkl": 0, "fkl": 1, "js": 2}


def triton_available(device: torch.device) -> bool:
    """Whether the kernels can run for tensors on `device`: CUDA with Triton, or the interpreter."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_loss_backend(backend: str, device: torch.device) -> str:
    """`auto`: Triton on CUDA when it is importable, else torch; `triton` fails clearly without it."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"loss_backend must be auto, torch or triton, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton" and not triton_available(device):
        raise ValueError(
            f"loss_backend triton needs Triton and a CUDA device (or TRITON_INTERPRET=1), got device {device} "
            f"with Triton {'installed' if triton is not None else 'missing'}"
        )
    return "triton" if backend == "triton" or (device.type == "cuda" and triton is not None) else "torch"


if triton is not None:

    @triton.jit
    def _lse_entropy_kernel(z_ptr, rows_ptr, lse_ptr, ent_ptr, n_cols, stride, ACC: tl.constexpr, BLOCK: tl.constexpr):
        """Per listed row: logsumexp of z and the entropy of softmax(z), one streaming pass."""
        p = tl.program_id(0)
        row = tl.load(rows_ptr + p).to(tl.int64)
        m = tl.full([], -float("inf"), ACC)
        s = tl.full([], 0.0, ACC)
        u = tl.full([], 0.0, ACC)  # sum exp(z - m) * z
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(z_ptr + row * stride + cols, mask=cols < n_cols, other=-float("inf")).to(ACC)
            new_m = tl.maximum(m, tl.max(z, 0))
            safe_m = tl.where(new_m == -float("inf"), 0.0, new_m)  # an all -inf prefix: nothing to rescale
            scale = tl.exp(m - safe_m)
            live = z > -float("inf")
            e = tl.exp(tl.where(live, z, safe_m) - safe_m)
            e = tl.where(live, e, 0.0)
            s = s * scale + tl.sum(e, 0)
            u = u * scale + tl.sum(e * tl.where(live, z, 0.0), 0)
            m = new_m
        lse = m + tl.log(s)
        tl.store(lse_ptr + p, lse)
        tl.store(ent_ptr + p, lse - u / s)

    @triton.jit
    def _full_divergence_kernel(
        s_ptr,
        t_ptr,
        s_rows_ptr,
        s_lse_ptr,
        t_lse_ptr,
        scale_ptr,
        value_ptr,
        grad_ptr,
        n_cols,
        s_stride,
        t_stride,
        g_stride,
        log_beta,
        log_1m_beta,
        beta,
        KIND: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Row p of the target block t against student row s_rows[p]: the divergence (stored in
        value[p]) and, scaled by scale[p], its gradient w.r.t. the student logits, added to grad."""
        p = tl.program_id(0)
        row = tl.load(s_rows_ptr + p).to(tl.int64)
        s_lse = tl.load(s_lse_ptr + p)
        t_lse = tl.load(t_lse_ptr + p)
        value = tl.full([], 0.0, ACC)
        inner = tl.full([], 0.0, ACC)  # sum_v s_v * g_v, the softmax Jacobian's row term (rkl, js)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < n_cols
            ls = tl.load(s_ptr + row * s_stride + cols, mask=ok, other=0.0).to(ACC) - s_lse
            lt = tl.load(t_ptr + p * t_stride + cols, mask=ok, other=0.0).to(ACC) - t_lse
            ps = tl.where(ok, tl.exp(ls), 0.0)
            pt = tl.where(ok, tl.exp(lt), 0.0)
            if KIND == 0:  # rkl: sum s (ls - lt); g = ls - lt
                value += tl.sum(ps * (ls - lt), 0)
            elif KIND == 1:  # fkl: sum t (lt - ls)
                value += tl.sum(pt * (lt - ls), 0)
            else:  # js(beta): beta KL(t||m) + (1-beta) KL(s||m); g = (1-beta)(ls - lm)
                a = lt + log_beta
                b = ls + log_1m_beta
                hi = tl.maximum(a, b)
                lm = hi + tl.log(tl.exp(a - hi) + tl.exp(b - hi))
                value += tl.sum(beta * pt * (lt - lm) + (1.0 - beta) * ps * (ls - lm), 0)
                inner += tl.sum(ps * (1.0 - beta) * (ls - lm), 0)
        if KIND == 0:
            inner = value
        tl.store(value_ptr + p, value)
        scale = tl.load(scale_ptr + p)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < n_cols
            ls = tl.load(s_ptr + row * s_stride + cols, mask=ok, other=0.0).to(ACC) - s_lse
            lt = tl.load(t_ptr + p * t_stride + cols, mask=ok, other=0.0).to(ACC) - t_lse
            ps = tl.exp(ls)
            if KIND == 0:
                g = ps * (ls - lt - inner)
            elif KIND == 1:
                g = ps - tl.exp(lt)
            else:
                a = lt + log_beta
                b = ls + log_1m_beta
                hi = tl.maximum(a, b)
                lm = hi + tl.log(tl.exp(a - hi) + tl.exp(b - hi))
                g = ps * ((1.0 - beta) * (ls - lm) - inner)
            ptrs = grad_ptr + row * g_stride + cols
            tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + scale * g, mask=ok)

    @triton.jit
    def _exp_combination_kernel(
        z_ptr,
        z_rows_ptr,
        g_rows_ptr,
        a_ptr,
        b_ptr,
        c_ptr,
        d_ptr,
        grad_ptr,
        n_cols,
        stride,
        g_stride,
        ACC: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """grad[g_row] += a*exp(z[z_row] - b) + c*exp(z[z_row] - d) over the vocabulary (-inf entries add 0)."""
        p = tl.program_id(0)
        row = tl.load(z_rows_ptr + p).to(tl.int64)
        g_row = tl.load(g_rows_ptr + p).to(tl.int64)
        a = tl.load(a_ptr + p)
        b = tl.load(b_ptr + p)
        c = tl.load(c_ptr + p)
        d = tl.load(d_ptr + p)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < n_cols
            z = tl.load(z_ptr + row * stride + cols, mask=ok, other=-float("inf")).to(ACC)
            live = z > -float("inf")
            zl = tl.where(live, z, tl.minimum(b, d))  # -inf entries (the K cells, padding) add 0
            g = tl.where(live, a * tl.exp(zl - b) + c * tl.exp(zl - d), 0.0)
            ptrs = grad_ptr + g_row * g_stride + cols
            tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + g, mask=ok)


def compile_variants(logits_dtype: str) -> dict[str, list[tuple[dict[str, str], dict]]]:
    """Every kernel's (signature, constexprs) as the launches below pass them, for logits of
    `logits_dtype` ("bf16", "fp16", "fp32"): what an ahead-of-time compile for a GPU target needs
    (tests/test_kernel_compile.py). Rows are int32, statistics and gradients fp32."""
    z, f32, i32 = f"*{logits_dtype}", "*fp32", "i32"
    constexpr = {"ACC": tl.float32, "BLOCK": BLOCK_V}
    sig = lambda **kinds: {**kinds, **dict.fromkeys(constexpr, "constexpr")}  # noqa: E731
    return {
        "_lse_entropy_kernel": [
            (sig(z_ptr=z, rows_ptr="*i32", lse_ptr=f32, ent_ptr=f32, n_cols=i32, stride=i32), constexpr)
        ],
        "_full_divergence_kernel": [
            (
                {
                    **sig(
                        s_ptr=z,
                        t_ptr=z,
                        s_rows_ptr="*i32",
                        s_lse_ptr=f32,
                        t_lse_ptr=f32,
                        scale_ptr=f32,
                        value_ptr=f32,
                        grad_ptr=f32,
                        n_cols=i32,
                        s_stride=i32,
                        t_stride=i32,
                        g_stride=i32,
                        log_beta="fp32",
                        log_1m_beta="fp32",
                        beta="fp32",
                    ),
                    "KIND": "constexpr",
                },
                {**constexpr, "KIND": kind},
            )
            for kind in _KINDS.values()
        ],
        "_exp_combination_kernel": [
            (
                sig(
                    z_ptr=z,
                    z_rows_ptr="*i32",
                    g_rows_ptr="*i32",
                    a_ptr=f32,
                    b_ptr=f32,
                    c_ptr=f32,
                    d_ptr=f32,
                    grad_ptr=f32,
                    n_cols=i32,
                    stride=i32,
                    g_stride=i32,
                ),
                constexpr,
            )
        ],
    }


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The kernels' arithmetic: fp32, float64 kept (as `divergences.upcast`)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _lse_entropy(z: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    lse = torch.empty(rows.numel(), dtype=_acc(z.dtype), device=z.device)
    ent = torch.empty_like(lse)
    if rows.numel():
        _lse_entropy_kernel[(rows.numel(),)](
            z, rows, lse, ent, z.shape[1], z.stride(0), ACC=_tl(lse.dtype), BLOCK=BLOCK_V
        )
    return lse, ent


def _exp_combination(
    z: Tensor, z_rows: Tensor, grad_rows: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, grad: Tensor
) -> None:
    """grad[grad_rows] += a*exp(z[z_rows] - b) + c*exp(z[z_rows] - d), per row scalars a..d."""
    if z_rows.numel():
        args = [x.to(grad.dtype).contiguous() for x in (a, b, c, d)]
        _exp_combination_kernel[(z_rows.numel(),)](
            z,
            z_rows.to(torch.int32),
            grad_rows.to(torch.int32),
            *args,
            grad,
            z.shape[1],
            z.stride(0),
            grad.stride(0),
            ACC=_tl(grad.dtype),
            BLOCK=BLOCK_V,
        )


def routed_chunk_loss(
    objective,
    student_logits: Tensor,
    route: Tensor,
    token_ids: Tensor,
    token_weight: Tensor,
    target_logits,
    token_logprob,
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss per token [C], gradient of sum(loss * token_weight) w.r.t. `student_logits` [C, V]
    and the student's entropy [C] for one chunk, in fp32 (float64 for float64 logits).

    `student_logits` [C, V] (any float dtype, contiguous, no grad). `target_logits(view, rows)`
    returns the target view's logits [len(rows), V] for those chunk rows; `token_logprob(view, rows)`
    the sampled tokens' log-probs from scoring. Rows whose route is -1 or switched off get 0.
    """
    c = objective.config
    n, vocab = student_logits.shape
    z = student_logits.contiguous()
    all_rows = torch.arange(n, device=z.device, dtype=torch.int32)
    lse, entropy = _lse_entropy(z, all_rows)
    acc = _acc(z.dtype)
    grad = torch.zeros((n, vocab), dtype=acc, device=z.device)
    loss = torch.zeros(n, dtype=acc, device=z.device)
    weight = token_weight.to(acc)
    for r, spec in enumerate(objective.routes):
        sel = (route == r).nonzero().squeeze(-1)
        if spec is None or sel.numel() == 0:
            continue
        rows = sel.to(torch.int32)
        if spec.support == "full":
            t = target_logits(spec.target, sel).contiguous()
            t_lse, _ = _lse_entropy(t, torch.arange(sel.numel(), device=z.device, dtype=torch.int32))
            for name, term_weight in spec.terms:
                value = torch.empty(sel.numel(), dtype=acc, device=z.device)
                scale = (term_weight * weight[sel]).contiguous()
                _full_divergence_kernel[(sel.numel(),)](
                    z,
                    t,
                    rows,
                    lse[sel].contiguous(),
                    t_lse,
                    scale,
                    value,
                    grad,
                    vocab,
                    z.stride(0),
                    t.stride(0),
                    grad.stride(0),
                    math.log(c.js_beta),
                    math.log(1.0 - c.js_beta),
                    c.js_beta,
                    KIND=_KINDS[name],
                    ACC=_tl(acc),
                    BLOCK=BLOCK_V,
                )
                loss[sel] += term_weight * value
        elif spec.support == "topk":
            _topk_route(spec, c, z, sel, lse[sel], target_logits(spec.target, sel), weight[sel], loss, grad)
        else:  # sampled: coef * (onehot(y) - softmax(z)), coef = sg(l_s(y) - target) * weight
            ids = token_ids[sel]
            ls = z[sel, ids].to(acc) - lse[sel]
            target = token_logprob(spec.target, sel).to(acc)
            if spec.reference is not None:  # ExOPD's extrapolated target
                target = spec.extrapolation * target + (1.0 - spec.extrapolation) * token_logprob(
                    spec.reference, sel
                ).to(acc)
            coef = (ls - target) * sum(w for _, w in spec.terms)
            # A clipped route (Uni-OPD) at ratio 1: value -A = coef, the same gradient as the sampled RKL.
            loss[sel] += coef if spec.clip is not None else coef * ls
            scaled = coef * weight[sel]
            _exp_combination(z, rows, rows, torch.zeros_like(scaled), lse[sel], -scaled, lse[sel], grad)
            grad.index_put_((sel, ids), scaled, accumulate=True)
    return loss, grad, entropy


def _topk_route(
    spec, c, z: Tensor, sel: Tensor, lse: Tensor, t: Tensor, weight: Tensor, loss: Tensor, grad: Tensor
) -> None:
    """One top-K route: the cells of `divergences.topk_cells` (K + tail, or renormalised), their
    divergence by `divergences.divergence`, and the gradient carried back to the logits."""
    zs = z[sel]  # [n, V] copy of the routed rows: the tail is computed on it in place
    t = t.contiguous()
    k = min(c.top_k, z.shape[1])
    index = (zs if c.topk_source == "student" else t).topk(k, dim=-1).indices
    s_top, t_top = zs.gather(1, index).to(lse.dtype), t.gather(1, index).to(lse.dtype)
    local = torch.arange(sel.numel(), device=z.device, dtype=torch.int32)
    t_lse, _ = _lse_entropy(t, local)
    with torch.enable_grad():
        if not c.topk_tail:  # renormalised over the K cells: the leaf is the K logits themselves
            leaf = s_top.detach().requires_grad_()
            s_cells = leaf - leaf.logsumexp(-1, keepdim=True)
            t_cells = t_top - t_top.logsumexp(-1, keepdim=True)
        else:  # log-probs of the K cells (+ the tail's when K < V) are the leaf
            s_cells, t_cells = s_top - lse[:, None], t_top - t_lse[:, None]
            if k < z.shape[1]:  # logsumexp over the complement: the K entries set to -inf
                zs.scatter_(1, index, float("-inf"))
                t.scatter_(1, index, float("-inf"))
                s_tail, _ = _lse_entropy(zs, local)
                t_tail, _ = _lse_entropy(t, local)
                s_cells = torch.cat([s_cells, (s_tail - lse)[:, None]], 1)
                t_cells = torch.cat([t_cells, (t_tail - t_lse)[:, None]], 1)
            leaf = s_cells = s_cells.detach().requires_grad_()
        value = sum(w * divergence(name, s_cells, t_cells, c.js_beta) for name, w in spec.terms)
        (g,) = torch.autograd.grad((value * weight).sum(), leaf)
    loss[sel] += value.detach()
    if not c.topk_tail:
        grad.index_put_((sel[:, None].expand_as(index), index), g, accumulate=True)
        return
    # z -> cell log-probs: d(z_k - lse)/dz_v = [v = k] - s_v; d(tail - lse)/dz_v = [v not in K] e^(z_v - tail) - s_v
    total = g.sum(1)
    if k < z.shape[1]:
        _exp_combination(zs, local, sel, g[:, k], s_tail, -total, lse, grad)
    grad.index_put_(
        (sel[:, None].expand_as(index), index),
        g[:, :k] - total[:, None] * (s_top - lse[:, None]).exp(),
        accumulate=True,
    )
