"""Do the paper's recipes fit one card? Two DOPD steps at a recipe's exact model shapes and batch settings.

    python bench/gpu_recipe.py configs/qwen3vl_8b_to_2b.yaml                 # on a GPU
    python bench/gpu_recipe.py configs/qwen3_8b_to_1.7b.yaml optim.batch_size=4 rollout.max_new_tokens=512
    python bench/gpu_recipe.py configs/qwen3_8b_to_1.7b.yaml --tiny --steps 1 # tiny shapes, any machine (the test)

The student and teacher are random-weight models with the shapes of the recipe's hub models
(`RECIPE_SHAPES`, transcribed from the models' published config.json files; `--tiny` swaps in
small shapes), built directly on the device in the recipe's dtype: nothing is downloaded, nothing
is written but a config and the tokenizer / processor. The Trainer is the package's own, with the
recipe and any `key=value` overrides; only its model loading is replaced by building from the
config. Data: GSM8K-style word problems with hints (text) or 640x480 generated scenes with boxes
(VLM), so prompts and images have realistic sizes. Random weights rarely stop early, so most
responses run to `rollout.max_new_tokens`: an upper bound of the rollout time.

Prints one JSON line per step (step time and its phases: rollout, scoring, loss + backward,
update; peak device memory) and a last line with the recipe's summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# Text shapes (hidden, intermediate, layers, heads, kv heads, head dim, tied) and vision shapes.
RECIPE_SHAPES = {
    "Qwen/Qwen3-1.7B": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "Qwen/Qwen3-8B": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    "Qwen/Qwen3-VL-2B-Instruct": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
        vision_depth=24,
        vision_hidden_size=1024,
        vision_intermediate_size=4096,
        vision_heads=16,
        deepstack=[5, 11, 17],
        num_position_embeddings=2304,
    ),
    "Qwen/Qwen3-VL-8B-Instruct": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
        vision_depth=27,
        vision_hidden_size=1152,
        vision_intermediate_size=4304,
        vision_heads=16,
        deepstack=[8, 16, 24],
        num_position_embeddings=2304,
    ),
}
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
)
TINY_VISION = dict(
    vision_depth=2,
    vision_hidden_size=32,
    vision_intermediate_size=64,
    vision_heads=2,
    deepstack=[0],
    num_position_embeddings=64,
)
QWEN3_VL_PIXELS = dict(min_pixels=65_536, max_pixels=16_777_216)  # the Qwen3-VL processor's limits


def model_folder(name: str, folder: Path, tiny: bool) -> Path:
    """config.json + tokenizer / processor of a recipe model, no weights."""
    from dopd_vl import load_tokenizer, qwen3_config, qwen3_vl_config_and_processor

    if name not in RECIPE_SHAPES:
        raise SystemExit(f"{name}: no shapes known; known: {sorted(RECIPE_SHAPES)}")
    shape = dict(RECIPE_SHAPES[name])
    tokenizer = load_tokenizer()
    vision = {
        k: shape.pop(k) for k in list(shape) if k.startswith("vision") or k in ("deepstack", "num_position_embeddings")
    }
    if tiny:
        shape, vision = dict(TINY), (dict(TINY_VISION) if vision else {})
    if vision:
        pixels = dict(min_pixels=32 * 32, max_pixels=128 * 128) if tiny else QWEN3_VL_PIXELS
        config, processing = qwen3_vl_config_and_processor(tokenizer=tokenizer, **shape, **vision, **pixels)
    else:
        config, processing = qwen3_config(tokenizer=tokenizer, **shape), tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    processing.save_pretrained(folder)
    return folder


def build_on_device(folder, dtype: str, trust_remote_code: bool = False, device=None):
    """Replaces `load_model` in the Trainer: random weights from the folder's config, on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from dopd_vl import load_tokenizer, resolve_device, set_generation_defaults

    config = AutoConfig.from_pretrained(str(folder))
    auto = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    with torch.device(resolve_device("auto")):
        model = auto.from_config(config, dtype=getattr(torch, dtype))
    set_generation_defaults(model, load_tokenizer())
    return model


def recipe_data(folder: Path, vision: bool, prompts: int) -> Path:
    from data_builders import (
        build_grounding,
        build_hints,
        load_annotations,
        write_arithmetic_problems,
        write_shape_scenes,
    )

    if vision:
        images, annotations = write_shape_scenes(folder / "scenes", max(4, prompts // 2), seed=0, width=640, height=480)
        build_grounding(load_annotations("coco", images, annotations), folder / "data.jsonl")
        return folder / "data.jsonl"
    build_hints(write_arithmetic_problems(folder / "problems.jsonl", prompts, seed=0), folder / "data.jsonl")
    return folder / "data.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="a YAML recipe whose student and teacher are in RECIPE_SHAPES")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a check that runs anywhere)")
    args = parser.parse_intermixed_args()

    import dopd_vl.training.models as setup_module  # internal: random real-shape weights built on the GPU
    from dopd_vl import Trainer, load_config, sample_step

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        recipe = load_config(args.recipe, args.overrides)
        vision = "VL" in recipe.student.name_or_path
        per_step = recipe.optim.batch_size * recipe.optim.gradient_accumulation_steps
        folders = {
            role: model_folder(getattr(recipe, role).name_or_path, work / role, args.tiny)
            for role in ("student", "teacher")
        }
        config = load_config(
            args.recipe,
            [
                *args.overrides,
                f"student.name_or_path={folders['student']}",
                f"teacher.name_or_path={folders['teacher']}",
                f"data.train={recipe_data(work / 'data', vision, per_step)}",
                f"output_dir={work / 'run'}",
                f"max_steps={args.steps}",
                "save_steps=1000000",
            ],
        )
        setup_module.load_model = build_on_device
        cuda = torch.cuda.is_available()
        trainer = Trainer(config)
        rows = []
        for _ in range(args.steps):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            micro_batches = sample_step(trainer.run, trainer.step)
            rollout = time.perf_counter() - start
            metrics = trainer.train_step(micro_batches, update=False)
            update_start = time.perf_counter()
            metrics.update(trainer.apply_update(metrics["loss"]))
            if cuda:
                torch.cuda.synchronize()
            end = time.perf_counter()
            row = {
                "step": len(rows) + 1,
                "step_s": round(end - start, 3),
                "rollout_s": round(rollout, 3),
                "scoring_s": round(metrics["time/scoring"], 3),
                "loss_backward_s": round(metrics["time/loss"], 3),
                "update_s": round(end - update_start, 3),
                "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
                "responses": sum(len(mb.rollout.responses) for mb in micro_batches),
                "mean_response_tokens": round(
                    sum(r.numel() for mb in micro_batches for r in mb.rollout.responses)
                    / max(1, sum(len(mb.rollout.responses) for mb in micro_batches)),
                    1,
                ),
                "loss": metrics["loss"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        summary = {
            "recipe": args.recipe,
            "overrides": args.overrides,
            "tiny": args.tiny,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "student": recipe.student.name_or_path,
            "teacher": recipe.teacher.name_or_path,
            "dtype": recipe.student.dtype,
            "prompts_per_step": per_step,
            "num_generations": recipe.rollout.num_generations,
            "max_new_tokens": recipe.rollout.max_new_tokens,
            "gradient_checkpointing": recipe.gradient_checkpointing,
            "loss_chunk_size": trainer.run.backends.loss_chunk_size,
            "peak_memory_gb": max((r["peak_memory_gb"] or 0) for r in rows) if cuda else None,
            "step_s_last": rows[-1]["step_s"],
        }
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
