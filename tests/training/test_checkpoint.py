"""Checkpoints: exact resume after a kill or SIGTERM (one process and two sharded ones), an index
that cannot run code, and a failed write that keeps the previous checkpoint."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dopd_vl.cli import main
from dopd_vl.errors import PREEMPTED_EXIT_CODE
from dopd_vl.training.checkpointing.files import latest_checkpoint

from conftest import REPO
from helpers.runs import ARITH, ENV, PYTHON, read_metrics, text_config

pytestmark = pytest.mark.integration  # see pyproject.toml's markers


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder`, by relative path."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------- a run never overwrites a run
def test_a_second_train_into_a_finished_run_is_refused_and_overwrite_starts_over(tmp_path, capsys):
    run = tmp_path / "run"
    recipe = REPO / "configs" / "tiny_text.yaml"
    args = ["train", str(recipe), f"data.train={ARITH}", f"output_dir={run}", "max_steps=2", "save_steps=1"]
    args += ["rollout.max_new_tokens=3", "optim.batch_size=1"]
    assert main(args) == 0
    said = capsys.readouterr().out  # the end of a run: where the student is, the last step, what next
    assert f"trained student saved to {run / 'final'}" in said and "last step 2: loss " in said
    assert f"next: dopd plot {run}" in said and f"dopd export {run} --out EXPORT_DIR" in said
    finished = file_hashes(run)
    assert main(args) == 1
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dopd train:")]
    assert len(said) == 1 and str(run) in said[0] and "--resume" in said[0] and "--overwrite" in said[0], said
    assert file_hashes(run) == finished  # byte-identical: nothing was loaded or written
    (run / "notes.txt").write_text("the user's own file")
    assert main([*args, "--overwrite"]) == 0  # the earlier run's files go first: the metrics never mix
    assert [m["step"] for m in read_metrics(run)] == [1, 2]
    assert (run / "notes.txt").read_text() == "the user's own file"  # only the run's files are removed
    assert main([*args, "--resume", "--overwrite"]) == 1  # one or the other


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
    # stderr is not a terminal here (a CI log, a nohup file): plain lines, no carriage returns, and
    # every log line on a line of its own, none glued to a progress bar.
    lines = done.stderr.splitlines()
    assert "\r" not in done.stderr and any(line.startswith("dopd:") and "6/6" in line for line in lines)
    saved = [line for line in lines if "saved" in line and "checkpoint-" in line]
    assert len(saved) == 6 and all(line.startswith("INFO dopd_vl.training.checkpointing") for line in saved)

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


def wait_until_gone(group: int, timeout: float = 30) -> None:
    """Until no process of the group is left (SIGKILL is delivered, not awaited, to each of them)."""
    deadline = time.time() + timeout
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        assert time.time() < deadline, f"process group {group} still alive {timeout} s after SIGKILL"
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
        "save_total_limit=2",
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
    # A second run into the finished folder, without --resume or --overwrite: both processes refuse
    # before loading anything, and not a byte of the first run changes.
    finished = file_hashes(straight)
    done = subprocess.run(torchrun(straight, 29655), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and done.stderr.count("already holds a run") == 2, done.stderr[-3000:]
    assert file_hashes(straight) == finished
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
    wait_until_gone(proc.pid)  # torchrun's workers too: one still rotating checkpoints would race the copy below
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
    from dopd_vl.training.checkpointing.files import load_student_weights

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

    import dopd_vl.training.checkpointing.files as checkpoint
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


def test_a_kill_while_rotating_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """Killed while rotation deletes checkpoint-1 (after one file went): the listing never shows a
    half-deleted checkpoint-1 (it was renamed to a partial `.tmp-` folder first), the next resume
    removes the leftover and continues from checkpoint-2."""
    import dopd_vl.training.checkpointing.files as checkpoint
    from dopd_vl.training.trainer import Trainer

    class Killed(BaseException):
        pass

    run, real_rmtree = tmp_path / "run", shutil.rmtree

    def killed_mid_delete(path, *args, **kwargs):
        path = Path(path)
        if (path / "state.json").is_file() and json.loads((path / "state.json").read_text())["step"] == 1:
            (path / "state.json").unlink()
            raise Killed
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(Killed):
        Trainer(text_config(run, "max_steps=3", "save_steps=1", "save_total_limit=1")).train()
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == [".tmp-checkpoint-1", "checkpoint-2"]
    trainer = Trainer(text_config(run, "max_steps=3", "save_steps=1", "save_total_limit=1"))
    trainer.train(resume=True)
    assert trainer.step == 3 and sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]
