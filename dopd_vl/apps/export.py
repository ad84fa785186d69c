"""Publishing a trained student (`dopd export`, docs/design.md §4.7): a Hugging Face model folder
that plain `transformers` (or `peft`, for an adapter) loads, with a model card saying how it was made.

The folder holds safetensors weights (sharded above 5 GB), config, a generation config whose stop
tokens are the chat template's and which never generates what rollout never samples (lm-head
padding rows, vision special tokens), the tokenizer or processor with its chat template, the run's
recipe (`dopd_recipe.yaml`) and `README.md`: YAML front matter for the Hub, then the method, the
objective settings, teacher, data, steps, final metrics and the command that reproduces the run.
No absolute local path is written: a local model or data path becomes its folder or file name,
and the card says so. The folder appears complete or not at all (built beside, then renamed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import string
import tempfile
from importlib import resources
from pathlib import Path

import yaml

from dopd_vl.errors import ExportError
from dopd_vl.files import created_mode, give_created_modes

__all__ = ["export_student", "run_summary", "model_card", "portable_name", "MAX_SHARD_SIZE"]

logger = logging.getLogger(__name__)

MAX_SHARD_SIZE = "5GB"
CARD_TAGS = ("dopd", "distillation", "on-policy-distillation", "privileged-information")
_RECIPE = "dopd_recipe.yaml"
_RECIPE_HEADER = (
    "# The recipe this student was trained with (`dopd train dopd_recipe.yaml`). Model and data keys name what\n"
    "# the run read: hub ids as they are, local files by their name or their path relative to where the run\n"
    "# ran. Point local ones at your copies (e.g. data.train=PATH) before training.\n"
)


def portable_name(name_or_path: str) -> str:
    """A model or data reference without local paths: hub ids and relative paths unchanged, an
    absolute path reduced to its last component (the card says it was local)."""
    return Path(name_or_path).name if Path(name_or_path).is_absolute() else name_or_path


def export_student(
    run_dir: str | Path,
    out: str | Path,
    *,
    checkpoint: int | None = None,
    adapter: bool = False,
    eval_data: str | Path | None = None,
    eval_limit: int | None = None,
    max_new_tokens: int = 32,
) -> Path:
    """Export RUN_DIR's final student (or checkpoint-N) to `out`; see the module docstring.

    `adapter`: keep the LoRA adapter instead of merging it (from checkpoint N, default the newest).
    `eval_data`: greedy accuracy of the base student and of the export on these records goes into
    the card and `eval_results.json`."""
    from dopd_vl.models.loading import is_vision_model

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose a new --out folder")
    config = run_config(run_dir)
    source = _source_folder(run_dir, config, checkpoint, adapter)
    model, processing = _load_student(config, source)
    _set_publishing_generation_config(model, processing)
    if adapter is False and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    summary = run_summary(run_dir, config, source)
    summary["vision"] = is_vision_model(model)
    if eval_data is not None:
        summary["evaluation"] = _before_after(config, model, processing, eval_data, eval_limit, max_new_tokens)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        if adapter:
            model.save_pretrained(tmp, safe_serialization=True)
            model.get_base_model().generation_config.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
        processing.save_pretrained(tmp)
        _make_portable(tmp, config)
        recipe = _RECIPE_HEADER + yaml.safe_dump(portable_recipe(config), sort_keys=False)
        (tmp / _RECIPE).write_text(recipe, encoding="utf-8")
        if "evaluation" in summary:
            (tmp / "eval_results.json").write_text(json.dumps(summary["evaluation"], indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(summary, adapter=adapter), encoding="utf-8")
        give_created_modes(tmp)
        tmp.chmod(created_mode(directory=True))  # mkdtemp made it 0700
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s to %s", source, out)
    return out


# ------------------------------------------------------------------------------- the run
def run_config(run_dir: Path) -> dict:
    """The run's recipe as trained: RUN_DIR/config.yaml, else the newest checkpoint's."""
    from dopd_vl.training.checkpointing.files import latest_checkpoint

    candidates = [run_dir / "config.yaml"]
    if (newest := latest_checkpoint(run_dir, clean=False)) is not None:
        candidates.append(newest / "config.yaml")
    for path in candidates:
        if path.is_file():
            return yaml.safe_load(path.read_text(encoding="utf-8"))
    raise ExportError(f"{run_dir}: not a run folder of `dopd train` (no config.yaml and no checkpoint)")


def _source_folder(run_dir: Path, config: dict, checkpoint: int | None, adapter: bool) -> Path:
    from dopd_vl.training.checkpointing.files import latest_checkpoint

    if adapter and not config["lora"]["enabled"]:
        raise ExportError(
            f"{run_dir}: --adapter needs a run trained with LoRA (lora.enabled is false); export the full student "
            f"instead"
        )
    if checkpoint is None and not adapter:
        final = run_dir / "final"
        if not (final / "config.json").is_file():
            raise ExportError(f"{run_dir}: no final student (training did not finish); pass --checkpoint N")
        return final
    folder = run_dir / f"checkpoint-{checkpoint}" if checkpoint is not None else latest_checkpoint(run_dir, clean=False)
    if folder is None or not (folder / "model").is_dir():
        raise ExportError(f"{run_dir}: no checkpoint{'' if checkpoint is None else f'-{checkpoint}'} to export")
    return folder / "model"


def _load_student(config: dict, source: Path):
    """The student and its processing from `source`; a LoRA checkpoint goes onto the run's base
    student (merged unless the caller keeps the adapter)."""
    from dopd_vl.models.loading import load_model, load_processing

    if (source / "adapter_config.json").is_file():  # the run's tokenizer / processor is the base student's
        from peft import PeftModel

        base = load_model(config["student"]["name_or_path"], config["student"]["dtype"], device="cpu")
        return PeftModel.from_pretrained(base, str(source)), load_processing(config["student"]["name_or_path"])
    if (source.parent / "sharded").is_dir():  # a `parallel: fsdp` checkpoint: the config here, the weights in shards
        from dopd_vl.models.loading import model_from_config
        from dopd_vl.training.checkpointing.files import load_student_weights

        model = model_from_config(source, _saved_dtype(source) or "float32")
        load_student_weights(model, source.parent)
        return model, load_processing(source)
    return load_model(source, _saved_dtype(source) or "float32"), load_processing(source)


def _saved_dtype(folder: Path) -> str | None:
    config = folder / "config.json"
    if not config.is_file():
        return None
    saved = json.loads(config.read_text(encoding="utf-8"))
    dtype = saved.get("dtype") or saved.get("torch_dtype") or (saved.get("text_config") or {}).get("dtype")
    return dtype if dtype in ("float32", "bfloat16", "float16") else None


def _set_publishing_generation_config(model, processing) -> None:
    """Stop on every end token of the chat template; never generate what rollout never samples, so
    plain `generate` answers as the run's own evaluation does."""
    from dopd_vl.models.loading import eos_token_ids, never_sampled_token_ids, tokenizer_of

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tokenizer = tokenizer_of(processing)
    template_ends = [
        tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>") if t in tokenizer.get_vocab()
    ]
    gen = base.generation_config
    gen.eos_token_id = sorted(set(eos_token_ids(processing, base)) | set(template_ends))
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else gen.eos_token_id[0]
    gen.suppress_tokens = never_sampled_token_ids(processing, base) or None


