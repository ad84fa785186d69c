"""The demo's scene task (`dopd demo`, examples/visual_privilege): generated scenes built into a
grounding dataset, split by image, tiny models warmed up on its answers, held-out accuracy. Small
helpers over the public pieces (the grounding builder, `supervised_finetune`, `generate_answers`)
that the demo and the visual example share."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["make_demo_dataset", "split_by_image", "finetune_model", "heldout_accuracy"]


def make_demo_dataset(root: Path, num_images: int = 4, seed: int = 0) -> Path:
    """Generated scenes -> COCO JSON -> the real grounding builder -> root/data.jsonl."""
    from data_builders.grounding import build_grounding, load_annotations
    from data_builders.synthetic import write_shape_scenes

    images, annotations = write_shape_scenes(root, num_images, seed)
    path = root / "data.jsonl"
    build_grounding(load_annotations("coco", images, annotations), path, seed=seed)
    return path


def split_by_image(data: Path, eval_images: int) -> tuple[Path, Path]:
    """train.jsonl / eval.jsonl beside data.jsonl, split by scene so no eval image is trained on."""
    from dopd_vl.data.images import image_parts
    from dopd_vl.data.sources import load_records

    records = load_records(data)
    scenes = sorted({next(iter(image_parts(r))) for r in records})
    held_out = set(scenes[-eval_images:])
    paths = {}
    for name, keep in (
        ("train", lambda r: next(iter(image_parts(r))) not in held_out),
        ("eval", lambda r: next(iter(image_parts(r))) in held_out),
    ):
        paths[name] = data.parent / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records if keep(r)), encoding="utf-8")
    return paths["train"], paths["eval"]


def heldout_accuracy(
    model_path: Path | str, data: Path, config, privileged: bool = False, max_new_tokens: int = 8
) -> dict:
    """Greedy accuracy (overall and per question type) of a model folder on records, with or without
    the privileged context; `config` gives the device and dtype (a DemoConfig)."""
    from dopd_vl.data.sources import load_records
    from dopd_vl.eval.evaluate import EvalConfig, accuracy_report, generate_answers
    from dopd_vl.modality.adapters import make_adapter
    from dopd_vl.models.loading import eos_token_ids, load_model, load_processing, never_sampled_token_ids

    model, processing = load_model(model_path, config.dtype, device=config.device).eval(), load_processing(model_path)
    records = load_records(data)
    answers = generate_answers(
        model,
        make_adapter(processing, image_root=data.parent),
        records,
        EvalConfig(max_new_tokens=max_new_tokens, privileged=privileged),
        eos_token_ids(processing, model),
        never_sampled_token_ids(processing, model),
    )
    report = accuracy_report(records, answers)
    return {
        "accuracy": report["accuracy"],
        "per_type": {k: v["accuracy"] for k, v in report["per_type"].items()},
        "count": report["count"],
    }


def finetune_model(
    folder: Path, train: Path, steps: int, views: tuple[str, ...], seed: int, config, batch_size: int = 8
) -> None:
    """Fine-tune a built tiny model on the answers, in place (views in turn, one per step)."""
    from dopd_vl.data.sources import load_records
    from dopd_vl.modality.adapters import make_adapter
    from dopd_vl.models.folders import save_model_folder
    from dopd_vl.models.loading import load_model, load_processing, vocab_size
    from dopd_vl.training.sft import SFTConfig, supervised_finetune

    # Trained in float32 wherever it runs (a few steps from random weights), saved as float32.
    model, processing = load_model(folder, "float32", device=config.device), load_processing(folder)
    sft = SFTConfig(steps=steps, batch_size=batch_size, views=views, seed=seed)
    supervised_finetune(
        model, make_adapter(processing, image_root=train.parent), load_records(train), vocab_size(processing), sft
    )
    save_model_folder(model, None, folder)
