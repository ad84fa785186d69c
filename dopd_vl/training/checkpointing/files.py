"""Checkpoints that survive crashes (docs/design.md §4.6).

A checkpoint is written into `.tmp-checkpoint-N` and renamed to `checkpoint-N` only when every
file is on disk, so a crash while writing leaves the previous checkpoint untouched and the
partial folder is ignored (and cleaned up) on resume. Contents:

    model/            save_pretrained (safetensors; a peft adapter under LoRA) + tokenizer/processor
    optimizer.pt      optimizer state          scheduler.pt   scheduler state
    sharded/          `parallel: fsdp` instead of model weights and optimizer.pt: every process's
                      shards of the student, its optimizer state and the EMA copy
                      (torch.distributed.checkpoint, tensors only), and model/ holds the config
    optimizer_groups.json   the optimizer's hyperparameters (fsdp)
    rng.pt            python / numpy / torch (+ cuda) RNG states
    extra.safetensors tensors of other state (the EMA privileged student)
    state.json        step and counters         config.yaml   the run's config

Everything is loaded with `torch.load(weights_only=True)` or safetensors; the sharded files'
index (torch.distributed.checkpoint's pickled `.metadata`) through an unpickler that builds only
its own metadata classes, and a non-tensor item is refused.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from dopd_vl.errors import CheckpointError, ConfigError, RunExistsError
from dopd_vl.models.folders import save_model_folder

__all__ = [
    "RUN_FILES",
    "run_files",
    "check_new_run",
    "remove_run",
    "save_checkpoint",
    "new_checkpoint_folder",
    "save_sharded_state",
    "load_sharded_state",
    "latest_checkpoint",
    "load_checkpoint_state",
    "load_student_weights",
    "rng_state",
    "set_rng_state",
]

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^checkpoint-(\d+)$")


RUN_FILES = ("metrics.jsonl", "run.json", "config.yaml", "final", "skipped.jsonl", "teacher_verdicts.jsonl")
"""What a run writes into its output_dir besides `checkpoint-N` (and partial `.tmp-checkpoint-N`)
folders and `skipped.rankN.jsonl`: what `--overwrite` removes, and what marks a folder as a run's."""


def run_files(output_dir: str | Path) -> list[Path]:
    """The files and folders an earlier run left in `output_dir`, sorted (none for a new folder)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [output_dir / name for name in RUN_FILES if (output_dir / name).exists()]
    found += [p for p in output_dir.iterdir() if _NAME.match(p.name) or p.name.startswith(".tmp-checkpoint-")]
    found += list(output_dir.glob("skipped.rank*.jsonl"))
    return sorted(set(found))


def check_new_run(output_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """A run never overwrites another: without `resume` or `overwrite`, an output_dir holding a
    run's checkpoints, final student or metrics is refused, naming what it holds and both options."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output_dir and --overwrite removes it: pass one of them")
    marks = [p.name for p in run_files(output_dir) if p.name in ("metrics.jsonl", "final") or _NAME.match(p.name)]
    if marks and not (resume or overwrite):
        shown = ", ".join(marks[:4]) + (f" and {len(marks) - 4} more" if len(marks) > 4 else "")
        raise RunExistsError(
            f"output_dir {output_dir} already holds a run ({shown}): add --resume to continue it, or --overwrite "
            "to remove its files and start over (or set output_dir=... to train elsewhere)"
        )


def remove_run(output_dir: str | Path) -> list[Path]:
    """`--overwrite`: the earlier run's files (`run_files`) removed, nothing else in the folder; what
    was removed."""
    removed = run_files(output_dir)
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


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
    sharded: bool = False,
) -> Path:
    """Write checkpoint-`step` atomically and keep the newest `keep` checkpoints. `sharded`: every
    process has already written the student and optimizer into the folder `new_checkpoint_folder`
    made (`save_sharded_state`); the rest is written here, on the main process."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    try:
        if not sharded:
            new_checkpoint_folder(output_dir, step)
            save_model_folder(model, processing, tmp / "model")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        else:  # the config and processing, so that `dopd export --checkpoint N` can rebuild the model
            model.config.save_pretrained(tmp / "model")
            processing.save_pretrained(tmp / "model")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        if extra_tensors:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in extra_tensors.items()}, str(tmp / "extra.safetensors")
            )
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}))
        _fsync_tree(tmp)
    except (
        Exception
    ) as err:  # a full disk (ENOSPC), a failing filesystem (EIO); torch.save reports them as RuntimeError
        # Stop rather than rotate old checkpoints to make room: rotation could delete the last good one.
        # (A programming error lands here too; the chained cause keeps its traceback.)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_write_failure(output_dir, final, err)) from err
    if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(_checkpoints(output_dir))[:-keep] if keep > 0 else []:
        # Renamed first, so a kill mid-delete leaves a partial `.tmp-` folder (removed by the next
        # `latest_checkpoint`), never a half-deleted folder that still reads as checkpoint-N.
        doomed = output_dir / f".tmp-checkpoint-{old}"
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(output_dir / f"checkpoint-{old}", doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    logger.info("saved %s", final)
    return final


def new_checkpoint_folder(output_dir: str | Path, step: int) -> Path:
    """An empty `.tmp-checkpoint-N` (a leftover of an interrupted save is removed first)."""
    tmp = Path(output_dir) / f".tmp-checkpoint-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_sharded_state(folder: Path, model, optimizer, frozen: dict | None = None, main: bool = True) -> None:
    """Every process writes its shards of `model` (the student), its optimizer state and the
    `frozen` sharded models (e.g. {"ema": model}) into folder/sharded (a collective); the main
    process also writes the optimizer's hyperparameters as JSON. Only tensors are stored (DCP's own
    index is a pickle, read back with `_safe_reader`)."""
    import torch.distributed.checkpoint as dcp

    state, groups = _sharded_state(model, optimizer, frozen)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder / "sharded")))
    if main:
        (folder / "optimizer_groups.json").write_text(json.dumps(groups))


def load_sharded_state(checkpoint: str | Path, model, optimizer, frozen: dict | None = None) -> None:
    """The student's shards, optimizer state and frozen models from checkpoint/sharded into this
    run's sharded models (a collective). torch.distributed.checkpoint reshards as it reads, so the
    number of processes may differ from the run that wrote it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    checkpoint = Path(checkpoint)
    state, _ = _sharded_state(model, optimizer, frozen)  # this run's tensors, filled in place
    _read_shards(state, checkpoint)
    groups = json.loads((checkpoint / "optimizer_groups.json").read_text())
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict={"state": state["optimizer"], "param_groups": groups},
    )
    for k, m in (frozen or {}).items():
        set_model_state_dict(m, state[k])