def run_summary(run_dir: Path, config: dict, source: Path) -> dict:
    """What the card states: the recipe's settings, data sizes, steps and final metrics."""
    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    metrics_path = run_dir / "metrics.jsonl"
    lines = (
        [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if metrics_path.is_file()
        else []
    )
    if source.name == "model":  # a checkpoint: what the run had logged when it was written
        step = json.loads((source.parent / "state.json").read_text(encoding="utf-8"))["step"]
        lines = [m for m in lines if m.get("step", 0) <= step]
    from dopd_vl.method.routing import REGIME_NAMES
    from dopd_vl.version import __version__

    last = lines[-1] if lines else {}
    regimes = (
        {r: sum(m.get(f"frac/{r}", 0.0) for m in lines) / len(lines) for r in REGIME_NAMES}
        if lines and f"frac/{REGIME_NAMES[0]}" in last
        else {}
    )
    return {
        "config": config,
        "versions": info.get("versions", {"dopd_vl": __version__}),
        "train_records": (info.get("data") or {}).get("train_records"),
        "source": "final" if source.name == "final" else source.parent.name,
        "steps": last.get("step", 0),
        "final_metrics": {
            k: last[k]
            for k in ("loss", "entropy/student", "response_length", *(f"frac/{r}" for r in REGIME_NAMES))
            if k in last
        },
        "mean_regime_occupancy": regimes,
        "collapse_alarms": sum(int(m.get("collapse_alarm", 0)) for m in lines),
        "skipped_steps": int(last.get("skipped_steps", 0)),
    }


def portable_recipe(config: dict) -> dict:
    """The run's recipe with absolute local paths reduced to names (`portable_name`)."""
    recipe = json.loads(json.dumps(config))
    for section, key in (("student", "name_or_path"), ("teacher", "name_or_path"), ("data", "train"), ("data", "eval")):
        if recipe.get(section, {}).get(key):
            recipe[section][key] = portable_name(recipe[section][key])
    recipe["output_dir"] = portable_name(recipe.get("output_dir", "runs/dopd"))
    return recipe


def _make_portable(folder: Path, config: dict) -> None:
    """transformers and peft write where a model came from, and that it was loaded offline; keep
    names, not local paths, and drop the offline flags (a Hub user's copy is not local)."""
    base = portable_name(str(config["student"]["name_or_path"]))
    edits = {
        "config.json": {"_name_or_path": None},
        "adapter_config.json": {"base_model_name_or_path": base},
        "tokenizer_config.json": {"is_local": None, "local_files_only": None, "name_or_path": None},
        "processor_config.json": {"is_local": None, "local_files_only": None},
    }
    for name, keys in edits.items():
        path = folder / name
        if not path.is_file():
            continue
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not keys.keys() & saved.keys():
            continue
        for key, value in keys.items():
            if key in saved:
                if value is None:
                    del saved[key]
                else:
                    saved[key] = value
        path.write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------- evaluation
def _before_after(config: dict, model, processing, data: str | Path, limit: int | None, max_new_tokens: int) -> dict:
    """Greedy accuracy (the `dopd eval` path) of the base student and of the exported student."""
    from dopd_vl.data.sources import load_records, records_root
    from dopd_vl.eval.evaluate import EvalConfig, accuracy_report, generate_answers
    from dopd_vl.modality.adapters import make_adapter
    from dopd_vl.models.loading import eos_token_ids, load_model, never_sampled_token_ids

    records = load_records(data)[:limit]
    adapter = make_adapter(processing, image_root=records_root(data))
    results = {"data": portable_name(str(data)), "count": None}
    for label, candidate in (("before", None), ("after", model)):
        if candidate is None:
            candidate = load_model(config["student"]["name_or_path"], config["student"]["dtype"], device="cpu")
        candidate.eval()
        answers = generate_answers(
            candidate,
            adapter,
            records,
            EvalConfig(max_new_tokens=max_new_tokens),
            eos_token_ids(processing, candidate),
            never_sampled_token_ids(processing, candidate),
        )
        report = accuracy_report(records, answers)
        results[label] = {"accuracy": report["accuracy"], "per_type": report["per_type"]}
        results["count"] = report["count"]
    return results


# ------------------------------------------------------------------------------- the card
def model_card(summary: dict, adapter: bool = False) -> str:
    """README.md: Hub front matter, then how the student was made, rendered from the template
    `assets/model_card.md` (each `$name` filled from the run's summary)."""
    config = summary["config"]
    student, teacher = (
        portable_name(config["student"]["name_or_path"]),
        portable_name(config["teacher"]["name_or_path"] or ""),
    )
    vision = bool(summary.get("vision"))
    datasets = [d for d in (config["data"]["train"], config["data"].get("eval")) if d and _looks_like_hub_id(d)]
    front = {
        "library_name": "peft" if adapter else "transformers",
        "base_model": student,
        "pipeline_tag": "image-text-to-text" if vision else "text-generation",
        "tags": [*CARD_TAGS, "qwen3-vl" if vision else "qwen3"],
        **({"datasets": datasets} if datasets else {}),
    }
    objective = config["objective"]
    dopd = objective["name"] == "dopd"
    version = summary["versions"].get("dopd_vl", "?")
    intro = (
        f"A {'Qwen3-VL' if vision else 'Qwen3'} student trained with dopd-vl {version} by on-policy distillation: "
        "the student samples its own answers and minimises a per-token divergence to the teacher, who sees "
        "privileged context the student never has at inference."
    )
    if dopd:
        intro += (
            " DOPD (Dual On-policy Distillation) also scores every token with the student given the same context "
            "and routes each token by the teacher's capability edge to one of four losses."
        )
    local = [
        f"`{key}`"
        for key, value in (
            ("student.name_or_path", config["student"]["name_or_path"]),
            ("teacher.name_or_path", config["teacher"]["name_or_path"]),
            ("data.train", config["data"]["train"]),
            ("data.eval", config["data"].get("eval")),
        )
        if value and not _looks_like_hub_id(str(value)) and not str(value).startswith("tiny:")
    ]
    local_note = (
        f"The run read local files: in the recipe {', '.join(local)} name them as the run did (a folder or file name, "
        "or a path relative to where it ran): point those keys at your copies first.\n\n"
        if local
        else ""
    )
    template = resources.files("dopd_vl").joinpath("assets/model_card.md").read_text(encoding="utf-8")
    return string.Template(template).substitute(
        front=yaml.safe_dump(front, sort_keys=False).strip(),
        title=f"# {student} distilled with {'DOPD' if dopd else objective['name']}",
        intro=intro,
        settings="\n".join(f"| {k} | {v} |" for k, v in _settings(summary, config, student, teacher, adapter).items()),
        recipe=_RECIPE,
        results="\n".join(_results(summary)),
        alarms=summary["collapse_alarms"],
        skipped=summary["skipped_steps"],
        version=version,
        local_note=local_note,
        use="\n".join(_use_code(student, vision, adapter)),
    )


def _settings(summary: dict, config: dict, student: str, teacher: str, adapter: bool) -> dict:
    """The card's "How it was made" table (rows without a value are left out)."""
    objective = config["objective"]
    rows = {
        "objective": objective["name"],
        "teacher": teacher or "(none)",
        "student (base)": student,
        "training data": portable_name(config["data"]["train"])
        + (f" ({summary['train_records']} records)" if summary["train_records"] else ""),
        "privileged student": objective.get("privileged_student"),
        "top-K": objective.get("top_k"),
        "steps": summary["steps"],
        "prompts per step": config["optim"]["batch_size"] * config["optim"]["gradient_accumulation_steps"],
        "responses per prompt": config["rollout"]["num_generations"],
        "max new tokens": config["rollout"]["max_new_tokens"],
        "learning rate": config["optim"]["lr"],
        "LoRA": f"r {config['lora']['r']}, alpha {config['lora']['alpha']}" if config["lora"]["enabled"] else "no",
        "exported from": summary["source"]
        + (" (adapter kept)" if adapter else " (LoRA merged)" if config["lora"]["enabled"] else ""),
    }
    return {k: v for k, v in rows.items() if v is not None}


def _results(summary: dict) -> list[str]:
    """The card's results: accuracy before and after (with --eval-data), the last step, the occupancy."""
    lines = []
    if summary.get("evaluation"):
        ev = summary["evaluation"]
        lines += [
            f"Greedy accuracy on {ev['data']} ({ev['count']} records, no privileged context):",
            "",
            "| | accuracy |",
            "|---|---|",
            f"| base student | {_fmt(ev['before']['accuracy'])} |",
            f"| this student | {_fmt(ev['after']['accuracy'])} |",
            "",
        ]
    else:
        lines += [
            "Not evaluated at export (`dopd export --eval-data EVAL.jsonl` adds greedy accuracy before and after).",
            "",
        ]
    metrics = summary["final_metrics"]
    if metrics:
        lines += ["Last training step: " + ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()) + "."]
    if summary["mean_regime_occupancy"]:
        lines += [
            "",
            "Mean regime occupancy over the run (share of response tokens per DOPD regime): "
            + ", ".join(f"{r} {_fmt(v)}" for r, v in summary["mean_regime_occupancy"].items())
            + ".",
        ]
    return lines


