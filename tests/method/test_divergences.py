"""Divergences and supports against naive float64 formulas written here, not in the package."""

import math

import pytest
import torch

from dopd_vl.method.divergences import token_divergence, topk_cells

N, V = 6, 37


def naive_probs(logits):
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def naive_kl(p, q):
    return (p * (torch.log(p) - torch.log(q))).sum(-1)


def naive_div(name, s, t, beta=0.5):
    if name == "rkl":
        return naive_kl(s, t)
    if name == "fkl":
        return naive_kl(t, s)
    m = beta * t + (1 - beta) * s
    return beta * naive_kl(t, m) + (1 - beta) * naive_kl(s, m)


def naive_topk(s, t, k, source, tail):
    """Coarsen with an explicit index loop and, for the tail, 1 - sum (fine in float64 here)."""
    rank = s if source == "student" else t
    s_rows, t_rows = [], []
    for i in range(s.shape[0]):
        idx = sorted(range(s.shape[1]), key=lambda j: -rank[i, j].item())[:k]
        si, ti = s[i, idx], t[i, idx]
        if tail:
            si = torch.cat([si, (1 - si.sum()).reshape(1)])
            ti = torch.cat([ti, (1 - ti.sum()).reshape(1)])
        else:
            si, ti = si / si.sum(), ti / ti.sum()
        s_rows.append(si)
        t_rows.append(ti)
    return torch.stack(s_rows), torch.stack(t_rows)


def rel_close(a, b, rel):
    assert torch.allclose(a, b, rtol=rel, atol=rel * b.abs().max().item() * 1e-3 + 1e-12), (a, b)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return 2 * torch.randn(N, V, generator=g, dtype=torch.float64), 2 * torch.randn(
        N, V, generator=g, dtype=torch.float64
    )


@pytest.mark.parametrize("name", ["rkl", "fkl", "js"])
@pytest.mark.parametrize("support", ["full", "topk_tail", "topk_renorm", "topk_target"])
def test_divergence_matches_naive_float64_in_value_and_gradient(logits, name, support):
    s_logits, t_logits = logits
    s1 = s_logits.clone().requires_grad_()
    s2 = s_logits.clone().requires_grad_()
    ids = torch.zeros(N, dtype=torch.long)
    k = 5
    kwargs = dict(
        top_k=k,
        topk_tail=support != "topk_renorm",
        topk_source="target" if support == "topk_target" else "student",
        js_beta=0.3,
    )
    ours = token_divergence(
        name, "full" if support == "full" else "topk", s1.log_softmax(-1), t_logits.log_softmax(-1), ids, **kwargs
    )
    s_p, t_p = naive_probs(s2), naive_probs(t_logits)
    if support != "full":
        s_p, t_p = naive_topk(s_p, t_p, k, kwargs["topk_source"], kwargs["topk_tail"])
    ref = naive_div(name, s_p, t_p, beta=0.3)
    rel_close(ours, ref, 1e-6)
    ours.sum().backward()
    ref.sum().backward()
    rel_close(s1.grad, s2.grad, 1e-5)


def test_js_half_is_symmetric_and_bounded_by_log2(logits):
    s_logits, t_logits = logits
    ids = torch.zeros(N, dtype=torch.long)
    a = token_divergence("js", "full", s_logits.log_softmax(-1), t_logits.log_softmax(-1), ids)
    b = token_divergence("js", "full", t_logits.log_softmax(-1), s_logits.log_softmax(-1), ids)
    assert torch.allclose(a, b) and (a <= math.log(2)).all() and (a >= 0).all()


@pytest.mark.parametrize("name", ["rkl", "fkl", "js"])
@pytest.mark.parametrize("k", [V, V + 10])
def test_topk_with_tail_equals_full_when_k_covers_vocabulary(logits, name, k):
    s_logits, t_logits = logits
    s1 = s_logits.clone().requires_grad_()
    s2 = s_logits.clone().requires_grad_()
    ids = torch.zeros(N, dtype=torch.long)
    top = token_divergence(name, "topk", s1.log_softmax(-1), t_logits.log_softmax(-1), ids, top_k=k)
    full = token_divergence(name, "full", s2.log_softmax(-1), t_logits.log_softmax(-1), ids)
    assert torch.allclose(top, full, rtol=1e-10)
    top.sum().backward()
    full.sum().backward()
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-9, atol=1e-14)


def test_topk_is_a_lower_bound_of_the_full_divergence(logits):
    s_logits, t_logits = logits
    ids = torch.zeros(N, dtype=torch.long)
    for name in ("rkl", "fkl", "js"):
        top = token_divergence(name, "topk", s_logits.log_softmax(-1), t_logits.log_softmax(-1), ids, top_k=4)
        full = token_divergence(name, "full", s_logits.log_softmax(-1), t_logits.log_softmax(-1), ids)
        assert (top <= full + 1e-12).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tail_is_stable_when_its_mass_is_below_1e_30(dtype):
    k, v = 4, 40
    s_logits = torch.full((2, v), -100.0, dtype=dtype)
    s_logits[:, :k] = torch.tensor([0.0, 0.5, 1.0, 1.5], dtype=dtype)
    s_logits.requires_grad_()
    t_logits = torch.zeros(2, v, dtype=dtype)
    t_logits[:, :k] = 3.0
    cells_s, cells_t = topk_cells(s_logits.log_softmax(-1), t_logits.log_softmax(-1), k)
    # Independent value of the student's log tail mass: log((v-k) e^-100) - logsumexp(all).
    lse = math.log(sum(math.exp(x) for x in [0.0, 0.5, 1.0, 1.5]) + (v - k) * math.exp(-100.0))
    expected_log_tail = math.log(v - k) - 100.0 - lse
    assert math.exp(expected_log_tail) < 1e-30
    assert abs(cells_s[0, -1].item() - expected_log_tail) < 1e-4 * abs(expected_log_tail)
    for name in ("rkl", "fkl", "js"):
        d = token_divergence(
            name, "topk", s_logits.log_softmax(-1), t_logits.log_softmax(-1), torch.zeros(2, dtype=torch.long), top_k=k
        )
        (grad,) = torch.autograd.grad(d.sum(), s_logits)
        assert torch.isfinite(d).all() and torch.isfinite(grad).all()


def test_sampled_support_is_the_policy_gradient_form_of_rkl(logits):
    s_logits, t_logits = logits
    ids = torch.arange(N) % V
    s1 = s_logits.clone().requires_grad_()
    ours = token_divergence("rkl", "sampled", s1.log_softmax(-1), t_logits.log_softmax(-1), ids)
    s_tok = torch.log(naive_probs(s_logits))[torch.arange(N), ids]
    t_tok = torch.log(naive_probs(t_logits))[torch.arange(N), ids]
    rel_close(ours, (s_tok - t_tok) * s_tok, 1e-6)
    ours.sum().backward()
    # d/dz of c * log s(y) = c * (onehot(y) - s)
    expected = (s_tok - t_tok)[:, None] * (torch.nn.functional.one_hot(ids, V) - naive_probs(s_logits))
    rel_close(s1.grad, expected, 1e-5)


def test_unknown_names_are_rejected(logits):
    s_logits, t_logits = logits
    ids = torch.zeros(N, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown divergence"):
        token_divergence("tv", "full", s_logits, t_logits, ids)
    with pytest.raises(ValueError, match="unknown support"):
        token_divergence("rkl", "topp", s_logits, t_logits, ids)
    with pytest.raises(ValueError, match="sampled.*rkl.* only"):
        token_divergence("js", "sampled", s_logits, t_logits, ids)
