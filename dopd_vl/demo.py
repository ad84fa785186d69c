"""`dopd demo`: the smallest end-to-end run, offline on CPU.

Generated scenes with exact boxes -> privileged grounding records -> tiny Qwen3-VL student and
teacher built from configs with the shipped Qwen tokenizer -> the rendered views of a record ->
rollout -> scoring of the privileged views -> routing -> one chunked DOPD loss and backward.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

def make_demo_dataset(root: Path, num_images: int = 4, seed: int = 0) -> Path:
    """Generated scenes -> COCO JSON -> the real grounding builder -> root/data.jsonl."""
    from data_builders.grounding import build_grounding, load_annotations
    from data_builders.synthetic import write_shape_scenes

    images, annotations = write_shape_scenes(root, num_images, seed)
    path = root / "data.jsonl"
    build_grounding(load_annotations("coco", images, annotations), path, seed=seed)
    return path


def run_demo(out_dir: str | Path = "demo_out", seed: int = 0) -> dict:
    from dopd_vl.cli import main as cli_main
    from dopd_vl.data import load_records
    from dopd_vl.models import build_tiny_qwen3_vl, check_same_tokenizer, load_model, load_processing, load_tokenizer, output_embedding_weight, vision_token_ids
    from dopd_vl.modality import make_adapter
    from dopd_vl.objectives import DOPDConfig, build_objective, chunked_objective_loss, token_weights
    from dopd_vl.rollout import RolloutConfig, sample_responses
    from dopd_vl.routing import REGIME_NAMES, token_signals
    from dopd_vl.scoring import score_views, valid_response_states
    from dopd_vl.views import build_views

    out = Path(out_dir)
    torch.manual_seed(seed)
    data = make_demo_dataset(out / "data", seed=seed)
    tokenizer = load_tokenizer()
    build_tiny_qwen3_vl(out / "student", tokenizer=tokenizer, seed=seed)
    build_tiny_qwen3_vl(out / "teacher", tokenizer=tokenizer, hidden_size=96, num_layers=3, num_heads=6, intermediate_size=192, seed=seed + 1)
    print(f"dataset: {data}; tiny Qwen3-VL student and teacher in {out}")
    cli_main(["inspect", "--student", str(out / "student"), "--teacher", str(out / "teacher"), "--data", str(data), "--index", "0"])

    student, teacher = load_model(out / "student"), load_model(out / "teacher").eval()
    s_proc, t_proc = load_processing(out / "student"), load_processing(out / "teacher")
    vocab = check_same_tokenizer(s_proc, t_proc, student, teacher)
    adapters = {"student": make_adapter(s_proc, image_root=data.parent), "teacher": make_adapter(t_proc, image_root=data.parent)}
    records = load_records(data)
    rollout = sample_responses(student, adapters["student"], records, RolloutConfig(num_generations=2, max_new_tokens=16), [tokenizer.eos_token_id], vision_token_ids(s_proc))
    objective = build_objective(DOPDConfig())
    batch_records = [records[i] for i in rollout.record_index]
    views = build_views(adapters, ("student", *objective.views), batch_records, rollout.responses)
    targets = score_views(views, teacher, student.eval(), vocab)
    signals = token_signals(targets["teacher_priv"].token_logprob, targets["student_priv"].token_logprob)
    stats = objective.step_statistics(signals)
    route = objective.assign_routes(torch.ones_like(signals.advantage_gap, dtype=torch.bool), signals, stats)
    student.train()
    hidden, ids = valid_response_states(student, views["student"])
    weight = token_weights(views["student"].response_mask, objective.config.normalization)[views["student"].response_mask]
    loss = chunked_objective_loss(objective, hidden, output_embedding_weight(student), ids, route, weight, targets, vocab).loss
    loss.backward()
    fractions = {name: float((route == code).double().mean()) for code, name in enumerate(REGIME_NAMES)}
    summary = {"responses": len(rollout.responses), "tokens": int(route.numel()), "loss": loss.item(), "thresholds": stats, "fractions": fractions}
    print("\nregime fractions: " + ", ".join(f"{k} {v:.2f}" for k, v in fractions.items()))
    print(f"DOPD loss on {summary['tokens']} sampled tokens: {summary['loss']:.4f}; thresholds {json.dumps({k: round(v, 4) for k, v in stats.items()})}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
