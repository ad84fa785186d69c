"""The fused Triton kernels of the routed loss (dopd_vl/loss/kernels.py) against the float64 reference
path, under Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1): every route, support,
weight override and normalisation, masked tokens, switched-off routes, tied and untied heads."""

import math
import os

import pytest
import torch

from dopd_vl.loss import chunked_objective_loss, objective_loss, target_states
from dopd_vl.method.objectives import ObjectiveConfig, build_objective
from dopd_vl.method.outcomes import Outcomes
from dopd_vl.method.plan import plan_tokens
from dopd_vl.training.step import sample_step

pytest.importorskip("triton")

from dopd_vl.loss.kernels import BLOCK_V, resolve_loss_backend, triton_available  # noqa: E402

VOCAB, ROWS, H = 2 * BLOCK_V + 37, 2 * BLOCK_V + 64, 8  # partial last block, padded lm-head rows
# The compiled kernels on a GPU when the interpreter is switched off (bench/gpu_check.sh), else the CPU.
DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([6, 2, 5])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    ids = torch.randint(0, VOCAB, (3, 6), generator=g)
    hidden = {
        k: torch.randn(3, 6, H, generator=g, dtype=torch.float64)
        for k in ("teacher_priv", "student_priv", "teacher_plain", "reference")
    }
    tensors = dict(
        mask=mask,
        ids=ids,
        teacher=0.7 * torch.randn(ROWS, H, generator=g, dtype=torch.float64),
        embed=0.7 * torch.randn(ROWS, H, generator=g, dtype=torch.float64),
        other=0.7 * torch.randn(ROWS, H, generator=g, dtype=torch.float64),
        proj=torch.randn(H, H, generator=g, dtype=torch.float64) / math.sqrt(H),
    )
    return {**{k: v.to(DEVICE) for k, v in tensors.items()}, "hidden": {k: v.to(DEVICE) for k, v in hidden.items()}}


GROUPS = torch.tensor([0, 0, 1])  # the three responses: two rollouts of one prompt, one of another


def _outcomes(objective):
    """Verdicts for objectives that read them: response 0 right, 1 wrong (the same prompt: uni_opd
    balances them), 2 wrong; teacher verdicts wrong, right, right (trust: verified)."""
    if not objective.response_verdicts:
        return None
    return Outcomes(response=torch.tensor([1, 0, 0]), teacher=torch.tensor([0, 1, 1]), seed=0)


def _loss_and_grads(setup, config, tied, backend, dtype=torch.float64):
    setup = {
        k: v if k in ("mask", "ids") else ({h: x.to(dtype) for h, x in v.items()} if k == "hidden" else v.to(dtype))
        for k, v in setup.items()
    }
    mask, ids = setup["mask"], setup["ids"]
    obj = build_objective(config)
    embed, proj = setup["embed"].clone().requires_grad_(), setup["proj"].clone().requires_grad_()
    head = embed if tied else setup["other"].clone().requires_grad_()
    student_hidden = torch.tanh(embed[ids] @ proj)
    heads = {v: setup["teacher"] if v.startswith("teacher") else head.detach() for v in obj.views}
    if backend == "reference":
        view_logits = {v: setup["hidden"][v] @ heads[v][:VOCAB].T for v in obj.views}
        out = objective_loss(
            obj,
            student_hidden @ head[:VOCAB].T,
            view_logits,
            ids,
            mask,
            vocab_size=VOCAB,
            prune_generator=torch.Generator().manual_seed(0),
            groups=GROUPS,
            outcomes=_outcomes(obj),
        )
        loss, token_loss = out.loss, out.token_loss[mask]
    else:
        flat = ids[mask]
        targets = {v: target_states(setup["hidden"][v][mask], heads[v], flat, VOCAB, chunk_size=4) for v in obj.views}
        signals = obj.token_signals(
            {v: t.token_logprob for v, t in targets.items()}, {v: t.entropy for v, t in targets.items()}
        )
        keys = obj.prune_keys(signals, torch.Generator().manual_seed(0)) if obj.router == "prune" else None
        stats = obj.step_statistics(signals, keys)
        outcomes = _outcomes(obj)
        if outcomes is not None and obj.sampling_logprob:  # uni_opd: l_old, the student's own token log-probs
            s_lp = (student_hidden[mask] @ head[:VOCAB].T).log_softmax(-1).detach()
            outcomes.student_logprob = s_lp.gather(-1, flat[:, None]).squeeze(-1)
            outcomes.target_logprob = targets[obj.routes[0].target].token_logprob
        plan = plan_tokens(obj, mask.sum(-1), signals, stats, keys, GROUPS, outcomes=outcomes)
        route, weight = plan.route, plan.weight
        out = chunked_objective_loss(
            obj,
            student_hidden[mask],
            head,
            flat,
            route,
            weight,
            targets,
            VOCAB,
            chunk_size=5,
            backend=backend,
            target_shift=plan.target_shift,
        )
        loss, token_loss = out.loss, out.token_loss
        s_logp = (student_hidden[mask] @ head[:VOCAB].T).log_softmax(-1)
        assert torch.allclose(out.student_entropy, -(s_logp.exp() * s_logp).sum(-1), rtol=1e-5)
    loss.backward()
    return loss.detach(), token_loss, [embed.grad, proj.grad] + ([] if tied else [head.grad])


