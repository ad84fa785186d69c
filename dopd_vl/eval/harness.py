"""Evaluating a student through the harnesses the field reports with (`dopd eval --harness`,
docs/design.md §4.7): lm-evaluation-harness for text students, lmms-eval for vision students.

Both are optional extras (`pip install 'dopd-vl[eval]'`, and `[eval-vision]` for lmms-eval, which
is heavy: see docs/design.md §4.7), imported only here and only when asked for. The harness runs on a model folder (an
export, or a run folder's final student) through its
own Python API and Hugging Face model class, so the numbers are the harness's, not ours; its own
results JSON is written beside a one-table summary. Benchmark tasks (gsm8k, mmmu_val, ...) download
their data, so they need the internet; `records_task` turns our records into a local task instead:
the plain view's prompt exactly as our adapter renders it (chat template included), greedy
decoding to the chat template's end tokens, and our answer matching (`dopd_vl.data.answers`), so its
accuracy is comparable with `dopd eval`'s on the same records.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dopd_vl.errors import ConfigError, HarnessError

__all__ = [
    "HARNESSES",
    "model_folder",
    "records_task",
    "lmms_records_task",
    "run_lm_eval",
    "run_lmms_eval",
    "summary_table",
]

logger = logging.getLogger(__name__)

HARNESSES = ("lm-eval", "lmms-eval")
RECORDS_TASK = "dopd_records"


def model_folder(model: str | Path) -> str:
    """A run folder of `dopd train` means its final student; anything else is used as given."""
    path = Path(model)
    if (path / "final" / "config.json").is_file() and not (path / "config.json").is_file():
        return str(path / "final")
    return str(model)


def _import(harness: str):
    module, extra = {"lm-eval": ("lm_eval", "eval"), "lmms-eval": ("lmms_eval", "eval-vision")}[harness]
    try:
        return __import__(module)
    except ImportError as err:
        raise HarnessError(
            f"--harness {harness} needs {harness}: pip install 'dopd-vl[{extra}]'; import failed: {err}"
        ) from err


def records_task(
    data: str | Path, model: str, out: Path, max_new_tokens: int, limit: int | None = None, split: str = "train"
) -> dict:
    """An lm-evaluation-harness task config (a dict, with our callables) over our records: their
    plain-view prompts rendered by our adapter, written to OUT/records_task.jsonl."""
    from dopd_vl.data.answers import is_correct
    from dopd_vl.data.sources import load_records, records_root
    from dopd_vl.modality.adapters import make_adapter
    from dopd_vl.models.loading import is_vision_processing, load_processing, tokenizer_of

    records = list(load_records(data, split=split))[:limit]
    processing = load_processing(model)
    if is_vision_processing(processing):
        raise HarnessError(
            "a local records task of lm-eval is text-only; a vision student is evaluated by `dopd eval` (see "
            "docs/design.md §4.7)"
        )
    adapter = make_adapter(processing, image_root=records_root(data))
    rows = [
        {"id": str(r.get("id", i)), "prompt_text": adapter.prompt(r, "student").text, "answer": str(r["answer"])}
        for i, r in enumerate(records)
        if r.get("answer") is not None
    ]
    if not rows:
        raise ConfigError(f"{data}: no record has an `answer` to evaluate against")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "records_task.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    tokenizer = tokenizer_of(processing)
    ends = [t for t in ("<|im_end|>", "<|endoftext|>", tokenizer.eos_token) if t and t in tokenizer.get_vocab()]
    return {
        "task": RECORDS_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path.resolve())}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": lambda doc: doc["prompt_text"],  # already chat-templated: the harness adds nothing
        "doc_to_target": "answer",
        "target_delimiter": "",
        "generation_kwargs": {"until": sorted(set(ends)), "do_sample": False, "max_gen_toks": max_new_tokens},
        "process_results": lambda doc, results: {"acc": float(is_correct(results[0].strip(), doc["answer"]))},
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "num_fewshot": 0,
    }


def run_lm_eval(
    model: str | Path,
    out: str | Path,
    *,
    tasks: list[str] | None = None,
    data: str | Path | None = None,
    limit: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
    apply_chat_template: bool = False,
    split: str = "train",
) -> dict:
    """lm-evaluation-harness on a text student: benchmark `tasks`, or our records as a local task
    (`data`). Writes the harness's results (OUT/lm_eval_results.json, samples included) and returns
    {task: {metric: value}}."""
    if bool(tasks) == (data is not None):
        raise ConfigError("--harness lm-eval needs either --tasks T1,T2 or --data EVAL.jsonl")
    lm_eval = _import("lm-eval")
    from lm_eval.utils import handle_non_serializable

    folder, out = model_folder(model), Path(out)
    task_list: list = list(tasks) if tasks else [records_task(data, folder, out, max_new_tokens, limit, split)]
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": folder, "dtype": dtype, "device": device},
        tasks=task_list,
        batch_size=batch_size,
        limit=limit if tasks else None,
        log_samples=True,
        apply_chat_template=apply_chat_template,
        bootstrap_iters=0,
        gen_kwargs={"max_gen_toks": max_new_tokens} if tasks else None,
    )
    if results is None:  # a non-zero rank of a distributed harness run
        return {}
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_eval_results.json").write_text(
        json.dumps(results, indent=2, default=handle_non_serializable) + "\n", encoding="utf-8"
    )
    return _metrics(results)


def lmms_records_task(
    data: str | Path,
    model: str,
    out: Path,
    max_new_tokens: int,
    limit: int | None = None,
    split: str = "train",
    image_roots: list | tuple = (),
):
    """An lmms-eval messages task over our records: the plain view's messages with their images
    (loaded as our adapter loads them), greedy, scored by `dopd_vl.data.answers`. lmms-eval's Qwen3-VL
    model adds its own system message and resizes images itself (qwen-vl-utils), so its prompts,
    unlike lm-eval's local task, are the harness's own, not `dopd eval`'s. `image_roots`: folders
    image paths may also lead into (docs/design.md §3.1)."""
    from lmms_eval.api.task import ConfigurableMessagesTask

    from dopd_vl.data.answers import is_correct
    from dopd_vl.data.image_roots import image_roots as allowed_roots
    from dopd_vl.data.images import image_parts
    from dopd_vl.data.sources import load_records, records_root
    from dopd_vl.modality.adapters import make_adapter
    from dopd_vl.models.loading import is_vision_processing, load_processing

    records = [r for r in list(load_records(data, split=split))[:limit] if r.get("answer") is not None]
    if not records:
        raise ConfigError(f"{data}: no record has an `answer` to evaluate against")
    processing = load_processing(model)
    if not is_vision_processing(processing):
        raise HarnessError("lmms-eval evaluates vision students; a text student's records go through --harness lm-eval")
    adapter = make_adapter(processing, image_root=allowed_roots(records_root(data), image_roots))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "records_task.jsonl"
    path.write_text(
        "".join(
            json.dumps({"index": i, "id": str(r.get("id", i)), "answer": str(r["answer"])}) + "\n"
            for i, r in enumerate(records)
        ),
        encoding="utf-8",
    )

    def messages(doc: dict) -> list[dict]:
        record = records[doc["index"]]
        refs = iter(image_parts(record))  # paths and embedded images, in prompt order

        def part_of(part: dict) -> dict:
            return {"type": "image", "url": adapter.load_image(record, next(refs))} if part["type"] == "image" else part

        return [
            {
                "role": m["role"],
                "content": [{"type": "text", "text": m["content"]}]
                if isinstance(m["content"], str)
                else [part_of(q) for q in m["content"]],
            }
            for m in record["prompt"]
        ]

    return ConfigurableMessagesTask(
        config={
            "task": RECORDS_TASK,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(path.resolve())}},
            "test_split": "test",
            "output_type": "generate_until",
            "doc_to_messages": messages,
            "doc_to_visual": lambda doc: [],
            "doc_to_text": lambda doc: "",
            "doc_to_target": "answer",
            "generation_kwargs": {"max_new_tokens": max_new_tokens, "do_sample": False, "temperature": 0},
            "process_results": lambda doc, results: {"acc": float(is_correct(results[0].strip(), doc["answer"]))},
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
    )


def run_lmms_eval(
    model: str | Path,
    out: str | Path,
    *,
    tasks: list[str] | None = None,
    data: str | Path | None = None,
    limit: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 1,
    device: str = "cpu",
    split: str = "train",
    image_roots: list | tuple = (),
) -> dict:
    """lmms-eval on a vision student with its `qwen3_vl` model: benchmark `tasks`, or our records as
    a local task (`data`); images are resized within the student's own processor limits. Writes
    OUT/lmms_eval_results.json and returns {task: {metric: value}}."""
    if bool(tasks) == (data is not None):
        raise ConfigError("--harness lmms-eval needs either --tasks T1,T2 or --data EVAL.jsonl")
    _import("lmms-eval")
    from lmms_eval import evaluator

    from dopd_vl.models.loading import load_processing

    folder, out = model_folder(model), Path(out)
    images = getattr(load_processing(folder), "image_processor", None)
    pixels = {k: getattr(images, k) for k in ("min_pixels", "max_pixels") if getattr(images, k, None)}
    size = getattr(images, "size", None)
    if not pixels and size is not None:  # transformers 5 keeps the pixel limits as the size's edges
        edge = (lambda key: size.get(key)) if isinstance(size, dict) else (lambda key: getattr(size, key, None))
        pixels = {"min_pixels": edge("shortest_edge"), "max_pixels": edge("longest_edge")}
    model_args = ",".join(
        f"{k}={v}" for k, v in {"pretrained": folder, "device": device, "device_map": device, **pixels}.items() if v
    )  # a string: lmms-eval parses no dict
    task_list: list = (
        list(tasks) if tasks else [lmms_records_task(data, folder, out, max_new_tokens, limit, split, image_roots)]
    )
    results = evaluator.simple_evaluate(
        model="qwen3_vl",
        model_args=model_args,
        tasks=task_list,
        batch_size=batch_size,
        limit=limit if tasks else None,
        log_samples=True,
        bootstrap_iters=0,
    )
    if results is None:
        return {}
    out.mkdir(parents=True, exist_ok=True)
    (out / "lmms_eval_results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    return _metrics(results)


def _metrics(results: dict) -> dict:
    """{task: {metric: value}} of the harness's aggregated results (stderr entries dropped)."""
    return {
        task: {
            k.split(",")[0]: v
            for k, v in values.items()
            if isinstance(v, (int, float)) and "_stderr" not in k and k != "alias"
        }
        for task, values in results.get("results", {}).items()
    }


def summary_table(metrics: dict, harness: str, model: str) -> str:
    """One Markdown table: task, metric, value."""
    lines = [f"{harness} on {model}", "", "| task | metric | value |", "|---|---|---|"]
    for task, values in metrics.items():
        lines += [f"| {task} | {name} | {value:.4g} |" for name, value in values.items()]
    return "\n".join(lines) + "\n"
