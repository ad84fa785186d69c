"""The parts of one optimizer step (docs/design.md §4), as functions of a `Run` and a step number.

    sample_step -> score_micro_batch -> step_statistics / step_totals -> plan_micro_batch

The trainer calls them in that order; `dopd diagnose` and the studies' readouts call the same
functions for any step without touching a Trainer, so what they read is what training does.
Sampling depends only on (seed, step, process): asking for step k twice samples the same rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dopd_vl.data.verify import verdict, verdict_code
from dopd_vl.distributed import gather, reduce_sum
from dopd_vl.loss.chunked import TargetStates
from dopd_vl.method.outcomes import Outcomes
from dopd_vl.method.plan import TokenPlan, plan_tokens
from dopd_vl.method.routing import TokenSignals
from dopd_vl.method.views import DIAGNOSTIC_VIEWS
from dopd_vl.modality.batches import ViewBatch, build_views
from dopd_vl.training.models import RunModels
from dopd_vl.training.rollout import MicroBatch, seed_step, step_prompt_indices
from dopd_vl.training.run import Run

__all__ = [
    "ScoredBatch",
    "sample_step",
    "sample_micro_batch",
    "score_micro_batch",
    "score_targets",
    "step_statistics",
    "step_totals",
    "plan_micro_batch",
]

SCORING_CHUNK = 256
"""Tokens per chunk of the scoring pass's log-prob and entropy computation over the vocabulary."""


@dataclass
class ScoredBatch:
    """A micro-batch after scoring: the student's view, the target views' states and the signals."""

    student_view: ViewBatch
    targets: dict[str, TargetStates]
    signals: TokenSignals | None  # over the valid tokens, flattened
    prune_keys: Tensor | None
    groups: Tensor  # [B] the prompt (record) index of each response: VA-OPD's and uni_opd's rollout groups
    outcomes: Outcomes | None = None  # the verdicts, where the objective reads them (§1.12)

    @property
    def lengths(self) -> Tensor:
        """[B] valid response tokens per sequence: the layout of every [N] tensor of this batch."""
        return self.student_view.response_mask.sum(-1)


# ------------------------------------------------------------------------------------ rollout
def sample_step(run: Run, step: int) -> list[MicroBatch]:
    """This process's micro-batches of optimizer step `step` (0-based), with rollouts seeded by
    (seed, step, process): the records in seeded epochs, the step's window cut into micro-batches."""
    c, a = run.config, run.accelerator
    seed_step(c.seed, step, a.process_index)
    o = c.optim
    batches = step_prompt_indices(
        step, c.seed, len(run.data.records), o.batch_size, o.gradient_accumulation_steps, a.num_processes,
        a.process_index,
    )  # fmt: skip
    return [sample_micro_batch(run, indices, step) for indices in batches]


def sample_micro_batch(run: Run, record_indices: list[int], step: int) -> MicroBatch:
    """`num_generations` responses per record from the run's engine, on the plain student view. Under
    `data.on_error: skip`, a record whose image files vanished since the preflight is replaced by the
    next whole one and listed in output_dir/skipped.jsonl."""
    a = run.accelerator
    records = []
    for index in record_indices:
        record, newly_skipped = run.data.pick(index, step + 1)
        if newly_skipped:
            run.data.write_skipped(run.output_dir, a.is_main_process, a.process_index)
        records.append(record)
    rollout = run.engine.sample(run.models, run.data.adapters["student"], records, run.config.rollout)
    mb = MicroBatch(records, rollout)
    texts = run.tokenizer.batch_decode(rollout.responses, skip_special_tokens=True)
    mb.verdicts = [verdict(run.data.verifier, text, record) for text, record in zip(texts, mb.response_records)]
    return mb