def _sharded_state(model, optimizer, frozen: dict | None) -> tuple[dict, list]:
    """({"model", "optimizer" (its per-parameter tensors), *frozen}, the optimizer's param groups);
    a fresh optimizer's state is created first, so that a load has tensors to read into."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {
        "model": model_state,
        "optimizer": optimizer_state["state"],
        **{k: get_model_state_dict(m) for k, m in (frozen or {}).items()},
    }
    return state, optimizer_state["param_groups"]


def _safe_metadata_classes() -> dict[tuple[str, str], object]:
    import torch.distributed.checkpoint.filesystem as filesystem
    import torch.distributed.checkpoint.metadata as metadata

    allowed = {
        ("torch.distributed.checkpoint.metadata", n): getattr(metadata, n)
        for n in dir(metadata)
        if isinstance(getattr(metadata, n), type)
    }
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a layout by name
    allowed[("pathlib", "PosixPath")] = __import__("pathlib").PosixPath  # the checkpoint id
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = getattr(torch, name)
    allowed.update(
        {
            ("builtins", n): getattr(__import__("builtins"), n)
            for n in ("set", "frozenset", "slice", "tuple", "list", "dict")
        }
    )
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    return allowed


def _read_shards(state: dict, checkpoint: Path, one_process: bool = False) -> None:
    """torch.distributed.checkpoint's load of checkpoint/sharded into `state` (tensors only, the
    index unpickled safely); any failure is a CheckpointError naming the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader, refused = _safe_reader(str(checkpoint / "sharded"))
    try:
        with warnings.catch_warnings():  # one process: "torch.distributed is ... uninitialized" is the point
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=reader, planner=_tensors_only_planner(refused), no_dist=one_process)
    except (Exception, CheckpointException) as err:  # DCP reports a missing key or a shape mismatch in many ways
        if refused:
            raise refused[0] from None
        raise CheckpointError(
            f"{checkpoint}: the sharded state does not fit this run's student ({type(err).__name__}: {str(err)[:300]})"
        ) from err


def _safe_reader(path: str):
    """torch.distributed.checkpoint's file reader whose `.metadata` unpickler builds only the
    checkpoint metadata classes (the default one runs any pickle); and the list its refusals go to."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader

    refused: list[CheckpointError] = []

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            allowed = _safe_metadata_classes()

            class Unpickler(pickle.Unpickler):
                def find_class(self, module: str, name: str):
                    if (module, name) not in allowed:
                        refused.append(
                            CheckpointError(
                                f"{path}/.metadata names {module}.{name}, which a checkpoint index never holds; refused"
                            )
                        )
                        raise refused[-1]
                    return allowed[(module, name)]

            with open(os.path.join(path, ".metadata"), "rb") as f:
                metadata = Unpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path), refused


def _tensors_only_planner(refused: list):
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorsOnly(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):  # the default unpickles them (torch.load, weights_only=False)
            refused.append(
                CheckpointError(
                    f"the sharded checkpoint holds a non-tensor item {read_item.dest_index.fqn!r}; only tensors are "
                    f"read"
                )
            )
            raise refused[-1]

    return TensorsOnly()


def _write_failure(output_dir: Path, target: Path, err: Exception) -> str:
    """What a failed checkpoint write says: the path, why, the free space, and what is still safe."""
    try:
        free = f"{shutil.disk_usage(output_dir).free / 2**30:.2f} GiB free on {output_dir}"
    except OSError:
        free = f"the free space on {output_dir} could not be read"
    previous = latest_checkpoint(output_dir, clean=False)
    kept = (
        f"the previous checkpoint {previous} is intact (resume from it with --resume)"
        if previous
        else "no earlier checkpoint exists"
    )
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
    """Restore optimizer (None: a sharded checkpoint's, see `load_sharded_state`), scheduler and RNG
    states; returns (state.json, extra tensors)."""
    path = Path(path)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    extra = load_file(str(path / "extra.safetensors")) if (path / "extra.safetensors").exists() else {}
    return json.loads((path / "state.json").read_text()), extra


def load_student_weights(model, checkpoint: str | Path, lora: bool = False) -> None:
    """The checkpoint's student weights into `model` (a peft adapter under LoRA); tied output
    embeddings may be absent from the file. A mismatch is a CheckpointError naming the checkpoint."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "sharded").is_dir():  # `parallel: fsdp`: the shards read whole, on this one process
        state = {"model": dict(model.state_dict())}
        _read_shards(state, checkpoint, one_process=True)
        model.load_state_dict(state["model"])
        model.tie_weights()
        return
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
        raise CheckpointError(
            f"{checkpoint}: weights do not match the student (missing {sorted(set(missing) - tied)[:3]}, unexpected "
            f"{unexpected[:3]})"
        )
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
