"""The trainer end to end on tiny offline models: split invariance (micro-batches and processes),
learning, exact resume after a kill, crash-safe checkpoints, non-finite steps, LoRA, configs, CLI."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dopd_vl.cli import main
from dopd_vl.errors import PREEMPTED_EXIT_CODE, ConfigError
from dopd_vl.method.routing import REGIME_NAMES
from dopd_vl.training.checkpoint import latest_checkpoint
from dopd_vl.training.config import load_config

from conftest import REPO

ARITH = REPO / "configs" / "data" / "arith" / "data.jsonl"
SHAPES = REPO / "configs" / "data" / "shapes" / "data.jsonl"
PYTHON = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def text_config(out: Path, *overrides: str):
    return load_config(REPO / "configs" / "tiny_text.yaml", [f"data.train={ARITH}", f"output_dir={out}", *overrides])


def run_steps(trainer, steps: int) -> list[dict]:
    """The body of Trainer.train without saving: rollout + step, `steps` times."""
    out = []
    for _ in range(steps):
        out.append(trainer.train_step(trainer.sample()))
    return out


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------ split invariance
def test_split_invariance_over_micro_batches_processes_and_shards(tmp_path):
    """One step on 8 fixed responses as 1x8, 4x2 and 2 processes x 2 x 2 (gloo), the last both with
    DDP and with FSDP2 (`parallel: fsdp`): same thresholds, loss and gradients, for sequence and
    token normalisation (float64 models, so rel 1e-5 is about the method, not about float32 matmuls
    of different padded shapes). FSDP also for an untied head and a vision student (with gradient
    checkpointing), a whole (unsharded) teacher, the live student as privileged student and vanilla
    OPD, and AdamW's update applied: the same updated weights (rel 1e-6)."""
    from dopd_vl.models.loading import resolve_model_path

    from helpers.ddp_step import CASES

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
        assert sharded["after"].keys() == ref["after"].keys() and all(
            torch.equal(sharded["before"][k], ref["before"][k]) for k in ref["before"]
        )
        moved = torch.cat([(ref["after"][k] - ref["before"][k]).flatten() for k in ref["after"]])
        apart = torch.cat([(sharded["after"][k] - ref["after"][k]).flatten() for k in ref["after"]])
        assert moved.norm() > 0 and apart.norm() <= 1e-6 * moved.norm(), case  # the update itself agrees to rel 1e-6
    assert results["1x8:ddp"]["text"]["sequence"]["tokens"] == 56
    # The two normalisations are different losses, so the check above compares something real.
    assert results["1x8:ddp"]["text"]["sequence"]["metrics"]["loss"] != pytest.approx(
        results["1x8:ddp"]["text"]["token"]["metrics"]["loss"], rel=1e-3
    )


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
        "max_steps=30",
    )
    trainer = Trainer(config)
    held_out, trainer.records = trainer.records[-8:], trainer.records[:-8]

    def held_out_rkl() -> float:
        return reverse_kl_to_teacher(
            trainer.student,
            trainer.models.teacher,
            trainer.adapters,
            held_out,
            RolloutConfig(num_generations=2, max_new_tokens=8),
            trainer.models.eos_token_ids,
            trainer.vocab_size,
            seed=0,
            suppress_token_ids=trainer.models.suppress_ids,
        )

    before = held_out_rkl()
    metrics = run_steps(trainer, 30)
    after = held_out_rkl()
    assert all(math.isfinite(m["loss"]) for m in metrics) and metrics[-1]["skipped_steps"] == 0
    assert before > 0.01
    assert after <= 0.5 * before, (before, after)


# ------------------------------------------------------------------------- resume after a kill
def _train_cmd(config: Path, *args: str) -> list[str]:
    return [PYTHON, "-m", "dopd_vl.cli", "train", str(config), *args]


