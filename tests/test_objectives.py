"""The routed objective: hand-computed cases, masking, normalisation, splits, baselines, chunked path."""

import math

import pytest
import torch

from dopd_vl.loss.chunked import TargetStates, chunked_objective_loss, target_states
from dopd_vl.loss.reference import dopd_loss, objective_loss
from dopd_vl.loss.routed import token_weights
from dopd_vl.method.objectives import OBJECTIVES, ObjectiveConfig, build_objective
from dopd_vl.method.routing import Regime


# ---------------------------------------------------------------------------- hand-computed cases
def _probs_to_logits(rows):
    return torch.tensor(rows, dtype=torch.float64).log()


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _cells(p, idx, tail=True):
    top = [p[i] for i in idx]
    return top + [1 - sum(top)] if tail else [x / sum(top) for x in top]


def test_dopd_loss_by_hand_on_a_four_word_vocabulary():
    # One sequence of 4 tokens, sampled token 0 each time; one token per regime (see test_routing).
    teacher = [[0.5, 0.2, 0.2, 0.1], [0.1, 0.3, 0.3, 0.3], [0.8, 0.1, 0.05, 0.05], [0.2, 0.5, 0.2, 0.1]]
    spriv = [[0.5, 0.3, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.2, 0.2, 0.3, 0.3], [0.8, 0.1, 0.05, 0.05]]
    student = [[0.4, 0.3, 0.2, 0.1], [0.3, 0.2, 0.4, 0.1], [0.3, 0.3, 0.2, 0.2], [0.6, 0.1, 0.1, 0.2]]
    cfg = ObjectiveConfig(top_k=2, outlier_fraction=0.0)
    out = dopd_loss(
        _probs_to_logits([student]),
        _probs_to_logits([teacher]),
        _probs_to_logits([spriv]),
        torch.zeros(1, 4, dtype=torch.long),
        torch.ones(1, 4, dtype=torch.bool),
        cfg,
    )
    assert out.regime.tolist() == [[Regime.LH, Regime.LL, Regime.HT, Regime.HS]]
    # Student top-2 indices (ties broken by torch.topk's order are avoided by the numbers chosen).
    top2 = [[0, 1], [2, 0], [0, 1], [0, 3]]
    lh = 0.6 * _kl(_cells(student[0], top2[0]), _cells(teacher[0], top2[0]))
    ll = 0.3 * _kl(_cells(student[1], top2[1]), _cells(spriv[1], top2[1]))
    m = [(a + b) / 2 for a, b in zip(teacher[2], student[2])]
    ht = 1.0 * (0.5 * _kl(teacher[2], m) + 0.5 * _kl(student[2], m))
    hs = 0.6 * _kl(_cells(student[3], top2[3]), _cells(spriv[3], top2[3]))
    expected = [lh, ll, ht, hs]
    assert out.token_loss[0].tolist() == pytest.approx(expected, rel=1e-9)
    assert out.loss.item() == pytest.approx(sum(expected) / 4, rel=1e-9)


def test_regime_switches_and_weights_come_from_config():
    g = torch.Generator().manual_seed(1)
    s, t, p = (torch.randn(2, 6, 5, generator=g, dtype=torch.float64) for _ in range(3))
    ids, mask = torch.randint(0, 5, (2, 6), generator=g), torch.ones(2, 6, dtype=torch.bool)
    base = dopd_loss(s, t, p, ids, mask, ObjectiveConfig(top_k=3))
    off = dopd_loss(
        s, t, p, ids, mask, ObjectiveConfig(top_k=3, regime_routes={"HT": {"enabled": False}, "LL": {"weight": 0.9}})
    )
    ht, ll = base.regime == Regime.HT, base.regime == Regime.LL
    assert (off.token_loss[ht] == 0).all()
    assert torch.allclose(off.token_loss[ll], base.token_loss[ll] * 3.0)
    with pytest.raises(ValueError, match="unknown regimes"):
        ObjectiveConfig(regime_routes={"XX": {}})
    with pytest.raises(ValueError, match="unknown keys"):
        build_objective(ObjectiveConfig(regime_routes={"HT": {"wieght": 2}}))


