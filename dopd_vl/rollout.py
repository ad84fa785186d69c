"""Sampling responses from the student on the plain view with Hugging Face `generate`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dopd_vl.modality import pad_batch

__all__ = ["RolloutConfig", "Rollout", "sample_responses"]


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


@dataclass
class Rollout:
    record_index: list[int]  # the record each response answers
    responses: list[Tensor]  # valid ids only; ends with the EOS when the stop reason is "eos"
    stop_reasons: list[str]  # "eos" | "length"

    @property
    def lengths(self) -> Tensor:
        return torch.tensor([r.numel() for r in self.responses], dtype=torch.long)


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
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in pad_batch(expanded, None, adapter.pad_token_id, padding_side="left").items()}
    was_training = model.training
    model.eval()
    greedy = config.temperature == 0
    sampling = {} if greedy else {"temperature": config.temperature, "top_p": config.top_p, "top_k": 0}  # top_k 0: the full distribution
    output = model.generate(
        **inputs,
        do_sample=not greedy,
        **sampling,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=eos_token_ids,
        pad_token_id=adapter.pad_token_id,
        suppress_tokens=suppress_token_ids or None,
    )
    model.train(was_training)
    generated = output[:, inputs["input_ids"].shape[1] :].cpu()
    is_eos = torch.isin(generated, torch.tensor(eos_token_ids))
    responses, reasons = [], []
    for row, eos in zip(generated, is_eos):
        if eos.any():
            end = int(eos.nonzero()[0]) + 1
            responses.append(row[:end].clone())
            reasons.append("eos")
        else:
            responses.append(row.clone())
            reasons.append("length")
    return Rollout(record_index, responses, reasons)
