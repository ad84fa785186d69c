"""Supervised fine-tuning on reference answers, on any view: how the demo and the toy experiment
make a tiny teacher that uses the privileged context (real teachers come pretrained).

The loss is the cross-entropy of the record's `answer` (plus EOS) given the view's prompt, computed
from final hidden states at the (few) answer positions only with the routed loss's `chunk_logits`,
so no `[batch, length, vocab]` logits exist.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dopd_vl.loss import chunk_logits
from dopd_vl.modality.batches import build_view, valid_response_states
from dopd_vl.models.loading import output_embedding_weight
from dopd_vl.progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = ["SFTConfig", "answer_ids", "supervised_finetune"]


@dataclass
class SFTConfig:
    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    views: tuple[str, ...] = ("teacher_priv",)
    """Prompts the answers are conditioned on, one view per step in turn: teacher_priv / student_priv
    (with the privileged context) or student / teacher_plain (without)."""
    seed: int = 0
    target: str = "answer"
    """The record field trained on: `answer`, or `meta.<key>` for a worked solution kept in meta."""


def answer_ids(tokenizer, record: dict, target: str = "answer") -> torch.Tensor:
    """The record's answer (or `meta.<key>`) as response token ids, ending with EOS (what a
    finished answer looks like)."""
    value = record["meta"][target.removeprefix("meta.")] if target.startswith("meta.") else record[target]
    ids = tokenizer(str(value), add_special_tokens=False).input_ids
    return torch.tensor([*ids, tokenizer.eos_token_id], dtype=torch.long)


def supervised_finetune(
    model: nn.Module,
    adapter,
    records: list[dict],
    vocab_size: int,
    config: SFTConfig,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Train `model` in place on (view prompt -> answer) pairs; returns the loss per step.
    `on_step(n)` is called after the n-th update (e.g. to evaluate a warm-up curve: the constant
    learning rate makes step n of a longer run the same model as an n-step run)."""
    key = config.target.removeprefix("meta.")
    usable = [
        r for r in records if ((r.get("meta") or {}) if config.target.startswith("meta.") else r).get(key) is not None
    ]
    if not usable:
        raise ValueError(f"supervised_finetune needs records with `{config.target}`")
    rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    device = next(model.parameters()).device
    model.train()
    losses = []
    prompts: dict[tuple[int, str], object] = {}  # rendered prompts, reused across steps
    for step in progress_bar(range(config.steps), desc=f"sft ({', '.join(config.views)})", leave=False):
        picked = rng.sample(range(len(usable)), min(config.batch_size, len(usable)))
        batch, view_name = [usable[i] for i in picked], config.views[step % len(config.views)]
        for i in picked:
            if (i, view_name) not in prompts:
                prompts[i, view_name] = adapter.prompt(usable[i], view_name)
        view = build_view(
            adapter,
            view_name,
            batch,
            [answer_ids(adapter.tokenizer, r, config.target) for r in batch],
            [prompts[i, view_name] for i in picked],
        ).to(device)
        hidden, ids = valid_response_states(model, view)
        loss = nn.functional.cross_entropy(chunk_logits(hidden, output_embedding_weight(model), vocab_size), ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    logger.info(
        "sft on %s: loss %.3f -> %.3f over %d steps", "+".join(config.views), losses[0], losses[-1], len(losses)
    )
    return losses