# ---------------------------------------------------------------------------------- fixtures
B, T, V = 4, 9, 23


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    logits = {
        k: 3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
        for k in ("student", "teacher_priv", "student_priv", "teacher_plain")
    }
    lengths = torch.tensor([9, 3, 6, 1])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    ids = torch.randint(0, V, (B, T), generator=g)
    return logits, ids, mask


def test_gradient_reaches_only_the_student(batch):
    logits, ids, mask = batch
    leaves = {k: v.clone().requires_grad_() for k, v in logits.items()}
    out = dopd_loss(
        leaves["student"], leaves["teacher_priv"], leaves["student_priv"], ids, mask, ObjectiveConfig(top_k=4)
    )
    out.loss.backward()
    assert leaves["student"].grad is not None and leaves["student"].grad.abs().sum() > 0
    assert leaves["teacher_priv"].grad is None and leaves["student_priv"].grad is None


def test_masked_positions_contribute_nothing_even_when_nan_or_inf(batch):
    logits, ids, mask = batch
    cfg = ObjectiveConfig(top_k=4)
    clean = dopd_loss(logits["student"], logits["teacher_priv"], logits["student_priv"], ids, mask, cfg)
    dirty = {k: v.clone() for k, v in logits.items()}
    for k, v in dirty.items():
        v[~mask] = float("nan") if k == "student" else float("inf")
        v[~mask, 0] = float("-inf")
    dirty_ids = torch.where(mask, ids, -100)
    s = dirty["student"].requires_grad_()
    out = dopd_loss(s, dirty["teacher_priv"], dirty["student_priv"], dirty_ids, mask, cfg)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(clean.loss.item(), rel=1e-12)
    assert torch.isfinite(s.grad).all() and (s.grad[~mask] == 0).all()
    assert (out.token_loss[~mask] == 0).all() and (out.regime[~mask] == -1).all()


@pytest.mark.parametrize("normalization", ["sequence", "token"])
def test_normalisation_follows_equation_1_6(batch, normalization):
    logits, ids, mask = batch
    out = dopd_loss(
        logits["student"],
        logits["teacher_priv"],
        logits["student_priv"],
        ids,
        mask,
        ObjectiveConfig(top_k=4, normalization=normalization),
    )
    tl = out.token_loss
    if normalization == "sequence":
        expected = sum(tl[b].sum() / mask[b].sum() for b in range(B)) / B
    else:
        expected = tl.sum() / mask.sum()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("normalization", ["sequence", "token"])
def test_batch_loss_is_weighted_combination_of_halves_with_whole_batch_thresholds(batch, normalization):
    logits, ids, mask = batch
    cfg = ObjectiveConfig(top_k=4, normalization=normalization)
    full = dopd_loss(logits["student"], logits["teacher_priv"], logits["student_priv"], ids, mask, cfg)
    parts = []
    for sl in (slice(0, 2), slice(2, 4)):
        part = dopd_loss(
            *(logits[k][sl] for k in ("student", "teacher_priv", "student_priv")),
            ids[sl],
            mask[sl],
            cfg,
            thresholds=full.thresholds,
        )
        assert torch.equal(part.regime, full.regime[sl])
        parts.append((part.loss, sl))
    if normalization == "sequence":
        combined = sum(loss * 2 for loss, _ in parts) / B
    else:
        combined = sum(loss * mask[sl].sum() for loss, sl in parts) / mask.sum()
    assert combined.item() == pytest.approx(full.loss.item(), rel=1e-12)
    # The same with step totals passed in: the shares simply add up.
    shares = [
        dopd_loss(
            *(logits[k][sl] for k in ("student", "teacher_priv", "student_priv")),
            ids[sl],
            mask[sl],
            cfg,
            thresholds=full.thresholds,
            num_sequences=B,
            num_tokens=int(mask.sum()),
        ).loss
        for sl in (slice(0, 2), slice(2, 4))
    ]
    assert sum(shares).item() == pytest.approx(full.loss.item(), rel=1e-12)


