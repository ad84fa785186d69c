"""Sampling responses from the student on the plain view with Hugging Face `generate`."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dopd_vl.modality.prompts import pad_batch

__all__ = [
    "VllmConfig",
    "RolloutConfig",
    "Rollout",
    "MicroBatch",
    "resolve_generation",
    "sample_responses",
    "rollout_metrics",
    "step_prompt_indices",
    "seed_step",
]


VLLM_DTYPES = ("", "float32", "bfloat16", "float16")


@dataclass
class VllmConfig:
    """`rollout.vllm`: the colocated vLLM engine of `rollout.engine: vllm` (dopd_vl/training/engines.py)."""

    gpu_memory_utilization: float = 0.3
    """Share of the device's memory the engine may take (weights + KV cache), the rest stays with
    training; on CPU, the share of RAM vLLM's CPU build reserves for its KV cache [ours]."""
    max_model_len: int = 0
    """Longest prompt + response the engine holds; 0: `rollout.max_prompt_length` +
    `max_new_tokens`, or the longest training prompt + `max_new_tokens` when no prompt limit is set."""
    enforce_eager: bool = True
    """No CUDA graphs (they cost start-up time and memory); false for long GPU runs [ours]."""
    sleep_mode: bool = False
    """Free the engine's KV cache while the trainer runs its step, wake it for the next rollout
    (vLLM sleep level 1; CUDA / ROCm only, an error on CPU)."""
    tensor_parallel_size: int = 1
    """GPUs per engine; 1 on CPU and in every tested setup (under torchrun each rank drives its own engine)."""
    dtype: str = ""
    """Engine dtype; empty: the student's."""

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"rollout.vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.max_model_len < 0:
            raise ValueError(f"rollout.vllm.max_model_len must be >= 0 (0: derived), got {self.max_model_len}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"rollout.vllm.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.dtype not in VLLM_DTYPES:
            raise ValueError(
                f"rollout.vllm.dtype must be empty (the student's), float32, bfloat16 or float16, got {self.dtype!r}"
            )


@dataclass
class RolloutConfig:
    """The `rollout` section of a recipe."""

    num_generations: int = 4
    """Responses sampled per prompt [paper: 4]."""
    max_new_tokens: int = 256
    """Responses are cut here; the stop reason is then `length`."""
    temperature: float = 1.0
    """1.0 with top_p 1.0 samples the trained distribution itself [ours]."""
    top_p: float = 1.0
    generation: str = "eager"
    """`eager`: Hugging Face generate with a dynamic KV cache; `compiled`: a static KV cache with the
    forward compiled by torch.compile (transformers' compiled generation; the first call compiles,
    later calls of the same shapes reuse it). Same tokens for greedy decoding (tested). `auto`:
    compiled on a GPU, eager on CPU; a compile failure falls back to eager with one warning
    (`compiled` raises it instead) [ours]."""
    max_prompt_length: int = 0
    """Longest prompt (any view, image tokens included) the data preflight accepts; 0: no limit.
    Prompts are never truncated (a cut could split an image's tokens): a longer one is a fault
    (`data.on_error`) [ours]."""
    generation_batch_size: int = 0
    """Responses per `generate` call (0: the whole micro-batch at once). With a limit, prompts are
    sorted by length first, so each call pads less; results come back in the original order."""
    engine: str = "hf"
    """What samples the rollouts: `hf` (Hugging Face `generate`, with `generation`) or `vllm`
    (a colocated vLLM engine whose weights follow the student every step; `rollout.vllm`) [ours]."""
    vllm: VllmConfig = field(default_factory=VllmConfig)

    def __post_init__(self) -> None:
        if self.engine not in ("hf", "vllm"):
            raise ValueError(f"rollout.engine must be hf or vllm, got {self.engine!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"rollout.temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.engine == "vllm" and self.generation != "eager":
            raise ValueError(
                f"rollout.generation={self.generation!r} is an option of the hf engine; rollout.engine: vllm "
                "has its own (rollout.vllm.enforce_eager)"
            )
        if self.engine == "vllm" and self.generation_batch_size:
            raise ValueError(
                "rollout.generation_batch_size is an option of the hf engine; vLLM schedules its own batches "
                "(rollout.vllm.gpu_memory_utilization bounds them)"
            )
        if self.generation not in ("eager", "compiled", "auto"):
            raise ValueError(f"rollout.generation must be eager, compiled or auto, got {self.generation!r}")
        if self.max_prompt_length < 0:
            raise ValueError(f"rollout.max_prompt_length must be >= 0 (0: no limit), got {self.max_prompt_length}")
        if self.generation_batch_size < 0:
            raise ValueError(f"rollout.generation_batch_size must be >= 0, got {self.generation_batch_size}")


@dataclass
class Rollout:
    record_index: list[int]  # the record each response answers
    responses: list[Tensor]  # valid ids only; ends with the EOS when the stop reason is "eos"
    stop_reasons: list[str]  # "eos" | "length"
    engine_logprobs: list[Tensor] | None = None  # the engine's log p of each sampled token (vllm; health metric only)

    @property
    def lengths(self) -> Tensor:
        return torch.tensor([r.numel() for r in self.responses], dtype=torch.long)


@dataclass
class MicroBatch:
    """Records and the student's responses to them (one row per response)."""

    records: list[dict]
    rollout: Rollout
    verdicts: list[bool | None] = field(default_factory=list)
    """The verifier's verdict on each response (None: its record has no answer); `sample_micro_batch` fills it."""

    @property
    def response_records(self) -> list[dict]:
        """The record each response answers, in response order."""
        return [self.records[i] for i in self.rollout.record_index]


def resolve_generation(generation: str, device: torch.device) -> str:
    """`auto`: compiled generation on a GPU (where it pays), eager elsewhere; other modes as given."""
    if generation != "auto":
        return generation
    return "compiled" if torch.device(device).type == "cuda" else "eager"


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    adapter,
    records: list[dict],
    config: RolloutConfig,
    eos_token_ids: list[int],
    suppress_token_ids: list[int] | None = None,
    view: str = "student",
) -> Rollout:
    """`num_generations` samples per record, left-padded prompts, lengths cut at the first EOS.

    Training samples on the plain `student` view; evaluation may answer on `student_priv`.
    Temperature 0 means greedy decoding.

    Lengths come from the first EOS, never from padding ids, so pad == eos is fine; tokens that
    `generate` appends after a row has finished are not part of the response.
    """
    prompts = [adapter.prompt(r, view) for r in records]
    expanded = [p for p in prompts for _ in range(config.num_generations)]
    record_index = [i for i in range(len(records)) for _ in range(config.num_generations)]
    order = list(range(len(expanded)))
    size = config.generation_batch_size or len(expanded)
    if size < len(expanded):  # similar lengths together: less padding per generate call
        order.sort(key=lambda i: expanded[i].input_ids.numel())
    responses: list[Tensor | None] = [None] * len(expanded)
    reasons: list[str | None] = [None] * len(expanded)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        for i, (response, reason) in zip(
            chunk, _generate(model, adapter, [expanded[i] for i in chunk], config, eos_token_ids, suppress_token_ids)
        ):
            responses[i], reasons[i] = response, reason
    model.train(was_training)
    return Rollout(record_index, responses, reasons)


def _generate(
    model: nn.Module, adapter, prompts: list, config: RolloutConfig, eos_token_ids: list[int], suppress_token_ids
) -> list[tuple[Tensor, str]]:
    """One `generate` call over left-padded prompts; each row cut at its first EOS."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in pad_batch(prompts, None, adapter.pad_token_id, padding_side="left").items()}
    greedy = config.temperature == 0
    sampling = (
        {} if greedy else {"temperature": config.temperature, "top_p": config.top_p, "top_k": 0}
    )  # top_k 0: the full distribution
    if resolve_generation(config.generation, device) == "compiled":
        from transformers.generation.configuration_utils import CompileConfig

        compile_config = CompileConfig(fullgraph=False)
        compile_config._compile_all_devices = True  # transformers compiles on accelerators only; CPU runs (tests) too
        sampling.update(cache_implementation="static", compile_config=compile_config)
    output = model.generate(
        **inputs,
        do_sample=not greedy,
        **sampling,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=eos_token_ids,
        pad_token_id=adapter.pad_token_id,
        suppress_tokens=suppress_token_ids or None,
    )
    generated = output[:, inputs["input_ids"].shape[1] :].cpu()
    is_eos = torch.isin(generated, torch.tensor(eos_token_ids))
    out = []
    for row, eos in zip(generated, is_eos):
        if eos.any():
            out.append((row[: int(eos.nonzero()[0]) + 1].clone(), "eos"))
        else:
            out.append((row.clone(), "length"))
    return out


def rollout_metrics(micro_batches: list[MicroBatch], tokenizer, reduce_sum=None) -> dict:
    """Mean response length, the shares cut at max_new_tokens and made of the end token alone, the
    verdicts' shares (`verify/correct`, `verify/wrong`, `verify/none`) and the rollout accuracy
    over the responses with a verdict; `reduce_sum` sums the counts over processes."""
    lengths = [r.numel() for mb in micro_batches for r in mb.rollout.responses]
    clipped = [reason == "length" for mb in micro_batches for reason in mb.rollout.stop_reasons]
    eos_only = [
        r.numel() == 1 and reason == "eos"
        for mb in micro_batches
        for r, reason in zip(mb.rollout.responses, mb.rollout.stop_reasons)
    ]
    verdicts = [v for mb in micro_batches for v in mb.verdicts]
    n_correct, n_wrong = sum(v is True for v in verdicts), sum(v is False for v in verdicts)
    values = torch.tensor(
        [sum(lengths), len(lengths), sum(clipped), sum(eos_only), n_correct, n_wrong], dtype=torch.float64
    )
    if reduce_sum is not None:
        values = reduce_sum(values)
    total, n, n_clipped, n_eos_only, n_correct, n_wrong = values.tolist()
    metrics = {
        "response_length": total / max(n, 1),
        "clipped_frac": n_clipped / max(n, 1),
        "eos_only_frac": n_eos_only / max(n, 1),
        "verify/correct": n_correct / max(n, 1),
        "verify/wrong": n_wrong / max(n, 1),
        "verify/none": (n - n_correct - n_wrong) / max(n, 1),
    }
    if n_correct + n_wrong:
        metrics["accuracy"] = n_correct / (n_correct + n_wrong)
    return metrics


def step_prompt_indices(
    step: int, seed: int, num_records: int, batch_size: int, accumulation: int, processes: int, process: int
) -> list[list[int]]:
    """One process's micro-batches of record indices for an optimizer step: the records in seeded
    epochs (a shuffle per epoch), the step's window cut into micro-batches, interleaved over
    processes, so the step's records do not depend on how it is split."""
    per_step = batch_size * accumulation * processes
    start = step * per_step
    stream: list[int] = []
    epoch = start // num_records
    while len(stream) < (start % num_records) + per_step:
        order = list(range(num_records))
        random.Random(seed * 7919 + epoch).shuffle(order)
        stream += order
        epoch += 1
    window = stream[start % num_records : start % num_records + per_step]
    return [
        window[(m * processes + process) * batch_size : (m * processes + process + 1) * batch_size]
        for m in range(accumulation)
    ]


def seed_step(seed: int, step: int, process: int) -> None:
    """Rollout sampling depends only on (seed, step, process): resumed runs sample the same."""
    value = (seed * 1_000_003 + step * 101 + process) % (2**63)
    torch.manual_seed(value)
    random.seed(value)
