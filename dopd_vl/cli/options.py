"""Options and helpers several `dopd` subcommands share: devices, data sources, generation models."""

from __future__ import annotations

from pathlib import Path

from dopd_vl.errors import ConfigError


def add_device_options(parser) -> None:
    parser.add_argument("--device", default="auto", help="auto (the GPU when present), cpu, cuda or cuda:N")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (bfloat16 on GPUs that support it, else float32), float32, bfloat16, float16",
    )


def add_data_options(parser) -> None:
    parser.add_argument("--split", default="train", help="split of a datasets source (default train)")
    parser.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="FIELD=COLUMN",
        help="read a record field from another column, e.g. --column prompt=question (repeatable)",
    )
    parser.add_argument(
        "--image-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder image paths may also lead into, besides the dataset's folder and the trusted roots (repeatable)",
    )


def data_image_roots(args):
    """Where the --data records' image paths may lead (docs/design.md §3.1)."""
    from dopd_vl.data.image_roots import image_roots
    from dopd_vl.data.sources import records_root

    return image_roots(records_root(args.data), args.image_root)


def columns(items: list[str]) -> dict[str, str]:
    columns = {}
    for item in items:
        field, sep, column = item.partition("=")
        if not sep or not field or not column:
            raise ConfigError(f"--column {item!r} is not FIELD=COLUMN")
        columns[field] = column
    return columns


def load_for_generation(name_or_path: str, root, device: str = "auto", dtype: str = "auto"):
    """Model (placed on `device` in `dtype`), processing, plain-view adapter, EOS ids and never-sampled ids."""
    from dopd_vl.modality.adapters import make_adapter
    from dopd_vl.models.loading import eos_token_ids, load_model, load_processing, never_sampled_token_ids

    model = load_model(name_or_path, dtype, device=device).eval()
    processing = load_processing(name_or_path)
    return (
        model,
        processing,
        make_adapter(processing, image_root=root),
        eos_token_ids(processing, model),
        never_sampled_token_ids(processing, model),
    )


def data_report_path(output_dir: str, kind: str, source: str, suffix: str = "") -> Path:
    """Where a report about a recipe's data goes by default: `KIND/DATA` beside the recipe's
    output_dir (runs/tiny_vlm and data/coco128.jsonl: runs/diagnose/coco128), named for the data it
    read and never inside a run's folder."""
    from dopd_vl.data.sources import data_label

    return Path(output_dir).parent / kind / f"{data_label(source)}{suffix}"


def replaced(path: Path) -> str:
    """`; replaces the earlier report` when `path` exists already (said before it is overwritten)."""
    return f" (replacing the earlier {path})" if path.exists() else ""


def vllm_engine(model_path, model, processing, adapter, records, view: str, max_new_tokens: int, eos, never):
    """A vLLM engine on a model's folder for greedy answers (`--engine vllm`: its own weights, nothing
    to sync), sized for the longest prompt of `records` on `view`."""
    import torch

    from dopd_vl.models.loading import is_vision_processing, vocab_size
    from dopd_vl.models.tiny import resolve_model_path
    from dopd_vl.training.engines import VllmEngine
    from dopd_vl.training.rollout import RolloutConfig

    longest = max(adapter.prompt(records[i], view).input_ids.numel() for i in range(len(records)))
    placed = next(model.parameters())
    return VllmEngine(
        resolve_model_path(model_path),
        RolloutConfig(engine="vllm", num_generations=1, temperature=0.0, max_new_tokens=max_new_tokens),
        dtype=str(placed.dtype).removeprefix("torch."),
        device=torch.device(placed.device),
        max_model_len=longest + max_new_tokens,
        vocab_size=vocab_size(processing),
        eos_token_ids=eos,
        suppress_token_ids=never,
        vision=is_vision_processing(processing),
    )