# ---------------------------------------------------------------------------------- baselines
def _naive_log_softmax(x):
    return (
        x
        - torch.log(torch.exp(x - x.max(-1, keepdim=True).values).sum(-1, keepdim=True))
        - x.max(-1, keepdim=True).values
    )


def _naive_seq_mean(per_token, mask):
    return sum(per_token[b][mask[b]].mean() for b in range(per_token.shape[0])) / per_token.shape[0]


def test_vanilla_opd_with_full_rkl_is_naive_rkl_to_the_plain_teacher(batch):
    logits, ids, mask = batch
    obj = build_objective(ObjectiveConfig(name="vanilla_opd", baseline_support="full"))
    assert obj.views == ("teacher_plain",)
    out = objective_loss(obj, logits["student"], {"teacher_plain": logits["teacher_plain"]}, ids, mask)
    s, t = _naive_log_softmax(logits["student"]), _naive_log_softmax(logits["teacher_plain"])
    rkl = (s.exp() * (s - t)).sum(-1)
    assert out.loss.item() == pytest.approx(_naive_seq_mean(rkl, mask).item(), rel=1e-10)


@pytest.mark.parametrize(
    "name,target,divergence",
    [
        ("privileged_opd", "teacher_priv", "rkl"),
        ("self_distill", "student_priv", "rkl"),
        ("uniform", "teacher_priv", "js"),
    ],
)
def test_single_route_baselines_use_their_target_on_every_token(batch, name, target, divergence):
    logits, ids, mask = batch
    obj = build_objective(ObjectiveConfig(name=name, baseline_support="full"))
    views = {v: logits[v] for v in obj.views}
    out = objective_loss(obj, logits["student"], views, ids, mask)
    s, t = _naive_log_softmax(logits["student"]), _naive_log_softmax(logits[target])
    if divergence == "rkl":
        d = (s.exp() * (s - t)).sum(-1)
    else:
        m = 0.5 * (s.exp() + t.exp())
        d = 0.5 * (t.exp() * (t - m.log())).sum(-1) + 0.5 * (s.exp() * (s - m.log())).sum(-1)
    assert out.loss.item() == pytest.approx(_naive_seq_mean(d, mask).item(), rel=1e-10)
    assert (out.route[mask] == 0).all()


@pytest.mark.parametrize("prune_by", ["largest_A", "smallest_A", "random"])
def test_pruned_opd_drops_20_percent_of_tokens_and_is_vanilla_elsewhere(batch, prune_by):
    logits, ids, mask = batch
    obj = build_objective(ObjectiveConfig(name="pruned_opd", prune_by=prune_by, baseline_support="full"))
    assert set(obj.views) == {"teacher_priv", "student_priv", "teacher_plain"}
    out = objective_loss(
        obj,
        logits["student"],
        {v: logits[v] for v in obj.views},
        ids,
        mask,
        prune_generator=torch.Generator().manual_seed(0),
    )
    n = int(mask.sum())
    dropped = (out.route == -1) & mask
    assert int(dropped.sum()) == int(0.2 * n)
    lt = _naive_log_softmax(logits["teacher_priv"]).gather(-1, ids[..., None]).squeeze(-1)
    ls = _naive_log_softmax(logits["student_priv"]).gather(-1, ids[..., None]).squeeze(-1)
    a = (lt - ls).abs()[mask]
    if prune_by != "random":
        kept_a, dropped_a = a[~dropped[mask]], a[dropped[mask]]
        if prune_by == "largest_A":
            assert dropped_a.min() >= kept_a.max()
        else:
            assert dropped_a.max() <= kept_a.min()
    s, t = _naive_log_softmax(logits["student"]), _naive_log_softmax(logits["teacher_plain"])
    rkl = (s.exp() * (s - t)).sum(-1)
    keep = mask & ~dropped
    expected = sum(rkl[b][keep[b]].sum() / mask[b].sum() for b in range(B)) / B
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-10)