CONFIGS = [
    ObjectiveConfig(top_k=16),
    ObjectiveConfig(top_k=16, normalization="token", topk_source="target", js_beta=0.3),
    ObjectiveConfig(
        top_k=16, topk_tail=False, regime_routes={"LL": {"support": "sampled"}, "HT": {"divergence": "fkl"}}
    ),
    ObjectiveConfig(
        top_k=16, regime_routes={"HS": {"enabled": False}, "LH": {"support": "full", "divergence": "js", "weight": 0.9}}
    ),
    ObjectiveConfig(top_k=VOCAB + 5),  # K >= V: the cells are the vocabulary
    ObjectiveConfig(name="vanilla_opd", baseline_support="full"),
    ObjectiveConfig(name="vanilla_opd", baseline_support="sampled"),
    ObjectiveConfig(name="self_distill", top_k=16, baseline_divergence="js"),
    ObjectiveConfig(name="pruned_opd", top_k=16, prune_by="random"),
    ObjectiveConfig(name="eopd", top_k=16),
    ObjectiveConfig(name="eopd", top_k=16, baseline_support="topk"),
    ObjectiveConfig(name="exopd", exopd_lambda=1.5),
    ObjectiveConfig(name="va_opd", top_k=16),
    ObjectiveConfig(top_k=16, trust="verified"),
    ObjectiveConfig(name="uni_opd", uni_margin=3.0),
]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.name}-{c.baseline_support or c.top_k}")
def test_triton_kernels_equal_the_float64_reference(setup, config, tied):
    """float64 in, float64 arithmetic: the kernels' math equals the reference to rounding."""
    ref_loss, ref_tok, ref_grads = _loss_and_grads(setup, config, tied, "reference")
    loss, tok, grads = _loss_and_grads(setup, config, tied, "triton")
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-9)
    assert torch.allclose(tok, ref_tok, rtol=1e-9, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-9 * b.abs().max().item())