def _use_code(student: str, vision: bool, adapter: bool) -> list[str]:
    """How to load the exported folder."""
    if adapter:
        auto = "AutoModelForImageTextToText" if vision else "AutoModelForCausalLM"
        return [
            "from peft import PeftModel",
            f"from transformers import {auto}, GenerationConfig",
            f"base = {auto}.from_pretrained({student!r})",
            "model = PeftModel.from_pretrained(base, 'THIS_FOLDER')",
            "generation_config = GenerationConfig.from_pretrained('THIS_FOLDER')  # the chat template's stop tokens; "
            "pass it to generate",
        ]
    if vision:
        return [
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            "model = AutoModelForImageTextToText.from_pretrained('THIS_FOLDER')",
            "processor = AutoProcessor.from_pretrained('THIS_FOLDER')",
        ]
    return [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained('THIS_FOLDER')",
        "tokenizer = AutoTokenizer.from_pretrained('THIS_FOLDER')",
    ]


def _looks_like_hub_id(name: str) -> bool:
    """`org/name` that is no local path nor a data file (`Qwen/Qwen3-1.7B` is an id despite its dot)."""
    files = (".jsonl", ".json", ".parquet", ".arrow", ".yaml", ".txt")
    return (
        name.count("/") == 1
        and not Path(name).exists()
        and not name.startswith((".", "/"))
        and Path(name).suffix.lower() not in files
    )


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