def test_objectives_compute_only_the_views_they_need():
    views = {name: build_objective(ObjectiveConfig(name=name)).views for name in OBJECTIVES}
    assert views == {
        "dopd": ("teacher_priv", "student_priv"),
        "vanilla_opd": ("teacher_plain",),
        "privileged_opd": ("teacher_priv",),
        "self_distill": ("student_priv",),
        "uniform": ("teacher_priv", "student_priv"),
        "pruned_opd": ("teacher_priv", "student_priv", "teacher_plain"),
        "eopd": ("teacher_priv",),
        "exopd": ("teacher_priv", "reference"),
        "va_opd": ("teacher_priv", "teacher_plain"),
        "vision_opd": ("student_priv",),
    }


# -------------------------------------------------------------------------------- chunked path
REAL_V, ROWS, H = 151_669, 151_936, 8


@pytest.fixture(scope="module")
def real_vocab_setup():
    """Tiny hidden size, real Qwen vocabulary and padded lm-head rows (151,936 > 151,669)."""
    g = torch.Generator().manual_seed(7)
    lengths = torch.tensor([5, 2, 4])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    ids = torch.randint(0, REAL_V, (3, 5), generator=g)
    weights = {k: 0.5 * torch.randn(ROWS, H, generator=g, dtype=torch.float64) for k in ("teacher", "student_other")}
    # The privileged views are a real teacher/student's states; make some tokens agree strongly.
    hidden = {
        k: torch.randn(3, 5, H, generator=g, dtype=torch.float64)
        for k in ("teacher_priv", "student_priv", "teacher_plain", "reference")
    }
    embed = 0.5 * torch.randn(ROWS, H, generator=g, dtype=torch.float64)
    proj = torch.randn(H, H, generator=g, dtype=torch.float64) / math.sqrt(H)
    return dict(mask=mask, ids=ids, weights=weights, hidden=hidden, embed=embed, proj=proj)


def _run_both_paths(setup, config, tied):
    mask, ids = setup["mask"], setup["ids"]
    obj = build_objective(config)
    head_of = {
        "teacher_priv": setup["weights"]["teacher"],
        "teacher_plain": setup["weights"]["teacher"],
        "student_priv": None,
        "reference": None,
    }
    results = []
    for path in ("reference", "chunked"):
        embed = setup["embed"].clone().requires_grad_()
        proj = setup["proj"].clone().requires_grad_()
        head = embed if tied else setup["weights"]["student_other"].clone().requires_grad_()
        # A toy "model": the student's hidden states depend on the (possibly tied) embedding.
        student_hidden = torch.tanh(embed[ids] @ proj)
        heads = {v: (head.detach() if w is None else w) for v, w in head_of.items()}
        if path == "reference":
            view_logits = {v: setup["hidden"][v] @ heads[v][:REAL_V].T for v in obj.views}
            out = objective_loss(
                obj,
                student_hidden @ head[:REAL_V].T,
                view_logits,
                ids,
                mask,
                vocab_size=REAL_V,
                prune_generator=torch.Generator().manual_seed(0),
            )
            loss, token_loss = out.loss, out.token_loss[mask]
        else:
            flat_ids = ids[mask]
            targets = {}
            for v in obj.views:
                h = setup["hidden"][v][mask]
                targets[v] = target_states(h, heads[v], flat_ids, REAL_V, chunk_size=4)
                lp = (h @ heads[v][:REAL_V].T).log_softmax(-1)
                assert torch.allclose(
                    targets[v].token_logprob, lp.gather(-1, flat_ids[:, None]).squeeze(-1), rtol=1e-10
                )
                assert torch.allclose(targets[v].entropy, -(lp.exp() * lp).sum(-1), rtol=1e-10)
            signals = obj.token_signals(
                {v: t.token_logprob for v, t in targets.items()}, {v: t.entropy for v, t in targets.items()}
            )
            keys = obj.prune_keys(signals, torch.Generator().manual_seed(0)) if obj.router == "prune" else None
            stats = obj.step_statistics(signals, keys)
            route = obj.assign_routes(torch.ones_like(flat_ids, dtype=torch.bool), signals, stats, keys)
            route_bt = torch.full(mask.shape, -1).masked_scatter(mask, route)
            weight = token_weights(obj, mask, route_bt, stats, signals)[mask]
            out = chunked_objective_loss(
                obj, student_hidden[mask], head, flat_ids, route, weight, targets, REAL_V, chunk_size=3
            )
            loss, token_loss = out.loss, out.token_loss
            s_logp = (student_hidden[mask] @ head[:REAL_V].T).log_softmax(-1)
            assert torch.allclose(out.student_entropy, -(s_logp.exp() * s_logp).sum(-1), rtol=1e-8)
        loss.backward()
        grads = [embed.grad.clone(), proj.grad.clone()] + ([] if tied else [head.grad.clone()])
        results.append((loss.detach(), token_loss, grads))
    return results


