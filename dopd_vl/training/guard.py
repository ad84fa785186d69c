"""The collapse guard (docs/design.md §1.9): notices when on-policy distillation is destroying the student.

Routes to a *live* privileged student are self-distillation toward a moving copy of the student
(the paper's `student_priv`, stop-grad). Both views can agree trivially, and a weak student finds
such agreements within tens of steps (measured on the toy tasks, examples/toy_privilege):

* **length collapse**: every response becomes the end token alone (or shrinks to a fraction of
  its starting length): the two views agree perfectly on "stop now"; or the opposite, responses
  that no longer stop and run into `max_new_tokens`;
* **entropy blow-up**: the output becomes near-uniform, i.e. independent of the input;
* **accuracy collapse**: confident output of full length whose answers are all wrong (entropy may
  even fall); seen as rollout accuracy falling far below the run's start.

The guard compares a moving average of the step metrics the trainer already logs
(`response_length`, `eos_only_frac`, `clipped_frac`, `entropy/student`, `accuracy`) with the same
metrics over the run's own first steps, so no absolute scale is assumed. A sign must persist for `patience`
consecutive steps. It then warns once (`collapse_action: warn`, the default) or stops the run after
a clean checkpoint (`stop`). Entropy *falling* is not an alarm on its own (a student that learns
becomes confident); it is reported with the accuracy sign.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

__all__ = ["CollapseGuardConfig", "CollapseGuard", "CollapseAlarm", "GUARD_METRICS"]

logger = logging.getLogger(__name__)

GUARD_METRICS = ("response_length", "eos_only_frac", "clipped_frac", "entropy/student", "accuracy", "loss")


@dataclass
class CollapseGuardConfig:
    """The `collapse_guard` section of a recipe [ours]; `collapse_action` chooses what happens."""

    baseline_steps: int = 10
    """The run's first N steps define its reference values."""
    window: int = 10
    """Recent steps averaged before comparing with the reference (rollout metrics are noisy)."""
    patience: int = 3
    """Consecutive steps a sign must persist before the alarm."""
    length_ratio: float = 0.5
    """Alarm when the mean response length falls below this fraction of the reference."""
    eos_only_frac: float = 0.5
    """Alarm when at least this share of responses is the end token alone (and the reference share was below half of
    it)."""
    clipped_frac: float = 0.5
    """Alarm when at least this share of responses runs into max_new_tokens (and the reference share was below half of
    it)."""
    entropy_ratio: float = 2.0
    """Alarm when the student's entropy rises above this multiple of the reference ..."""
    entropy_margin: float = 1.0
    """... and by at least this many nats (near-uniform output)."""
    accuracy_ratio: float = 0.5
    """Alarm when rollout accuracy falls below this fraction of the reference ..."""
    accuracy_drop: float = 0.1
    """... and by at least this much (absolute): sampled accuracy of a weak student is noisy."""
    min_accuracy: float = 0.05
    """... provided the reference accuracy was at least this (else accuracy is too noisy to judge)."""

    def __post_init__(self) -> None:
        checks = [
            (self.baseline_steps >= 1, "collapse_guard.baseline_steps must be >= 1"),
            (self.window >= 1, "collapse_guard.window must be >= 1"),
            (self.patience >= 1, "collapse_guard.patience must be >= 1"),
            (0.0 < self.length_ratio < 1.0, "collapse_guard.length_ratio must be in (0, 1)"),
            (0.0 < self.eos_only_frac <= 1.0, "collapse_guard.eos_only_frac must be in (0, 1]"),
            (0.0 < self.clipped_frac <= 1.0, "collapse_guard.clipped_frac must be in (0, 1]"),
            (0.0 <= self.accuracy_drop <= 1.0, "collapse_guard.accuracy_drop must be in [0, 1]"),
            (self.entropy_ratio > 1.0, "collapse_guard.entropy_ratio must be > 1"),
            (self.entropy_margin >= 0.0, "collapse_guard.entropy_margin must be >= 0"),
            (0.0 < self.accuracy_ratio < 1.0, "collapse_guard.accuracy_ratio must be in (0, 1)"),
            (0.0 <= self.min_accuracy <= 1.0, "collapse_guard.min_accuracy must be in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class CollapseAlarm:
    step: int
    kinds: list[str]  # "length", "entropy", "accuracy"
    evidence: dict[str, tuple[float, float]]  # metric -> (reference, recent)

    def describe(self) -> str:
        seen = ", ".join(f"{k} {ref:.3g} -> {now:.3g}" for k, (ref, now) in self.evidence.items())
        return (
            f"step {self.step}: {' + '.join(self.kinds)} collapse ({seen}; reference = mean of the run's first "
            f"steps, recent = moving average)"
        )


def collapse_message(alarm: CollapseAlarm, objective, config) -> str:
    """What the guard saw and the settings that avoid it (a run's objective and TrainConfig)."""
    advice = [f"a lower optim.lr (now {config.optim.lr:g})"]
    to_self = any(r is not None and r.target == "student_priv" for r in objective.routes)
    if to_self and config.objective.privileged_student == "live":
        advice.insert(
            0,
            "objective.privileged_student=initial (or ema): routes to the live privileged student are "
            "self-distillation toward a moving copy, which can reach a trivial agreement",
        )
    return f"collapse guard ({objective.name}): {alarm.describe()}. Settings that avoid it: {'; '.join(advice)}."


@dataclass
class CollapseGuard:
    config: CollapseGuardConfig = field(default_factory=CollapseGuardConfig)
    history: list[dict[str, float]] = field(default_factory=list)
    streak: int = 0
    alarm: CollapseAlarm | None = None

    def update(self, metrics: dict) -> CollapseAlarm | None:
        """Feed one step's metrics; returns the alarm the first time the collapse is confirmed."""
        self.history.append(
            {k: float(metrics[k]) for k in GUARD_METRICS if k in metrics and math.isfinite(float(metrics[k]))}
        )
        c = self.config
        if self.alarm is not None or len(self.history) < c.baseline_steps + 1:
            return None
        reference = _mean(self.history[: c.baseline_steps])
        recent = _mean(self.history[max(c.baseline_steps, len(self.history) - c.window) :])
        kinds, evidence = self._signs(reference, recent)
        self.streak = self.streak + 1 if kinds else 0
        if self.streak < c.patience:
            return None
        for key in ("entropy/student", "loss"):  # context for the reader, not triggers
            if key in reference and key in recent:
                evidence.setdefault(key, (reference[key], recent[key]))
        self.alarm = CollapseAlarm(int(metrics.get("step", len(self.history))), kinds, evidence)
        return self.alarm

    def _signs(self, ref: dict, now: dict) -> tuple[list[str], dict]:
        c = self.config
        kinds, evidence = [], {}
        if (
            "response_length" in ref
            and "response_length" in now
            and now["response_length"] < c.length_ratio * ref["response_length"]
        ):
            kinds.append("length")
            evidence["response_length"] = (ref["response_length"], now["response_length"])
        for key, limit in (("eos_only_frac", c.eos_only_frac), ("clipped_frac", c.clipped_frac)):
            share_ref, share_now = ref.get(key), now.get(key)
            if share_ref is not None and share_now is not None and share_now >= limit and share_ref < limit / 2:
                if "length" not in kinds:
                    kinds.append("length")
                evidence[key] = (share_ref, share_now)
        h_ref, h_now = ref.get("entropy/student"), now.get("entropy/student")
        if (
            h_ref is not None
            and h_now is not None
            and h_now > c.entropy_ratio * h_ref
            and h_now > h_ref + c.entropy_margin
        ):
            kinds.append("entropy")
            evidence["entropy/student"] = (h_ref, h_now)
        a_ref, a_now = ref.get("accuracy"), now.get("accuracy")
        if (
            a_ref is not None
            and a_now is not None
            and a_ref >= c.min_accuracy
            and a_now < c.accuracy_ratio * a_ref
            and a_ref - a_now >= c.accuracy_drop
        ):
            kinds.append("accuracy")
            evidence["accuracy"] = (a_ref, a_now)
        return kinds, evidence

    # Kept in checkpoints, so a resumed run keeps its reference values.
    def state_dict(self) -> dict:
        return {"history": self.history, "streak": self.streak, "alarmed": self.alarm is not None}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(h) for h in state.get("history", [])]
        self.streak = int(state.get("streak", 0))
        if state.get("alarmed"):
            self.alarm = CollapseAlarm(len(self.history), ["earlier"], {})


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for row in rows for k in row}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}