# ------------------------------------------------------------------------------------ scoring
def score_micro_batch(run: Run, mb: MicroBatch, step: int) -> ScoredBatch:
    """Build the views the run scores for a micro-batch of rollouts, score the target views without
    gradient (log-probs and entropies only where something reads them) and compute the routing
    signals (and pruned_opd's keys, seeded by `prune_seed` and the step)."""
    objective, c = run.objective, run.config
    records = [mb.records[i] for i in mb.rollout.record_index]
    views = build_views(run.data.adapters, ("student", *run.scored_views), records, mb.rollout.responses)
    views = {k: v.to(run.device) for k, v in views.items()}
    entropy_views = {"teacher_priv", *objective.entropy_views}
    logprob_views = {*objective.logprob_views, *(DIAGNOSTIC_VIEWS if c.diagnostics else ())}
    targets = score_targets(run.models, views, entropy_views, logprob_views)
    token_logprob = {v: t.token_logprob for v, t in targets.items()}
    signals = objective.token_signals(token_logprob, {v: t.entropy for v, t in targets.items()})
    prune_keys = None
    if signals is not None and objective.router == "prune":
        generator = torch.Generator().manual_seed(c.objective.prune_seed * 1_000_003 + step)
        prune_keys = objective.prune_keys(signals, generator)
    groups = torch.as_tensor(mb.rollout.record_index, dtype=torch.long, device=run.device)
    outcomes = None
    if objective.response_verdicts:  # trust: verified, uni_opd (§1.12)
        teacher = (
            [run.data.teacher_verdict(r) for r in records] if objective.teacher_verdicts else [None] * len(records)
        )
        outcomes = Outcomes(
            response=torch.tensor([verdict_code(v) for v in mb.verdicts], dtype=torch.long),
            teacher=torch.tensor([verdict_code(v) for v in teacher], dtype=torch.long),
            seed=c.seed * 1_000_003 + step * 7_919 + run.accelerator.process_index,
        )
        if objective.sampling_logprob:  # uni_opd: l_old, the sampling policy (the live student) without gradient
            old = run.models.scorers["student"].score(
                views["student"], run.models.vocab_size, SCORING_CHUNK, False, True
            )
            outcomes.student_logprob = old.token_logprob
            outcomes.target_logprob = targets[objective.routes[0].target].token_logprob
    return ScoredBatch(views["student"], targets, signals, prune_keys, groups, outcomes)


def score_targets(
    models: RunModels,
    views: dict[str, ViewBatch],
    entropy_views: set[str] | None = None,
    logprob_views: set[str] | None = None,
) -> dict[str, TargetStates]:
    """TargetStates of every view in `views` but the student's, each by its scorer in the run's
    scorer table (`RunModels.scorers`). Log-probs and entropies cost a pass over [tokens, V], so only
    for the views something reads them from (None: every view). The student scores in eval mode."""
    was_training = models.student.training
    models.student.eval()
    targets = {}
    for name, batch in views.items():
        if name == "student":
            continue
        scorer = models.scorers.get(name)
        if scorer is None:
            raise ValueError(f"view {name!r} needs a model to score it, but none was loaded")
        with_entropy = entropy_views is None or name in entropy_views
        with_logprob = logprob_views is None or name in logprob_views
        targets[name] = scorer.score(batch, models.vocab_size, SCORING_CHUNK, with_entropy, with_logprob)
    models.student.train(was_training)
    return targets


# ------------------------------------------------------------------------- step-wide numbers
def step_statistics(run: Run, scored: list[ScoredBatch]) -> dict[str, float]:
    """Thresholds and counts over every valid token of the step, on every process (§1.3)."""
    objective, a = run.objective, run.accelerator
    if not objective.needs_signals and objective.router != "prune":
        return {}
    parts = [s.signals for s in scored]
    gathered = None
    if parts[0] is not None:
        gathered = parts[0].map(lambda name, _: gather(a, torch.cat([getattr(p, name) for p in parts])))
    keys = gather(a, torch.cat([s.prune_keys for s in scored])) if objective.router == "prune" else None
    return objective.step_statistics(gathered, keys)


def step_totals(run: Run, scored: list[ScoredBatch]) -> tuple[int, int]:
    """The step's sequences with a valid token and its valid tokens, over every process: the
    normalisation's denominators, so each micro-batch's loss is its share of the step's."""
    lengths = torch.cat([s.lengths for s in scored])
    sequences = reduce_sum(run.accelerator, int((lengths > 0).sum()))
    tokens = reduce_sum(run.accelerator, int(lengths.sum()))
    return int(sequences), int(tokens)


# -------------------------------------------------------------------------------- the plan
def plan_micro_batch(run: Run, s: ScoredBatch, stats: dict[str, float], totals: tuple[int, int]) -> TokenPlan:
    """Route, weight and regime of each valid token of a scored micro-batch ([N], §4.4), with the
    step's statistics (`threshold_scope: global`) or the micro-batch's own (`local`)."""
    objective = run.objective
    local = (
        stats
        if run.config.objective.threshold_scope == "global"
        else objective.step_statistics(s.signals, s.prune_keys)
    )
    return plan_tokens(objective, s.lengths, s.signals, local, s.prune_keys, s.groups, *totals, s.outcomes)
