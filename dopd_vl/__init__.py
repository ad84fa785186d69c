"""dopd-vl: Dual On-policy Distillation with privileged information for Qwen3-VL and Qwen3.

The public Python API is what this package exports (docs/design.md §5): `from dopd_vl import
build_objective, dopd_loss, Trainer, diagnose, ...`. Names resolve on first use (a lazy export
table), so `import dopd_vl` and the CLI's start stay cheap: torch and transformers load only when
a name that needs them is used. Modules below this package are internals of a 0.x package and
may move; these names do not.
"""

from __future__ import annotations

import importlib

_EXPORTS: dict[str, tuple[str, ...]] = {
    "dopd_vl.version": ("__version__",),
    "dopd_vl.errors": (
        "DopdError",
        "DatasetError",
        "ImageOutsideRoots",
        "ConfigError",
        "ModelError",
        "BackendCheckError",
        "TrainingError",
        "CollapseDetected",
        "Preempted",
        "RunExistsError",
        "CheckpointError",
        "ExportError",
        "HarnessError",
        "PREEMPTED_EXIT_CODE",
    ),
    "dopd_vl.method.views": ("VIEWS", "SCORING_VIEWS", "PRIVILEGED_VIEWS", "TEACHER_VIEWS", "DIAGNOSTIC_VIEWS"),
    "dopd_vl.method.divergences": (
        "reverse_kl",
        "forward_kl",
        "js",
        "divergence",
        "token_divergence",
        "DIVERGENCES",
        "SUPPORTS",
    ),
    "dopd_vl.method.routing": (
        "Regime",
        "REGIME_NAMES",
        "TokenSignals",
        "trimmed_mean",
        "token_signals",
        "information_edge",
        "compute_thresholds",
        "assign_regimes",
        "token_diagnostics",
        "summarise_diagnostics",
        "route_names",
    ),
    "dopd_vl.method.objectives": (
        "OBJECTIVES",
        "KNOB_OBJECTIVES",
        "ObjectiveConfig",
        "Route",
        "Objective",
        "build_objective",
        "register_objective",
    ),
    "dopd_vl.method.plan": (
        "TokenPlan",
        "plan_tokens",
        "token_weights",
        "normalization_weights",
        "rollout_weights",
        "Routing",
        "route_tokens",
    ),
    "dopd_vl.loss.route_terms": ("route_divergence",),
    "dopd_vl.loss.reference": ("LossOutput", "objective_loss", "dopd_loss"),
    "dopd_vl.loss.chunked": (
        "TargetStates",
        "ChunkedLossOutput",
        "chunked_objective_loss",
        "chunked_token_logprobs",
        "target_states",
        "chunk_logits",
        "auto_chunk_size",
    ),
    "dopd_vl.loss.kernels": ("resolve_loss_backend", "triton_available"),
    "dopd_vl.data.schema": ("validate_record", "RECORD_FIELDS"),
    "dopd_vl.data.sources": ("load_records", "records_root"),
    "dopd_vl.data.images": ("image_parts", "load_image"),
    "dopd_vl.data.preflight": ("check_data", "DataReport", "Fault", "FAULT_KINDS"),
    "dopd_vl.data.training_set": ("preflight_records",),
    "dopd_vl.data.image_roots": ("image_roots", "ImageRoots", "trust_image_roots", "trusted_roots_file"),
    "dopd_vl.data.answers": ("is_correct", "answer_kind", "extract_number", "normalize_text"),
    "dopd_vl.data.verify": ("register_verifier", "get_verifier", "VERIFIERS", "Verifier"),
    "dopd_vl.modality.prompts": ("PromptConfig", "PromptInputs", "prompt_messages", "pad_batch"),
    "dopd_vl.modality.adapters": ("Adapter", "ImageAdapter", "make_adapter", "register_adapter"),
    "dopd_vl.modality.batches": (
        "ViewBatch",
        "build_view",
        "build_views",
        "response_hidden_states",
        "valid_response_states",
    ),
    "dopd_vl.models.loading": (
        "load_model",
        "load_processing",
        "resolve_device",
        "resolve_dtype",
        "final_hidden_states",
        "output_embedding_weight",
        "eos_token_ids",
        "never_sampled_token_ids",
        "tokenizer_of",
        "is_vision_model",
        "with_lora",
    ),
    "dopd_vl.models.folders": ("load_tokenizer", "save_model_folder", "SHIPPED_TOKENIZER_DIR"),
    "dopd_vl.models.tiny": (
        "resolve_model_path",
        "build_char_tokenizer",
        "build_tiny_qwen3",
        "build_tiny_qwen3_vl",
        "qwen3_config",
        "qwen3_vl_config_and_processor",
        "set_generation_defaults",
    ),
    "dopd_vl.models.parallel": ("ModelCall", "shard_model"),
    "dopd_vl.distributed": ("gather", "reduce_sum", "any_process"),
    "dopd_vl.training.config": ("TrainConfig", "load_config", "ModelConfig", "DataConfig", "OptimConfig", "LoRAConfig"),
    "dopd_vl.training.rollout": ("RolloutConfig", "VllmConfig", "Rollout", "MicroBatch", "sample_responses"),
    "dopd_vl.training.engines": ("RolloutEngine", "HFEngine", "VllmEngine", "LOGPROB_MISMATCH_WARN"),
    "dopd_vl.training.run": ("Run", "setup_run"),
    "dopd_vl.training.models": ("RunModels", "ViewScorer", "ModelScorer"),
    "dopd_vl.training.step": (
        "ScoredBatch",
        "sample_step",
        "sample_micro_batch",
        "score_micro_batch",
        "step_statistics",
        "step_totals",
        "plan_micro_batch",
    ),
    "dopd_vl.training.guard": ("CollapseGuard", "CollapseGuardConfig"),
    "dopd_vl.training.sft": ("SFTConfig", "supervised_finetune", "answer_ids"),
    "dopd_vl.training.trainer": ("Trainer",),
    "dopd_vl.eval.evaluate": ("EvalConfig", "generate_answers", "accuracy_report", "reverse_kl_to_teacher"),
    "dopd_vl.eval.harness": ("run_lm_eval", "run_lmms_eval", "records_task"),
    "dopd_vl.eval.diagnose": ("diagnose", "diagnose_run", "diagnose_tokens", "DiagnosedTokens"),
    "dopd_vl.apps.export": ("export_student",),
    "dopd_vl.apps.plots": ("plot_run", "read_metrics"),
    "dopd_vl.apps.demo": ("run_demo", "DemoConfig"),
    "dopd_vl.apps.scene_task": ("make_demo_dataset", "heldout_accuracy", "finetune_model", "split_by_image"),
    "dopd_vl.apps.routing_page": ("route_records", "write_routing_html"),
    "dopd_vl.cli": ("main",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'dopd_vl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
