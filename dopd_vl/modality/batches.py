"""Aligned views of a batch: each view is `prompt_ids(view) ++ response_ids`, right-padded.

Responses are never re-tokenised: every view carries the very same response ids, and
`response_positions[b, t]` is the position whose hidden state predicts `response_ids[b, t]`, so
hidden states gathered there line up token for token across views (docs/design.md §1.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dopd_vl.errors import DatasetError
from dopd_vl.method.views import TEACHER_VIEWS, VIEWS
from dopd_vl.modality.prompts import PromptInputs, pad_batch
from dopd_vl.models.loading import final_hidden_states

__all__ = [
    "ViewBatch",
    "build_view",
    "build_views",
    "check_aligned",
    "response_hidden_states",
    "valid_response_states",
]


@dataclass
class ViewBatch:
    name: str
    inputs: dict[str, Tensor]  # model kwargs (input_ids, attention_mask, vision extras)
    response_positions: Tensor  # [B, T] long
    response_ids: Tensor  # [B, T] long, pad where masked
    response_mask: Tensor  # [B, T] bool, from lengths (never from token ids, so pad == eos works)
    prompt_lengths: Tensor  # [B]
    record_ids: list[str]

    def to(self, device) -> ViewBatch:
        return ViewBatch(
            self.name,
            {k: v.to(device) for k, v in self.inputs.items()},
            self.response_positions.to(device),
            self.response_ids.to(device),
            self.response_mask.to(device),
            self.prompt_lengths.to(device),
            self.record_ids,
        )


def build_view(
    adapter, view: str, records: list[dict], responses: list[Tensor], prompts: list[PromptInputs] | None = None
) -> ViewBatch:
    """One view of a batch of (record, response) pairs; `prompts` may be passed when cached."""
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    prompts = prompts if prompts is not None else [adapter.prompt(r, view) for r in records]
    inputs = pad_batch(prompts, responses, adapter.pad_token_id, padding_side="right")
    lengths = torch.tensor([r.numel() for r in responses], dtype=torch.long)
    prompt_lengths = torch.tensor([p.input_ids.numel() for p in prompts], dtype=torch.long)
    width = max(int(lengths.max()), 1)
    steps = torch.arange(width)
    mask = steps[None, :] < lengths[:, None]
    # The hidden state at position P-1+t predicts response token t (P = prompt length).
    positions = torch.where(mask, prompt_lengths[:, None] - 1 + steps[None, :], 0)
    response_ids = torch.full((len(records), width), adapter.pad_token_id, dtype=torch.long)
    for b, r in enumerate(responses):
        response_ids[b, : r.numel()] = r
    batch = ViewBatch(
        view,
        inputs,
        positions,
        response_ids,
        mask,
        prompt_lengths,
        [str(r.get("id", i)) for i, r in enumerate(records)],
    )
    check_aligned({view: batch})
    return batch


def build_views(
    adapters: dict[str, object], views: tuple[str, ...], records: list[dict], responses: list[Tensor]
) -> dict[str, ViewBatch]:
    """Every requested view; teacher views use `adapters["teacher"]`, student views `adapters["student"]`."""
    unknown = set(views) - set(VIEWS)
    if unknown:
        raise ValueError(f"unknown views {sorted(unknown)}; views are {VIEWS}")
    batches = {
        v: build_view(adapters["teacher" if v in TEACHER_VIEWS else "student"], v, records, responses) for v in views
    }
    check_aligned(batches)
    return batches


def check_aligned(batches: dict[str, ViewBatch]) -> None:
    """Every view must hold the same response ids at its response positions; errors name the record."""
    reference = None
    for name, vb in batches.items():
        ids = vb.inputs["input_ids"]
        placed = ids.gather(1, (vb.response_positions + 1).clamp_max(ids.shape[1] - 1))
        placed = torch.where(vb.response_mask, placed, -1)
        expected = torch.where(vb.response_mask, vb.response_ids, -1)
        if reference is None:
            reference = (name, expected, vb.response_mask)
        for b in range(ids.shape[0]):
            if not torch.equal(placed[b], expected[b]):
                raise DatasetError(
                    f"view {name!r}: the ids at the response positions differ from the response",
                    record=vb.record_ids[b],
                    field="response_ids",
                )
            if not (torch.equal(expected[b], reference[1][b]) and torch.equal(vb.response_mask[b], reference[2][b])):
                raise DatasetError(
                    f"views {reference[0]!r} and {name!r} carry different response ids",
                    record=vb.record_ids[b],
                    field="response_ids",
                )


def response_hidden_states(model: nn.Module, batch: ViewBatch) -> Tensor:
    """Final hidden states at the response positions, [B, T, H] (masked slots hold position 0's)."""
    hidden = final_hidden_states(model, batch.inputs)
    index = batch.response_positions[..., None].expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)


def valid_response_states(model: nn.Module, batch: ViewBatch) -> tuple[Tensor, Tensor]:
    """Hidden states [N, H] and ids [N] of the valid response tokens, in (sequence, position) order:
    the token plan's order (docs/design.md §4.4)."""
    hidden = response_hidden_states(model, batch)
    return hidden[batch.response_mask], batch.response_ids[batch.response_mask]
