"""The chunked path (dopd_vl/loss/chunked.py) against the reference at the real vocabulary,
its errors, switched-off chunks and the automatic chunk size."""

import math

import pytest
import torch

from dopd_vl.loss.chunked import TargetStates, chunked_objective_loss, target_states
from dopd_vl.loss.reference import objective_loss
from dopd_vl.method.objectives import ObjectiveConfig, build_objective
from dopd_vl.method.outcomes import Outcomes
from dopd_vl.method.plan import plan_tokens
from dopd_vl.method.routing import Regime

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


GROUPS = torch.tensor([0, 0, 1])  # the three responses: two rollouts of one prompt, one of another


def _outcomes(objective):
    """Verdicts for objectives that read them: response 0 right, 1 wrong (the same prompt: uni_opd
    balances them), 2 wrong; teacher verdicts wrong, right, right (trust: verified)."""
    if not objective.response_verdicts:
        return None
    return Outcomes(response=torch.tensor([1, 0, 0]), teacher=torch.tensor([0, 1, 1]), seed=0)


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
                groups=GROUPS,
                outcomes=_outcomes(obj),
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
            outcomes = _outcomes(obj)
            if outcomes is not None and obj.sampling_logprob:  # uni_opd: l_old, the student's own token log-probs
                s_lp = (student_hidden[mask] @ head[:REAL_V].T).log_softmax(-1).detach()
                outcomes.student_logprob = s_lp.gather(-1, flat_ids[:, None]).squeeze(-1)
                outcomes.target_logprob = targets[obj.routes[0].target].token_logprob
            plan = plan_tokens(obj, mask.sum(-1), signals, stats, keys, GROUPS, outcomes=outcomes)
            route, weight = plan.route, plan.weight
            out = chunked_objective_loss(
                obj,
                student_hidden[mask],
                head,
                flat_ids,
                route,
                weight,
                targets,
                REAL_V,
                chunk_size=3,
                target_shift=plan.target_shift,
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
    ObjectiveConfig(top_k=16, trust="verified"),
    ObjectiveConfig(name="uni_opd"),
    ObjectiveConfig(name="uni_opd", uni_margin=3.0, uni_margin_mode="correct", teacher_view="teacher_plain"),
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
