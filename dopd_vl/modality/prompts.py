"""What every modality adapter shares: prompt types, the placement of p in a prompt, batching.

`prompt_messages` is the single place where the privileged context p enters a prompt
(docs/design.md §1.1, placement); both adapters render its output with one chat template and identical
template arguments in every view, so the first response token is aligned across views.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dopd_vl.errors import DatasetError
from dopd_vl.method.views import PRIVILEGED_VIEWS, VIEWS

__all__ = ["PromptConfig", "PromptInputs", "prompt_messages", "pad_batch"]


@dataclass
class PromptConfig:
    """How prompts are rendered; one instance serves every view."""

    privileged_template: str = "{prompt}\n\n{privileged_context}"
    """Wording of the privileged text part [ours]; `{prompt}` is the question's last text part."""
    enable_thinking: bool = False
    """Qwen3 thinking mode, applied identically to every view [ours: off by default]."""


@dataclass
class PromptInputs:
    """One record's prompt for one view, unpadded."""

    input_ids: Tensor  # [L]
    text: str  # the rendered chat text (images as their placeholder tokens)
    extras: dict[str, Tensor] = field(default_factory=dict)  # vision: pixel_values, image_grid_thw, mm_token_type_ids


def prompt_messages(record: dict, view: str, template: str = PromptConfig.privileged_template) -> list[dict]:
    """The chat messages of a view: privileged views get p as the final text of the last user turn
    (`template`), or, when p is a list of parts (text, image crops), those parts appended to it."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; views are {VIEWS}")
    messages = copy.deepcopy(record["prompt"])
    if view not in PRIVILEGED_VIEWS:
        return messages
    context = record.get("privileged_context")
    last = messages[-1]
    if isinstance(context, list) and context:  # parts (text, image crops): after everything in the last user turn
        content = last["content"] if isinstance(last["content"], list) else [{"type": "text", "text": last["content"]}]
        last["content"] = content + copy.deepcopy(context)
        return messages
    if not isinstance(context, str) or not context.strip():
        raise DatasetError(
            f"view {view!r} needs a privileged context, but the record has none",
            record=record.get("id", "?"),
            field="privileged_context",
        )
    if isinstance(last["content"], str):
        last["content"] = template.format(prompt=last["content"], privileged_context=context)
    elif last["content"] and last["content"][-1].get("type") == "text":
        part = last["content"][-1]
        part["text"] = template.format(prompt=part["text"], privileged_context=context)
    else:  # the question is not the final part (e.g. text then image): p goes after everything
        last["content"].append({"type": "text", "text": template.format(prompt="", privileged_context=context).strip()})
    return messages


def pad_batch(
    prompts: list[PromptInputs], responses: list[Tensor] | None, pad_token_id: int, padding_side: str
) -> dict[str, Tensor]:
    """Concatenate prompt ++ response ids per sample and pad; vision extras are batched alongside.

    Token-aligned extras (mm_token_type_ids) are padded like input_ids and extended with zeros
    (text) over the response; per-image extras (pixel_values, image_grid_thw) are concatenated in
    sample order, which is how Qwen3-VL expects a batch.
    """
    responses = responses if responses is not None else [prompts[0].input_ids.new_zeros(0)] * len(prompts)
    sequences = [torch.cat([p.input_ids, r.to(p.input_ids)]) for p, r in zip(prompts, responses)]
    width = max(s.numel() for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    token_types = None
    if any("mm_token_type_ids" in p.extras for p in prompts):
        token_types = torch.zeros((len(sequences), width), dtype=torch.long)
    for b, seq in enumerate(sequences):
        sl = slice(width - seq.numel(), width) if padding_side == "left" else slice(0, seq.numel())
        input_ids[b, sl] = seq
        attention_mask[b, sl] = 1
        if token_types is not None:
            types = prompts[b].extras.get(
                "mm_token_type_ids", torch.zeros(prompts[b].input_ids.numel(), dtype=torch.long)
            )
            token_types[b, sl] = torch.cat([types, types.new_zeros(seq.numel() - types.numel())])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_types is not None:
        batch["mm_token_type_ids"] = token_types
    for key in ("pixel_values", "image_grid_thw"):
        parts = [p.extras[key] for p in prompts if key in p.extras]
        if parts:
            batch[key] = torch.cat(parts)
    return batch