def test_resume_after_kill_and_after_sigterm_reproduces_the_straight_run(tmp_path):
    """One process: killed (SIGKILL) after checkpoint-3, resumed, then preempted (SIGTERM: the step in
    progress finishes, a checkpoint is written, exit 75), resumed again: the straight run's steps,
    losses and final weights."""
    common = [f"data.train={ARITH}", "max_steps=6", "save_steps=1", "save_total_limit=2", "optim.lr=1e-3"]
    recipe = REPO / "configs" / "tiny_text.yaml"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = subprocess.run(
        _train_cmd(recipe, *common, f"output_dir={straight}"), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]

    # Kill -9 as soon as checkpoint-3 is complete (the run is then inside step 4 or its checkpoint).
    proc = subprocess.Popen(
        _train_cmd(recipe, *common, f"output_dir={resumed}"),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not (resumed / "checkpoint-3" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before checkpoint-3"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (resumed / "final").exists()
    killed_at = int(latest_checkpoint(resumed, clean=False).name.split("-")[1])

    # Resumed, then SIGTERM once it has logged a step of its own.
    proc = subprocess.Popen(
        _train_cmd(recipe, *common, f"output_dir={resumed}", "--resume"),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_logged_steps(proc, resumed, killed_at + 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert "resumed from" in err
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    step = int(latest_checkpoint(resumed).name.split("-")[1])
    assert (
        killed_at < step < 6
        and f"stopped by a signal after step {step} of 6" in err
        and not (resumed / "final").exists()
    )
    assert [m["step"] for m in read_metrics(resumed)] == list(range(1, step + 1)) and not list(resumed.glob(".tmp-*"))
    done = subprocess.run(
        _train_cmd(recipe, *common, f"output_dir={resumed}", "--resume"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(straight, resumed)


def wait_for_logged_steps(proc, run: Path, steps: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not ((run / "metrics.jsonl").exists() and len(read_metrics(run)) >= steps):
        assert proc.poll() is None and time.time() < deadline, f"the run ended before logging step {steps}"
        time.sleep(0.05)


def assert_same_run(straight: Path, other: Path) -> None:
    """Same steps, same losses, same final weights."""
    a, b = read_metrics(straight), read_metrics(other)
    assert [m["step"] for m in b] == [m["step"] for m in a]
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    wa, wb = load_file(straight / "final" / "model.safetensors"), load_file(other / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_sharded_processes_survive_sigterm_and_sigkill_and_resume_exactly(tmp_path):
    """torchrun, 2 gloo processes, `parallel: fsdp` (sharded checkpoints). SIGTERM to the whole job
    (as a scheduler sends it; torchrun also forwards it to its workers): one preemption, received
    twice, stops both at one step boundary. The resumed run is then killed with SIGKILL after its
    next checkpoint and resumed again: the end equals the uninterrupted run. The sharded checkpoint
    exports on one process to the same weights as the final student; one process resumes it too."""
    recipe = REPO / "configs" / "tiny_text.yaml"
    common = [
        f"data.train={ARITH}",
        "max_steps=5",
        "save_steps=1",
        "save_total_limit=5",
        "optim.lr=1e-3",
        "optim.batch_size=1",
        "rollout.max_new_tokens=4",
        "parallel=fsdp",
        "objective.privileged_student=ema",
    ]  # the EMA copy is sharded state too
    env = {**ENV, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}

    def torchrun(out: Path, port: int, *extra: str) -> list[str]:
        return [
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            "-m",
            "dopd_vl.cli",
            "train",
            str(recipe),
            *common,
            f"output_dir={out}",
            *extra,
        ]

    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    done = subprocess.run(torchrun(straight, 29651), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(
        torchrun(preempted, 29652),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for_logged_steps(proc, preempted, 1)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert err.count("stopped by a signal after step") == 2, err[-3000:]  # both workers, the same step
    step = int(latest_checkpoint(preempted).name.split("-")[1])
    assert 1 <= step <= 3 and f"after step {step} of 5" in err and not (preempted / "final").exists()

    proc = subprocess.Popen(
        torchrun(preempted, 29653, "--resume"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while int(latest_checkpoint(preempted, clean=False).name.split("-")[1]) == step:
        assert proc.poll() is None and time.time() < deadline, (
            f"the resumed run ended before its next checkpoint:\n{read_metrics(preempted)}"
        )
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (preempted / "final").exists()
    shutil.copytree(preempted, tmp_path / "one_process", ignore=shutil.ignore_patterns(".tmp-*"))
    done = subprocess.run(torchrun(preempted, 29654, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(straight, preempted)

    # The last sharded checkpoint, read whole on one process by `dopd export`, is the final student.
    assert main(["export", str(preempted), "--checkpoint", "5", "--out", str(tmp_path / "exported")]) == 0
    final, exported = (
        load_file(preempted / "final" / "model.safetensors"),
        load_file(tmp_path / "exported" / "model.safetensors"),
    )
    assert all(torch.equal(final[k], exported[k]) for k in final)
    # One process resumes a checkpoint two wrote: the shards are re-cut as they load.
    done = subprocess.run(
        _train_cmd(recipe, *common, f"output_dir={tmp_path / 'one_process'}", "--resume"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "written by 2 processes, this run has 1" in done.stderr, done.stderr[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path / "one_process")] == [1, 2, 3, 4, 5]


def test_a_sharded_checkpoint_index_cannot_run_code(tmp_path, tiny_text_dir):
    """torch.distributed.checkpoint pickles its index (.metadata); ours unpickles only its classes."""
    import pickle

    from transformers import AutoModelForCausalLM

    from dopd_vl.errors import CheckpointError
    from dopd_vl.training.checkpoint import load_student_weights

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    (tmp_path / "checkpoint-1" / "sharded").mkdir(parents=True)
    (tmp_path / "checkpoint-1" / "sharded" / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(
        CheckpointError, match=r"\.metadata names posix\.system, which a checkpoint index never holds; refused"
    ):
        load_student_weights(AutoModelForCausalLM.from_pretrained(tiny_text_dir), tmp_path / "checkpoint-1")
    assert not (tmp_path / "ran").exists()


# ---------------------------------------------------------------------- crash while checkpointing
def test_a_checkpoint_write_that_fails_keeps_the_previous_one_and_the_run_resumes(tmp_path, monkeypatch):
    """A full disk while writing checkpoint-2: the run stops naming the path and the free space,
    checkpoint-1 stays (not rotated away by save_total_limit=1, loadable), no partial folder is left,
    and --resume continues from it."""
    import errno

    from transformers import AutoModelForCausalLM

    import dopd_vl.training.checkpoint as checkpoint
    from dopd_vl.errors import CheckpointError
    from dopd_vl.training.trainer import Trainer

    run = tmp_path / "run"
    real_save = torch.save

    def disk_full_at_step_2(obj, path, *args, **kwargs):
        if ".tmp-checkpoint-2" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_full_at_step_2)
    with pytest.raises(CheckpointError) as caught:
        Trainer(text_config(run, "max_steps=3", "save_steps=1", "save_total_limit=1")).train()
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    message = str(caught.value)
    assert f"writing {run / 'checkpoint-2'} failed: No space left on device" in message and "GiB free on" in message
    assert f"the previous checkpoint {run / 'checkpoint-1'} is intact" in message
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == [
        "checkpoint-1"
    ]  # no partial folder, not rotated away
    AutoModelForCausalLM.from_pretrained(run / "checkpoint-1" / "model")

    trainer = Trainer(text_config(run, "max_steps=3", "save_steps=1", "save_total_limit=1"))
    trainer.train(resume=True)
    assert trainer.step == 3 and (run / "checkpoint-3").is_dir()
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]


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
    snapshots = [{k: v.clone() for k, v in trainer.student.state_dict().items()}]
    metrics = []
    for _ in range(3):
        metrics += run_steps(trainer, 1)
        snapshots.append({k: v.clone() for k, v in trainer.student.state_dict().items()})
    changed = [any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(snapshots, snapshots[1:])]
    assert changed == [True, False, True]
    assert [m["skipped_steps"] for m in metrics] == [0, 1, 1]
    assert math.isnan(metrics[1]["loss"]) and math.isfinite(metrics[2]["loss"])
    # Too many in a row stops training with a clear message.
    trainer.config.max_consecutive_skips = 0
    monkeypatch.setattr(loss_module, "chunked_objective_loss", lambda *a, **k: _nan(real_loss(*a, **k)))
    with pytest.raises(trainer_module.TrainingError, match="non-finite steps in a row"):
        run_steps(trainer, 1)


def _nan(out):
    out.loss = out.loss * float("nan")
    return out


# ------------------------------------------------------------------------------------- LoRA
def test_lora_trains_only_adapters_and_initial_is_the_base_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from dopd_vl.modality.batches import build_views
    from dopd_vl.models.loading import output_embedding_weight, resolve_model_path
    from dopd_vl.training.scoring import score_targets, valid_response_states
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
    before = {k: v.clone() for k, v in trainer.student.named_parameters()}
    run_steps(trainer, 2)
    after = dict(trainer.student.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert {k for k, p in after.items() if p.requires_grad} == {k for k in after if "lora_" in k}

    # The privileged student ("initial", adapter disabled) scores exactly like the untouched base model.
    mb = trainer.rollout([0, 1])
    records = [mb.records[i] for i in mb.rollout.record_index]
    views = build_views(trainer.adapters, ("student", "student_priv"), records, mb.rollout.responses)
    targets = score_targets(trainer.models, views)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(trainer.config.student.name_or_path))
    hidden, ids = valid_response_states(base, views["student_priv"])
    logp = (
        (hidden @ output_embedding_weight(base)[: trainer.vocab_size].T).log_softmax(-1).gather(-1, ids[:, None])[:, 0]
    )
    torch.testing.assert_close(targets["student_priv"].token_logprob, logp, rtol=1e-5, atol=1e-5)
    live_hidden, _ = valid_response_states(trainer.student, views["student_priv"])
    assert not torch.allclose(live_hidden, hidden, atol=1e-4)  # the adapters did change the live student


# ------------------------------------------------------------------------------------ configs
def test_config_errors_name_the_key_and_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"objective\.topk.*top_k"):
        load_config(REPO / "configs" / "tiny_text.yaml", ["objective.topk=5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: {name_or_path: x}\nmax_step: 3\n")
    with pytest.raises(ConfigError, match=r"max_step.*max_steps"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"max_steps must be of type int"):
        load_config(REPO / "configs" / "tiny_text.yaml", ["max_steps=ten"])
    with pytest.raises(ConfigError, match=r"optim\.lr must be of type float"):
        load_config(REPO / "configs" / "tiny_text.yaml", ["optim.lr=fast"])
    config = load_config(
        REPO / "configs" / "tiny_text.yaml",
        ["optim.lr=1e-5", "max_steps=7", "lora.enabled=true", "objective.beta_light=0.5"],
    )
    assert (config.optim.lr, config.max_steps, config.lora.enabled, config.objective.beta_light) == (1e-5, 7, True, 0.5)


def test_every_recipe_loads():
    for path in sorted((REPO / "configs").glob("**/*.yaml")):
        if "accelerate" not in path.parts:
            load_config(path)


# -------------------------------------------------------------------------------- dopd train CLI
def test_dopd_train_tiny_vlm_cli(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run = tmp_path / "vlm"
    done = subprocess.run(
        [
            PYTHON,
            "-m",
            "dopd_vl.cli",
            "train",
            str(REPO / "configs" / "tiny_vlm.yaml"),
            f"data.train={SHAPES}",
            f"output_dir={run}",
            "max_steps=2",
            "save_steps=2",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2]
    names = [
        "step",
        "loss",
        "lr",
        "threshold/A",
        "threshold/q_student",
        "threshold/q_teacher",
        "entropy/student",
        "entropy/teacher_priv",
        "response_length",
        "clipped_frac",
        "accuracy",
        "time/rollout",
        "time/scoring",
        "time/loss",
        "tokens_per_s",
        "skipped_steps",
    ]
    names += [f"{k}/{r}" for k in ("frac", "loss", "A") for r in REGIME_NAMES]
    for m in metrics:
        assert set(names) <= set(m), set(names) - set(m)
        assert sum(m[f"frac/{r}"] for r in REGIME_NAMES) == pytest.approx(1.0)
        assert all(math.isfinite(m[k]) for k in names)
    for folder in (run / "checkpoint-2" / "model", run / "final"):
        model = AutoModelForImageTextToText.from_pretrained(folder)
        assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
        assert type(AutoProcessor.from_pretrained(folder)).__name__ == "Qwen3VLProcessor"