@pytest.mark.parametrize("config", CONFIGS[:4] + CONFIGS[9:], ids=lambda c: f"{c.name}-{c.baseline_support or c.top_k}")
def test_triton_kernels_in_fp32_stay_close_to_the_float64_reference(setup, config):
    """fp32 in (as on a GPU after a bf16 matmul, minus bf16's own rounding): fp32 arithmetic."""
    ref_loss, ref_tok, ref_grads = _loss_and_grads(setup, config, False, "reference")
    loss, tok, grads = _loss_and_grads(setup, config, False, "triton", torch.float32)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-4)
    assert torch.allclose(tok.double(), ref_tok, rtol=1e-4, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a.double(), b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


def test_backend_resolution():
    cpu = torch.device("cpu")
    assert triton_available(cpu)  # the interpreter
    assert resolve_loss_backend("auto", cpu) == "torch" and resolve_loss_backend("triton", cpu) == "triton"
    with pytest.raises(ValueError, match="loss_backend"):
        resolve_loss_backend("cuda", cpu)


@pytest.mark.integration
def test_a_training_step_is_the_same_with_either_backend(tmp_path):
    """One step of the Trainer on the tiny models (real Qwen vocabulary) with each backend."""
    from dopd_vl.training.config import load_config
    from dopd_vl.training.trainer import Trainer

    from conftest import REPO

    results = {}
    for backend in ("torch", "triton"):
        config = load_config(
            REPO / "configs" / "tiny_text.yaml",
            [
                f"data.train={REPO / 'configs' / 'data' / 'arith' / 'data.jsonl'}",
                f"output_dir={tmp_path / backend}",
                f"loss_backend={backend}",
                "rollout.max_new_tokens=3",
                "optim.batch_size=1",
                "rollout.num_generations=2",
                "student.dtype=float64",
                "teacher.dtype=float64",
            ],
        )
        trainer = Trainer(config)
        assert trainer.run.backends.loss_backend == backend
        results[backend] = trainer.train_step(sample_step(trainer.run, trainer.step))
    # Random tiny models at the real vocabulary are near-uniform (a loss of ~1e-5 per token), which
    # fp32 cannot resolve to better than ~1%; in float64 both backends agree to rounding.
    for key in ("loss", "grad_norm", "entropy/student", "frac/HT"):
        assert results["triton"][key] == pytest.approx(results["torch"][key], rel=1e-7), key


@pytest.mark.integration
def test_self_check_passes_silently_and_a_sign_error_falls_back_to_the_torch_backend(tmp_path, monkeypatch, caplog):
    """At first use the kernels are checked against the torch path on the run's real output
    embeddings (interpreter here): correct kernels pass without a word; a sign error in their
    gradient makes `auto` fall back to torch with one warning (and `triton` raise), and the run's
    loss is then the torch backend's."""
    import json
    import logging

    import dopd_vl.loss.kernels as kernels
    import dopd_vl.training.run as setup_module
    import dopd_vl.training.trainer as trainer_module
    from dopd_vl.errors import BackendCheckError
    from dopd_vl.training.config import load_config

    from conftest import REPO

    def config(name, *extra):
        return load_config(
            REPO / "configs" / "tiny_text.yaml",
            [
                f"output_dir={tmp_path / name}",
                "max_steps=1",
                "save_steps=10",
                "optim.batch_size=1",
                "rollout.max_new_tokens=3",
                "objective.top_k=16",
                *extra,
            ],
        )

    vanilla = (
        "objective.name=vanilla_opd"  # one route (DOPD's four: test_a_training_step_is_the_same_with_either_backend)
    )
    with caplog.at_level(logging.WARNING):
        trainer = trainer_module.Trainer(config("ok", "loss_backend=triton", vanilla))
    assert (
        trainer.run.backends.loss_backend == "triton"
        and trainer.run.backends.backend_check.passed
        and trainer.run.backends.backend_check.rows == 1
    )
    assert (
        trainer.run.backends.backend_check.max_rel_error < 1e-5
        and [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    )

    real = kernels.routed_chunk_loss
    monkeypatch.setattr(
        kernels, "routed_chunk_loss", lambda *a, **k: (lambda loss, grad, ent: (loss, -grad, ent))(*real(*a, **k))
    )
    with pytest.raises(BackendCheckError, match="differ from the torch path"):
        trainer_module.Trainer(config("explicit", "loss_backend=triton", vanilla))
    monkeypatch.setattr(
        setup_module, "resolve_loss_backend", lambda backend, device: "triton" if backend == "auto" else backend
    )  # as on a GPU
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fallback = trainer_module.Trainer(config("fallback", "loss_backend=auto", vanilla))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert (
        len(warnings) == 1 and "uses the torch backend" in warnings[0] and fallback.run.backends.loss_backend == "torch"
    )
    fallback.train()
    torch_run = trainer_module.Trainer(config("torch", "loss_backend=torch", vanilla))
    torch_run.train()
    first = [
        json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0]) for name in ("fallback", "torch")
    ]
    assert (
        first[0]["loss"] == first[1]["loss"]
        and first[0]["loss_backend/self_check_passed"] == 0.0
        and first[0]["loss_backend/triton"] == 0.0
    )
    info = json.loads((tmp_path / "fallback" / "run.json").read_text())
    assert (
        info["loss_backend"]["requested"] == "auto"
        and info["loss_backend"]["used"] == "torch"
        and info["loss_backend"]["self_check"]["passed"] is False
    )
