"""What verified answers change in a token plan (docs/design.md §1.12, §1.10): the two uses of
verdicts the objectives offer, each defined once here and called by `plan_tokens`.

* `trust: verified` (DOPD, ours): the teacher's verdict per record and the verifier's per response
  override the paper's HT / HS rule (`trust_routes`);
* `uni_opd` (Uni-OPD as released): correctness-aware balancing drops excess rollouts of a prompt's
  group (`balance_rollouts`), outcome-guided margin calibration shifts the token rewards of a
  group's correct and incorrect rollouts apart (`margin_shifts`), and tokens whose student and
  teacher log-probs are too far apart are masked.

Verdict codes (`Outcomes`): 1 correct, 0 wrong, -1 none (no answer, or no verdict asked for).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dopd_vl.method.routing import REGIME_NAMES

__all__ = ["Outcomes", "trust_routes", "balance_rollouts", "margin_shifts", "rollout_reward_means"]

CORRECT, WRONG, NONE = 1, 0, -1
_HS, _LH, _LL = (REGIME_NAMES.index(r) for r in ("HS", "LH", "LL"))


@dataclass
class Outcomes:
    """Verdicts of a micro-batch's B responses, and what the outcome-aware rules read besides."""

    response: Tensor
    """[B] long: the verifier's verdict on each response (1 / 0 / -1)."""
    teacher: Tensor
    """[B] long: the privileged teacher's verdict on the record each response answers (1 / 0 / -1)."""
    student_logprob: Tensor | None = None
    """[N] the sampling policy's log-probs of the sampled tokens (uni_opd's l_old)."""
    target_logprob: Tensor | None = None
    """[N] the teacher view's log-probs of the sampled tokens (uni_opd's l_T)."""
    seed: int = 0
    """uni_opd: the seed of this micro-batch's balancing draws (from the run's seed and the step)."""


def trust_routes(regime: Tensor, lengths: Tensor, outcomes: Outcomes) -> tuple[Tensor, dict[str, float]]:
    """`objective.trust: verified`: DOPD's route per token [N] after the verdicts' overrides.

    Records whose teacher verdict is wrong: every token to the privileged student's route (HS).
    Records whose teacher verdict is right, in a response the verifier marks wrong: the tokens the
    paper's rule sends to the student's own view (LL, HS) go to the teacher's LH route. Responses
    marked right, and records without a teacher verdict, keep the paper's rule.

    Args:
        regime: [N] the paper's regime per valid token (route index = regime index under dopd).
        lengths: [B] valid tokens per response.
        outcomes: the responses' and their records' teacher verdicts.

    Returns:
        ([N] route, counts): `trust/teacher_wrong` (tokens of records whose teacher is wrong that
        the paper's rule did not already send to HS) and `trust/wrong_response` (tokens moved to LH).
    """
    per_token = lambda v: torch.repeat_interleave(v.to(regime.device), lengths.long().to(regime.device))  # noqa: E731
    teacher, response = per_token(outcomes.teacher), per_token(outcomes.response)
    teacher_wrong = teacher == WRONG
    to_teacher = (teacher == CORRECT) & (response == WRONG) & ((regime == _LL) | (regime == _HS))
    route = torch.where(teacher_wrong, _HS, torch.where(to_teacher, _LH, regime))
    counts = {
        "trust/teacher_wrong": float((teacher_wrong & (regime != _HS)).sum()),
        "trust/wrong_response": float(to_teacher.sum()),
    }
    return route, counts


def balance_rollouts(verdicts: Tensor, groups: Tensor, ratio: float, seed: int) -> Tensor:
    """Uni-OPD's online correctness-aware balancing: which rollouts keep their loss [B] (bool).

    Within each prompt's group, C = the correct rollouts, I = the others (no verdict counts as
    incorrect). If |C| > floor(ratio |I|) >= 1 the excess correct rollouts are dropped at random,
    else if |I| > floor(|C| / ratio) >= 1 the excess incorrect ones; all-correct and all-wrong
    groups are kept.

    Args:
        verdicts: [B] 1 / 0 / -1 per rollout.
        groups: [B] the prompt index of each rollout.
        ratio: rho, the kept correct : incorrect ratio (released: 1.0).
        seed: the draws' seed (a generator of its own: training's random state is untouched).
    """
    generator = torch.Generator().manual_seed(seed)
    keep = torch.ones(verdicts.shape, dtype=torch.bool)
    verdicts, groups = verdicts.cpu(), groups.cpu()
    for g in groups.unique(sorted=True):
        members = (groups == g).nonzero().squeeze(-1)
        correct = members[verdicts[members] == CORRECT]
        incorrect = members[verdicts[members] != CORRECT]
        want_correct, want_incorrect = int(ratio * len(incorrect)), int(len(correct) / ratio)
        if len(correct) > want_correct >= 1:
            drop = correct[torch.randperm(len(correct), generator=generator)[: len(correct) - want_correct]]
        elif len(incorrect) > want_incorrect >= 1:
            drop = incorrect[torch.randperm(len(incorrect), generator=generator)[: len(incorrect) - want_incorrect]]
        else:
            continue
        keep[drop] = False
    return keep


def rollout_reward_means(reward: Tensor, lengths: Tensor, counted: Tensor) -> Tensor:
    """G_i: each rollout's mean token reward over its `counted` tokens ([N] bool); [B] float64 (0 if none)."""
    lengths = lengths.long().cpu()
    sums = torch.stack([p.sum() for p in torch.where(counted, reward, 0.0).double().cpu().split(lengths.tolist())])
    counts = torch.stack([p.sum() for p in counted.double().cpu().split(lengths.tolist())])
    return sums / counts.clamp_min(1)


def margin_shifts(
    means: Tensor, verdicts: Tensor, groups: Tensor, keep: Tensor, delta: float, mode: str, direction: str
) -> Tensor:
    """Uni-OPD's outcome-guided margin calibration: the reward shift of each rollout [B] float64.

    Per prompt group with kept correct and incorrect rollouts, g = mean(G_correct) - mean(G_incorrect);
    with `direction` `widen` (released) only when g < delta, with `exact` always: s = delta - g.
    `mode` `split` (released) adds s/2 to every token reward of the correct rollouts and subtracts
    s/2 from the incorrect ones'; `correct` adds s to the correct ones only; `incorrect` subtracts s
    from the incorrect ones only.

    Args:
        means: [B] each rollout's mean token reward (`rollout_reward_means`).
        verdicts: [B] 1 / 0 / -1 (no verdict counts as incorrect).
        groups: [B] the prompt index of each rollout.
        keep: [B] the rollouts balancing kept (the others neither count nor shift).
        delta: the target margin (released: 0.4).
        mode: `split`, `correct` or `incorrect`.
        direction: `widen` or `exact`.
    """
    means, verdicts, groups, keep = means.double().cpu(), verdicts.cpu(), groups.cpu(), keep.cpu()
    shift = torch.zeros_like(means)
    up = {"split": 0.5, "correct": 1.0, "incorrect": 0.0}[mode]
    for g in groups.unique():
        members = (groups == g) & keep
        correct, incorrect = members & (verdicts == CORRECT), members & (verdicts != CORRECT)
        if not correct.any() or not incorrect.any():
            continue
        gap = means[correct].mean() - means[incorrect].mean()
        if direction == "widen" and gap >= delta:
            continue
        s = float(delta - gap)
        shift[correct] = up * s
        shift[incorrect] = -(1.0 - up) * s
    return shift
