"""The trainer end to end on tiny offline models: split invariance (micro-batches, processes and
shards), learning, non-finite steps, LoRA."""

import math
import subprocess

import pytest
import torch

from dopd_vl.method.routing import REGIME_NAMES
from dopd_vl.training.config import load_config

from conftest import REPO
from helpers.runs import ENV, PYTHON, run_steps, text_config


# ------------------------------------------------------------------------------ split invariance
@pytest.mark.integration
def test_split_invariance_over_micro_batches_processes_and_shards(tmp_path):
    """One step on 8 fixed responses as 1x8, 4x2 and 2 processes x 2 x 2 (gloo), the last both with
    DDP and with FSDP2 (`parallel: fsdp`): same thresholds, loss and gradients, for sequence and
    token normalisation (float64 models, so rel 1e-5 is about the method, not about float32 matmuls
    of different padded shapes). FSDP also for an untied head and a vision student (with gradient
    checkpointing), a whole (unsharded) teacher, the live student as privileged student and vanilla
    OPD, and AdamW's update applied: the same updated weights (rel 1e-6). Embedding-sized tensors
    travel as count sketches (helpers/ddp_step.py `compact`; checked here to measure a difference's norm)."""
    from dopd_vl.models.loading import resolve_model_path

    from helpers.ddp_step import CASES, compact

    a = torch.randn(2_000_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    b = a + 1e-5 * torch.randn(a.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sketched = (compact("w", b) - compact("w", a)).norm() / compact("w", a).norm()
    assert sketched == pytest.approx(((b - a).norm() / a.norm()).item(), rel=0.05)

    cases = ("text", "text_untied", "text_vanilla", "vision")  # not text_kernels: the Triton interpreter takes minutes
    for recipe, overrides in (CASES[c] for c in cases):  # build every tiny model once, before two processes race for it
        config = load_config(REPO / "configs" / recipe, [o for o in overrides if o.startswith("student.")])
        for spec in (config.student.name_or_path, config.teacher.name_or_path):
            resolve_model_path(spec)
    helper = str(REPO / "tests" / "helpers" / "ddp_step.py")
    norms, every = "sequence,token", "+".join(cases)
    runs = {  # one launch per process count
        "one": [PYTHON, helper, norms, str(tmp_path / "one.pt"), "--jobs", f"1x8:ddp:{every},4x2:ddp:text", "--update"],
        "two": [
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29631",
            helper,
            norms,
            str(tmp_path / "two.pt"),
            "--jobs",
            f"2x2x2:ddp:text,2x2x2:fsdp:{every}",
            "--update",
        ],
    }
    for name, cmd in runs.items():
        done = subprocess.run(
            cmd,
            env={**ENV, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"{name}:\n{done.stderr[-3000:]}"
    results = {}
    for name in runs:
        results.update(torch.load(tmp_path / f"{name}.pt", weights_only=True))
    for case in cases:
        for norm in norms.split(","):
            ref = results["1x8:ddp"][case][norm]
            assert case == "text_vanilla" or ref["metrics"]["frac/HT"] > 0
            ref_grad = torch.cat([g.flatten() for g in ref["grads"].values()])
            assert ref_grad.norm() > 0
            for name in ("4x2:ddp", "2x2x2:ddp", "2x2x2:fsdp") if case == "text" else ("2x2x2:fsdp",):
                other = results[name][case][norm]
                routed = (
                    "threshold/A",
                    "threshold/q_student",
                    "threshold/q_teacher",
                    *(f"frac/{r}" for r in REGIME_NAMES),
                )
                for key in ("loss", *(routed if case != "text_vanilla" else ())):
                    assert other["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-5, abs=1e-12), (
                        case,
                        norm,
                        name,
                        key,
                    )
                assert other["grads"].keys() == ref["grads"].keys()
                grad = torch.cat([other["grads"][k].flatten() for k in ref["grads"]])
                assert (grad - ref_grad).norm() / ref_grad.norm() < 1e-5, (case, norm, name)
        # Each output embedding is gathered once per micro-batch at most, never per loss chunk (5 tokens
        # here): the student's for each of its 2 micro-batches, the frozen models' once per step.
        steps = len(norms.split(","))
        # text_untied: teacher.shard=false (a whole copy per process) and the live student as privileged student (no
        # copy);
        # text_vanilla: vanilla OPD never scores student_priv, so its frozen privileged copy is never gathered.
        teacher, privileged = {"text_untied": (0, 0), "text_vanilla": (steps, 0)}.get(case, (steps, steps))
        assert results["2x2x2:fsdp"][case]["root_gathers"] == {
            "student": 2 * steps,
            "teacher": teacher,
            "privileged_student": privileged,
        }, case
        ref, sharded = results["1x8:ddp"][case]["update"], results["2x2x2:fsdp"][case]["update"]
        assert sharded["after"].keys() == ref["after"].keys() and sharded["before_sha256"] == ref["before_sha256"]
        moved = torch.cat([(ref["after"][k] - ref["before"][k]).flatten() for k in ref["after"]])
        apart = torch.cat([(sharded["after"][k] - ref["after"][k]).flatten() for k in ref["after"]])
        assert moved.norm() > 0 and apart.norm() <= 1e-6 * moved.norm(), case  # the update itself agrees to rel 1e-6
    assert results["1x8:ddp"]["text"]["sequence"]["tokens"] == 56
    # The two normalisations are different losses, so the check above compares something real.
    assert results["1x8:ddp"]["text"]["sequence"]["metrics"]["loss"] != pytest.approx(
        results["1x8:ddp"]["text"]["token"]["metrics"]["loss"], rel=1e-3
    )


@pytest.mark.integration
def test_va_opd_is_split_invariant(tmp_path):
    """VA-OPD's group means use the step's group sizes and its rollout weights the rollouts of one
    prompt (one micro-batch): 1x8 and 4x2 give the same step."""
    helper = str(REPO / "tests" / "helpers" / "ddp_step.py")
    done = subprocess.run(
        [
            PYTHON,
            helper,
            "sequence",
            str(tmp_path / "va.pt"),
            "--jobs",
            "1x8:ddp:text,4x2:ddp:text",
            "--objective",
            "va_opd",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(tmp_path / "va.pt", weights_only=True)
    ref, other = results["1x8:ddp"]["text"]["sequence"], results["4x2:ddp"]["text"]["sequence"]
    assert 0 < ref["metrics"]["frac/high_visual_advantage"] < 1
    for key in ("loss", "threshold/visual_advantage", "frac/high_visual_advantage"):
        assert other["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-5, abs=1e-12), key
    ref_grad = torch.cat([g.flatten() for g in ref["grads"].values()])
    grad = torch.cat([other["grads"][k].flatten() for k in ref["grads"]])
    assert ref_grad.norm() > 0 and (grad - ref_grad).norm() / ref_grad.norm() < 1e-5


# ----------------------------------------------------------------------------------- learning
@pytest.mark.integration
def test_vanilla_opd_halves_held_out_reverse_kl(tmp_path):
    from dopd_vl.eval.evaluate import reverse_kl_to_teacher
    from dopd_vl.training.rollout import RolloutConfig
    from dopd_vl.training.trainer import Trainer

    config = text_config(
        tmp_path / "run",
        "objective.name=vanilla_opd",
        "objective.baseline_support=full",
        "optim.lr=1e-3",
        "optim.batch_size=4",
        "max_steps=12",
    )
    trainer = Trainer(config)
    run = trainer.run
    held_out, run.data.records = run.data.records[-8:], run.data.records[:-8]

    def held_out_rkl() -> float:
        return reverse_kl_to_teacher(
            run.models.student,
            run.models.teacher,
            run.data.adapters,
            held_out,
            RolloutConfig(num_generations=2, max_new_tokens=8),
            run.models.eos_token_ids,
            run.models.vocab_size,
            seed=0,
            suppress_token_ids=run.models.suppress_ids,
        )

    before = held_out_rkl()
    metrics = run_steps(trainer, 12)  # 10 steps already reach a third of the start
    after = held_out_rkl()
    assert all(math.isfinite(m["loss"]) for m in metrics) and metrics[-1]["skipped_steps"] == 0
    assert before > 0.01
    assert after <= 0.5 * before, (before, after)


# ----------------------------------------------------------------------------- non-finite steps
def test_injected_non_finite_loss_skips_exactly_that_step(tmp_path, monkeypatch):
    import dopd_vl.training.routed_loss as loss_module  # RoutedLoss calls the chunked loss from here
    import dopd_vl.training.trainer as trainer_module

    trainer = trainer_module.Trainer(text_config(tmp_path / "run", "max_steps=3"))
    real_loss = loss_module.chunked_objective_loss

    def poisoned(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        if trainer.step == 1:  # the second step
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(loss_module, "chunked_objective_loss", poisoned)
    snapshots = [{k: v.clone() for k, v in trainer.run.models.student.state_dict().items()}]
    metrics = []
    for _ in range(3):
        metrics += run_steps(trainer, 1)
        snapshots.append({k: v.clone() for k, v in trainer.run.models.student.state_dict().items()})
    changed = [any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(snapshots, snapshots[1:])]
    assert changed == [True, False, True]
    assert [m["skipped_steps"] for m in metrics] == [0, 1, 1]
    assert math.isnan(metrics[1]["loss"]) and math.isfinite(metrics[2]["loss"])
    # Too many in a row stops training with a clear message.
    trainer.run.config.max_consecutive_skips = 0
    monkeypatch.setattr(loss_module, "chunked_objective_loss", lambda *a, **k: _nan(real_loss(*a, **k)))
    with pytest.raises(trainer_module.TrainingError, match="non-finite steps in a row"):
        run_steps(trainer, 1)


def _nan(out):
    out.loss = out.loss * float("nan")
    return out


# ------------------------------------------------------------------------------------- LoRA
def test_lora_trains_only_adapters_and_initial_is_the_base_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from dopd_vl.modality.batches import build_views, valid_response_states
    from dopd_vl.models.loading import output_embedding_weight, resolve_model_path
    from dopd_vl.training.step import sample_micro_batch, score_targets
    from dopd_vl.training.trainer import Trainer

    trainer = Trainer(
        text_config(
            tmp_path / "run",
            "lora.enabled=true",
            "lora.r=4",
            "objective.privileged_student=initial",
            "optim.lr=1e-2",
            "max_steps=2",
        )
    )
    run = trainer.run
    before = {k: v.clone() for k, v in run.models.student.named_parameters()}
    run_steps(trainer, 2)
    after = dict(run.models.student.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert {k for k, p in after.items() if p.requires_grad} == {k for k in after if "lora_" in k}

    # The privileged student ("initial", adapter disabled) scores exactly like the untouched base model.
    mb = sample_micro_batch(run, [0, 1], trainer.step)
    records = [mb.records[i] for i in mb.rollout.record_index]
    views = build_views(run.data.adapters, ("student", "student_priv"), records, mb.rollout.responses)
    targets = score_targets(run.models, views)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(run.config.student.name_or_path))
    hidden, ids = valid_response_states(base, views["student_priv"])
    vocab_size = run.models.vocab_size
    logp = (hidden @ output_embedding_weight(base)[:vocab_size].T).log_softmax(-1).gather(-1, ids[:, None])[:, 0]
    torch.testing.assert_close(targets["student_priv"].token_logprob, logp, rtol=1e-5, atol=1e-5)
    live_hidden, _ = valid_response_states(run.models.student, views["student_priv"])
    assert not torch.allclose(live_hidden, hidden, atol=1e-4)  # the adapters did change the live student