CHUNK_CONFIGS = [
    ObjectiveConfig(top_k=16),
    ObjectiveConfig(top_k=16, edge_check="plain_teacher"),
    ObjectiveConfig(top_k=16, normalization="token", topk_source="target"),
    ObjectiveConfig(top_k=16, topk_tail=False, regime_routes={"LL": {"support": "sampled"}}),
    ObjectiveConfig(name="vanilla_opd", top_k=16),
    ObjectiveConfig(name="vanilla_opd", baseline_support="sampled"),
    ObjectiveConfig(name="vanilla_opd", baseline_support="full"),
    ObjectiveConfig(name="privileged_opd", top_k=16),
    ObjectiveConfig(name="self_distill", top_k=16, baseline_divergence="js"),
    ObjectiveConfig(name="uniform", top_k=16),
    ObjectiveConfig(name="pruned_opd", top_k=16, prune_by="random"),
    ObjectiveConfig(name="eopd", top_k=16),
    ObjectiveConfig(
        name="eopd", top_k=16, baseline_support="topk", split_threshold="quantile", teacher_view="teacher_plain"
    ),
    ObjectiveConfig(name="exopd", exopd_lambda=1.5),
    ObjectiveConfig(name="va_opd", top_k=16),
    ObjectiveConfig(name="va_opd", top_k=16, va_temperature=None, va_low_weight=0.0),
    ObjectiveConfig(name="vision_opd", top_k=16),
]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize(
    "config", CHUNK_CONFIGS, ids=lambda c: f"{c.name}-{c.baseline_support or ''}-{c.normalization}"
)
def test_chunked_path_equals_reference_at_real_vocabulary(real_vocab_setup, config, tied):
    (ref_loss, ref_tok, ref_grads), (ch_loss, ch_tok, ch_grads) = _run_both_paths(real_vocab_setup, config, tied)
    assert ch_loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert torch.allclose(ch_tok, ref_tok, rtol=1e-5, atol=1e-12)
    for a, b in zip(ch_grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_chunked_path_rejects_missing_views_and_small_heads(real_vocab_setup):
    obj = build_objective(ObjectiveConfig())
    h = torch.zeros(2, H)
    with pytest.raises(ValueError, match="needs target states"):
        chunked_objective_loss(
            obj,
            h,
            torch.zeros(ROWS, H),
            torch.zeros(2, dtype=torch.long),
            torch.zeros(2, dtype=torch.long),
            torch.ones(2),
            {},
            REAL_V,
        )
    with pytest.raises(ValueError, match="fewer than the tokenizer"):
        targets = {v: TargetStates(h, torch.zeros(ROWS, H), torch.zeros(2)) for v in ("teacher_priv", "student_priv")}
        chunked_objective_loss(
            obj,
            h,
            torch.zeros(100, H),
            torch.zeros(2, dtype=torch.long),
            torch.zeros(2, dtype=torch.long),
            torch.ones(2),
            targets,
            REAL_V,
        )


def test_mismatched_vocabularies_are_a_clear_error(batch):
    logits, ids, mask = batch
    with pytest.raises(ValueError, match="different vocabulary sizes"):
        dopd_loss(logits["student"], logits["teacher_priv"][..., :-2], logits["student_priv"], ids, mask)


def test_chunk_whose_tokens_are_all_on_switched_off_routes_has_zero_gradient():
    """A chunk where every token's regime is switched off contributes no loss and no gradient
    (it once raised inside the chunked backward; found by the toy experiment's ablation)."""
    g = torch.Generator().manual_seed(3)
    config = ObjectiveConfig(regime_routes={"HS": {"enabled": False}, "LL": {"enabled": False}})
    obj = build_objective(config)
    n, h = 6, 8
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(50, h, generator=g, dtype=torch.float64, requires_grad=True)
    targets = {
        v: TargetStates(
            torch.randn(n, h, generator=g, dtype=torch.float64),
            torch.randn(50, h, generator=g, dtype=torch.float64),
            torch.full((n,), -3.0, dtype=torch.float64),
        )
        for v in obj.views
        if v != "student"
    }
    ids = torch.randint(0, 50, (n,), generator=g)
    route = torch.tensor([int(Regime.HS)] * 3 + [int(Regime.LH)] * 3)  # first chunk (size 3): switched-off routes only
    out = chunked_objective_loss(
        obj, hidden, head, ids, route, torch.full((n,), 1.0 / n, dtype=torch.float64), targets, 50, chunk_size=3
    )
    out.loss.backward()
    assert torch.all(out.token_loss[:3] == 0) and torch.all(out.token_loss[3:] > 0)
    assert torch.all(hidden.grad[:3] == 0) and hidden.grad[3:].abs().sum() > 0


def test_auto_chunk_size_is_64_on_cpu_and_fits_the_memory_budget_on_a_gpu():
    from dopd_vl.errors import ConfigError
    from dopd_vl.loss.chunked import auto_chunk_size
    from dopd_vl.training.config import load_config

    assert auto_chunk_size(torch.device("cpu"), 151_936) == 64
    gpu = torch.device("cuda", 0)
    per_token = 7 * 4 * 151_936  # bytes of ~7 fp32 [chunk, V] intermediates per token
    # 139 GB free: the 4 GiB cap -> 1009 tokens -> 960 (a multiple of 64)
    assert auto_chunk_size(gpu, 151_936, free_bytes=139 * 10**9) == (4 * 2**30 // per_token) // 64 * 64 == 960
    assert auto_chunk_size(gpu, 151_936, free_bytes=10 * 10**9) == (10**9 // per_token) // 64 * 64  # 10% of free memory
    assert auto_chunk_size(gpu, 151_936, free_bytes=10**8) == 64  # never below 64
    assert auto_chunk_size(gpu, 1_000, free_bytes=139 * 10**9) == 2048  # never above 2048
    assert (
        auto_chunk_size(gpu, 151_936, free_bytes=139 * 10**9, backend="triton") == 2048
    )  # the kernels' ~12 bytes per entry
    assert (
        load_config(None, []).loss_chunk_size == "auto"
        and load_config(None, ["loss_chunk_size=256"]).loss_chunk_size == 256
    )
    with pytest.raises(ConfigError, match="loss_chunk_size"):
        load_config(None, ["loss_chunk_size=big"])
