"""Checkpoints that survive crashes (docs/design.md §4.6).

A checkpoint is written into `.tmp-checkpoint-N` and renamed to `checkpoint-N` only when every
file is on disk, so a crash while writing leaves the previous checkpoint untouched and the
partial folder is ignored (and cleaned up) on resume. Contents:

    model/            save_pretrained (safetensors; a peft adapter under LoRA) + tokenizer/processor
    optimizer.pt      optimizer state          scheduler.pt   scheduler state
    rng.pt            python / numpy / torch (+ cuda) RNG states
    extra.safetensors tensors of other state (the EMA privileged student)
    state.json        step and counters         config.yaml   the run's config

Everything is loaded with `torch.load(weights_only=True)` or safetensors.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from dopd_vl.errors import DopdError
from dopd_vl.models import save_model_folder

__all__ = ["CheckpointError", "save_checkpoint", "latest_checkpoint", "load_checkpoint_state", "load_student_weights", "rng_state", "set_rng_state"]

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(DopdError):
    """A checkpoint that cannot be loaded into this run."""


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_lists(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(_numpy_state_from_lists(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model,
    processing,
    optimizer,
    scheduler,
    state: dict,
    config: dict,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint-`step` atomically and keep the newest `keep` checkpoints."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_model_folder(model, processing, tmp / "model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        if extra_tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in extra_tensors.items()}, str(tmp / "extra.safetensors"))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}))
        _fsync_tree(tmp)
    except Exception as err:  # a full disk (ENOSPC), a failing filesystem (EIO); torch.save reports them as RuntimeError
        # Stop rather than rotate old checkpoints to make room: rotation could delete the last good one.
        # (A programming error lands here too; the chained cause keeps its traceback.)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_write_failure(output_dir, final, err)) from err
    if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(_checkpoints(output_dir))[:-keep] if keep > 0 else []:
        shutil.rmtree(output_dir / f"checkpoint-{old}", ignore_errors=True)
    logger.info("saved %s", final)
    return final


def _write_failure(output_dir: Path, target: Path, err: Exception) -> str:
    """What a failed checkpoint write says: the path, why, the free space, and what is still safe."""
    try:
        free = f"{shutil.disk_usage(output_dir).free / 2**30:.2f} GiB free on {output_dir}"
    except OSError:
        free = f"the free space on {output_dir} could not be read"
    previous = latest_checkpoint(output_dir, clean=False)
    kept = f"the previous checkpoint {previous} is intact (resume from it with --resume)" if previous else "no earlier checkpoint exists"
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return f"writing {target} failed: {reason} ({free}); {kept}; free space or move output_dir, then resume"


def latest_checkpoint(output_dir: str | Path, clean: bool = True) -> Path | None:
    """The newest complete checkpoint; partial `.tmp-*` folders are removed when `clean` (a reader
    of a run that may still be training, such as `dopd export`, passes False)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    for partial in output_dir.glob(".tmp-checkpoint-*") if clean else ():
        logger.warning("removing the partial checkpoint %s left by an interrupted save", partial)
        shutil.rmtree(partial, ignore_errors=True)
    steps = _checkpoints(output_dir)
    return output_dir / f"checkpoint-{max(steps)}" if steps else None


def load_checkpoint_state(path: str | Path, optimizer, scheduler) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore optimizer, scheduler and RNG states; returns (state.json, extra tensors)."""
    path = Path(path)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    extra = load_file(str(path / "extra.safetensors")) if (path / "extra.safetensors").exists() else {}
    return json.loads((path / "state.json").read_text()), extra


def load_student_weights(model, checkpoint: str | Path, lora: bool = False) -> None:
    """The checkpoint's student weights into `model` (a peft adapter under LoRA); tied output
    embeddings may be absent from the file. A mismatch is a CheckpointError naming the checkpoint."""
    checkpoint = Path(checkpoint)
    weights = {}
    for file in sorted((checkpoint / "model").glob("*.safetensors")):
        weights.update(load_file(str(file)))
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, weights)
        return
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(model.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{checkpoint}: weights do not match the student (missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()


def _checkpoints(output_dir: Path) -> list[int]:
    return [int(m.group(1)) for p in output_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def _numpy_state_to_lists(state) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _numpy_state_from_lists(state):
    name, keys, pos, has_gauss, cached = state
    return (name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached)
