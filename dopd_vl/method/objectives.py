# Over 450 lines: every knob of the objective section beside its checks and the objectives that read it.
"""Objectives: a router plus a table of routes (docs/design.md §1.6, §1.7), their configuration and registry.

A route says, for the tokens sent to it, which view is the target, which divergence and support
to use, and the weight. DOPD routes by the four regimes; the baselines and the paper's comparison
methods are configurations of the same engine so that comparisons run on identical code. How the
loss is computed from a route table lives in `dopd_vl.loss` (the reference path over logits, the
chunked path over hidden states and its kernels), which imports this module, never the reverse.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields

import torch
from torch import Tensor

from dopd_vl.method.divergences import DIVERGENCES, SUPPORTS
from dopd_vl.method.routing import (
    REGIME_NAMES,
    TokenSignals,
    assign_regimes,
    compute_thresholds,
    information_edge,
    token_signals,
    trimmed_mean,
)
from dopd_vl.method.views import SCORING_VIEWS

__all__ = [
    "OBJECTIVES",
    "KNOB_OBJECTIVES",
    "ObjectiveConfig",
    "Route",
    "Objective",
    "build_objective",
    "register_objective",
]

OBJECTIVES = (
    "dopd",
    "vanilla_opd",
    "privileged_opd",
    "self_distill",
    "uniform",
    "pruned_opd",
    "eopd",
    "exopd",
    "va_opd",
    "vision_opd",
    "uni_opd",
)
_REGISTERED: dict[str, Callable[[ObjectiveConfig], Objective]] = {}  # register_objective (CONTRIBUTING.md)
_PRUNE_BY = ("largest_A", "smallest_A", "random")
_BASELINE_ROUTE = tuple(
    n for n in OBJECTIVES if n not in ("dopd", "exopd", "uni_opd")
)  # their divergence/support is set
# The knobs only some built-in objectives read. Under any other built-in objective a value other than
# the default would be silently inert, so it is an error naming both; a registered objective or a
# `module:builder` may read any knob (docs/design.md §1.7).
KNOB_OBJECTIVES: dict[str, tuple[str, ...]] = {
    "beta_light": ("dopd",),
    "beta_weak": ("dopd",),
    "regime_routes": ("dopd",),
    "edge_check": ("dopd",),
    "trust": ("dopd",),
    "normalization": tuple(n for n in OBJECTIVES if n != "va_opd"),
    "baseline_divergence": _BASELINE_ROUTE,
    "baseline_support": _BASELINE_ROUTE,
    "prune_fraction": ("pruned_opd",),
    "prune_by": ("pruned_opd",),
    "prune_seed": ("pruned_opd",),
    "teacher_view": ("eopd", "exopd", "uni_opd"),
    "fkl_weight": ("eopd",),
    "split_threshold": ("eopd", "va_opd"),
    "split_quantile": ("eopd", "va_opd"),
    "exopd_lambda": ("exopd",),
    "va_high_weight": ("va_opd",),
    "va_low_weight": ("va_opd",),
    "va_temperature": ("va_opd",),
    "uni_balance_ratio": ("uni_opd",),
    "uni_margin": ("uni_opd",),
    "uni_margin_mode": ("uni_opd",),
    "uni_margin_direction": ("uni_opd",),
    "uni_clip_eps": ("uni_opd",),
    "uni_clip_eps_high": ("uni_opd",),
    "uni_logprob_mask": ("uni_opd",),
}
_GAP_SIGNALS = ("advantage_gap", "q_teacher", "q_student")


@dataclass
class ObjectiveConfig:
    """The `objective` section of a recipe. Defaults are the paper's values where it gives them."""

    name: str = "dopd"
    """Objective: one of OBJECTIVES [ours: baselines as configurations]."""
    top_k: int = 128
    """K of top-K supports [paper]."""
    beta_light: float = 0.6
    """Weight of the LH and HS routes [paper]."""
    beta_weak: float = 0.3
    """Weight of the LL route [paper]."""
    js_beta: float = 0.5
    """Mixture weight of JS(beta); 1/2 is the paper's JS [paper]."""
    outlier_fraction: float = 0.05
    """Fraction of largest values left out of the threshold means [paper]."""
    threshold_scope: str = "global"
    """`global`: thresholds over the whole optimizer step; `local`: per micro-batch [ours]."""
    topk_source: str = "student"
    """Whose K largest entries form the top-K support: `student` or `target` [ours]."""
    topk_tail: bool = True
    """Keep the remaining mass as a (K+1)-th cell; false renormalises over the K cells [ours]."""
    normalization: str = "sequence"
    """`sequence`: mean over sequences of per-sequence token means [paper]; `token`: over all tokens
    (va_opd averages within its visual-advantage groups instead, docs/design.md §1.10)."""
    regime_routes: dict = field(default_factory=dict)
    """Per-regime overrides for DOPD, e.g. {"HT": {"support": "topk"}, "LL": {"enabled": false}} [ours]."""
    baseline_divergence: str | None = None
    """Divergence of single-route baselines; None = the baseline's own (rkl; js for uniform) [ours]."""
    baseline_support: str | None = None
    """Support of single-route baselines; None = topk [ours]."""
    prune_fraction: float = 0.2
    """pruned_opd: fraction of the step's tokens dropped [paper Fig. 4]."""
    prune_by: str = "largest_A"
    """pruned_opd: `largest_A`, `smallest_A` or `random` [paper Fig. 4]."""
    prune_seed: int = 0
    """pruned_opd with `random`: seed of the per-token keys [ours]."""
    privileged_student: str = "live"
    """student_priv weights: `live` (current, detached) [paper], `initial` or `ema` [ours]."""
    ema_decay: float = 0.99
    """Decay of the `ema` privileged student [ours]."""
    edge_check: str = "none"
    """dopd: `none` (the paper's HT/HS rule) or `plain_teacher`: a high-gap token goes to the
    teacher only when the teacher's verdict on it survives without the context (capability, not
    information); needs the teacher_plain view [ours; a variant, not the paper's rule]."""
    trust: str = "paper"
    """dopd: `paper` (the HT / HS rule reads confidences only) or `verified`: records whose
    privileged teacher's greedy answer the verifier marks wrong send every token to the privileged
    student's view (HS); where the teacher is right, the LL / HS tokens of a response marked wrong
    go to the teacher's LH route; needs records with `answer` (docs/design.md §1.12) [ours]."""
    # The paper's comparison methods (docs/design.md §1.10). Details their abstracts leave open are
    # our choices, marked [ours].
    teacher_view: str = "teacher_priv"
    """eopd, exopd, uni_opd: the teacher view distilled from; teacher_priv gives them the same privileged
    teacher as DOPD (the paper's comparison), teacher_plain the methods as published [ours]."""
    fkl_weight: float = 1.0
    """eopd: weight of the forward KL added on high-entropy tokens [ours]."""
    split_threshold: str = "trimmed_mean"
    """eopd, va_opd: the step threshold of the split signal (teacher entropy, visual advantage):
    `trimmed_mean` (DOPD's, with outlier_fraction) or `quantile` (split_quantile) [ours]."""
    split_quantile: float = 0.8
    """eopd, va_opd with split_threshold quantile: the quantile of the step's values [ours]."""
    exopd_lambda: float = 1.25
    """exopd: reward extrapolation lambda; 1 is vanilla OPD's sampled reverse KL, > 1 extrapolates
    beyond the teacher [ExOPD; 1.25 ours]."""
    va_high_weight: float = 0.5
    """va_opd: weight of the high-visual-advantage group's mean loss [ours]."""
    va_low_weight: float = 0.5
    """va_opd: weight of the low-visual-advantage group's mean loss [ours]."""
    va_temperature: float | None = 1.0
    """va_opd: rollout weights G*softmax(mean VA / temperature) over each prompt's G rollouts;
    null switches the rollout weighting off [ours]."""
    uni_balance_ratio: float = 1.0
    """uni_opd: rho of the correctness-aware balancing, kept correct : incorrect rollouts per group [Uni-OPD]."""
    uni_margin: float = 0.4
    """uni_opd: delta, the margin the mean token reward of a group's correct rollouts should keep
    over its incorrect ones' [Uni-OPD]."""
    uni_margin_mode: str = "split"
    """uni_opd: `split` (+s/2 to the correct rollouts' token rewards, -s/2 to the incorrect ones')
    [Uni-OPD], `correct` (+s to the correct ones) or `incorrect` (-s to the incorrect ones) [ours]."""
    uni_margin_direction: str = "widen"
    """uni_opd: `widen` shifts only groups whose margin is below delta [Uni-OPD]; `exact` also
    narrows larger margins to delta [ours]."""
    uni_clip_eps: float = 0.2
    """uni_opd: PPO clip below the ratio 1 [Uni-OPD]."""
    uni_clip_eps_high: float = 0.28
    """uni_opd: PPO clip above the ratio 1 [Uni-OPD]."""
    uni_logprob_mask: float = 10.0
    """uni_opd: tokens with |log pi_old - log pi_T| >= this get no loss [Uni-OPD]."""

    def __post_init__(self) -> None:
        names = OBJECTIVES + tuple(_REGISTERED)
        _check(self.name in names or ":" in self.name, f"objective.name must be one of {names} or module:builder")
        for knob, choices in {
            "threshold_scope": ("global", "local"),
            "topk_source": ("student", "target"),
            "normalization": ("sequence", "token"),
            "baseline_divergence": (None, *DIVERGENCES),
            "baseline_support": (None, *SUPPORTS),
            "prune_by": _PRUNE_BY,
            "privileged_student": ("live", "initial", "ema"),
            "edge_check": ("none", "plain_teacher"),
            "trust": ("paper", "verified"),
            "uni_margin_mode": ("split", "correct", "incorrect"),
            "uni_margin_direction": ("widen", "exact"),
            "teacher_view": ("teacher_priv", "teacher_plain"),
            "split_threshold": ("trimmed_mean", "quantile"),
        }.items():
            _check(
                getattr(self, knob) in choices,
                f"objective.{knob} must be one of {choices}, got {getattr(self, knob)!r}",
            )
        _check(self.top_k >= 1, f"objective.top_k must be >= 1, got {self.top_k}")
        _check(0.0 < self.js_beta < 1.0, f"objective.js_beta must be in (0, 1), got {self.js_beta}")
        _check(
            0.0 <= self.outlier_fraction < 1.0,
            f"objective.outlier_fraction must be in [0, 1), got {self.outlier_fraction}",
        )
        _check(
            0.0 <= self.prune_fraction < 1.0, f"objective.prune_fraction must be in [0, 1), got {self.prune_fraction}"
        )
        _check(0.0 < self.ema_decay < 1.0, f"objective.ema_decay must be in (0, 1), got {self.ema_decay}")
        _check(self.fkl_weight >= 0.0, f"objective.fkl_weight must be >= 0, got {self.fkl_weight}")
        _check(
            0.0 <= self.split_quantile <= 1.0, f"objective.split_quantile must be in [0, 1], got {self.split_quantile}"
        )
        _check(self.va_high_weight >= 0.0 and self.va_low_weight >= 0.0, "objective.va_*_weight must be >= 0")
        _check(self.va_temperature is None or self.va_temperature > 0.0, "objective.va_temperature must be > 0 or null")
        _check(self.uni_balance_ratio > 0.0, f"objective.uni_balance_ratio must be > 0, got {self.uni_balance_ratio}")
        _check(
            0.0 <= self.uni_clip_eps < 1.0 and self.uni_clip_eps_high >= 0.0,
            "objective.uni_clip_eps must be in [0, 1) and uni_clip_eps_high >= 0",
        )
        _check(self.uni_logprob_mask > 0.0, f"objective.uni_logprob_mask must be > 0, got {self.uni_logprob_mask}")
        unknown = set(self.regime_routes) - set(REGIME_NAMES)
        if unknown:
            raise ValueError(f"objective.regime_routes: unknown regimes {sorted(unknown)}; valid: {list(REGIME_NAMES)}")
        if self.name in OBJECTIVES:
            self._check_no_inert_knob()

    def _check_no_inert_knob(self) -> None:
        defaults = {f.name: (f.default if f.default_factory is MISSING else f.default_factory()) for f in fields(self)}
        for knob, readers in KNOB_OBJECTIVES.items():
            value = getattr(self, knob)
            if self.name not in readers and value != defaults[knob]:
                raise ValueError(
                    f"objective.{knob}={value!r} has no effect under objective {self.name!r}: only "
                    f"{', '.join(readers)} read it; remove it, or pick an objective that reads it"
                )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class Route:
    target: str  # a scoring view
    divergence: str  # rkl | fkl | js
    support: str  # full | topk | sampled
    weight: float
    extra: tuple[tuple[str, float], ...] = ()
    """More (divergence, weight) terms on the same target and support, added to the first (EOPD's RKL + FKL)."""
    reference: str | None = None
    """Sampled support only: a view whose token log-prob l_ref turns the target's l_T into the
    extrapolated target lambda*l_T + (1 - lambda)*l_ref (ExOPD's reward)."""
    extrapolation: float = 1.0
    """lambda of `reference`."""
    clip: tuple[float, float] | None = None
    """Sampled support only: (eps, eps_high) of a PPO-clipped surrogate whose advantage is the
    target's token log-prob minus the sampling policy's (Uni-OPD); None: the plain sampled RKL."""

    def __post_init__(self) -> None:
        for view in (self.target, *([self.reference] if self.reference else [])):
            if view not in SCORING_VIEWS:
                raise ValueError(f"route views must be among {SCORING_VIEWS}, got {view!r}")
        for name, _ in self.terms:
            if name not in DIVERGENCES:
                raise ValueError(f"route divergence must be one of {DIVERGENCES}, got {name!r}")
        if self.support not in SUPPORTS:
            raise ValueError(f"route support must be one of {SUPPORTS}, got {self.support!r}")
        if self.support == "sampled" and any(name != "rkl" for name, _ in self.terms):
            raise ValueError("support 'sampled' is defined for divergence 'rkl' only")
        if self.clip is not None and self.support != "sampled":
            raise ValueError("a clipped route (PPO surrogate) needs support 'sampled'")
        if self.reference is not None and self.support != "sampled":
            raise ValueError("a route with a reference view (reward extrapolation) needs support 'sampled'")

    @property
    def terms(self) -> tuple[tuple[str, float], ...]:
        """(divergence, weight) of every term; the route's loss is their weighted sum."""
        return ((self.divergence, self.weight), *self.extra)

    @property
    def views(self) -> tuple[str, ...]:
        return (self.target, self.reference) if self.reference else (self.target,)


@dataclass(frozen=True)
class Objective:
    """Router + routes. Route index r of a token selects `routes[r]`; -1 or a None route: no loss.

    Routers: `regimes` (DOPD's four), `all` (one route), `prune` (pruned_opd), `split` (route 1
    where the signal `split_on` reaches its step threshold, else route 0: EOPD, VA-OPD), or a
    function of the signals and step statistics (register_objective).
    """

    config: ObjectiveConfig
    router: str | Callable[[TokenSignals, dict], Tensor]
    routes: tuple[Route | None, ...]
    split_on: str | None = None  # the `split` router's signal: teacher_entropy | visual_advantage

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def signal_names(self) -> tuple[str, ...]:
        """The per-token signals this objective routes on (or shows: uniform), in TokenSignals order."""
        if self.router == "split":
            return (self.split_on,)
        if callable(self.router) or self.router in ("regimes", "prune") or self.config.name == "uniform":
            return _GAP_SIGNALS + (("q_teacher_plain",) if self.config.edge_check == "plain_teacher" else ())
        return ()

    @property
    def logprob_views(self) -> tuple[str, ...]:
        """Views whose sampled-token log-probs the objective reads (its signals, sampled routes);
        the others need only hidden states from scoring (top-K and full routes recompute logits)."""
        needed = {
            v for r in self.routes if r is not None and r.support == "sampled" for v in r.views
        } | self._signal_views()
        return tuple(v for v in SCORING_VIEWS if v in needed)

    @property
    def entropy_views(self) -> tuple[str, ...]:
        """Views whose per-token entropy a signal reads (EOPD's split on its target's entropy)."""
        return (self.routes[0].target,) if self.split_on == "teacher_entropy" else ()

    @property
    def response_verdicts(self) -> bool:
        """Whether the plan reads the verifier's verdict on each response (trust: verified, uni_opd)."""
        return self.config.trust == "verified" or self.config.name == "uni_opd"

    @property
    def teacher_verdicts(self) -> bool:
        """Whether the plan reads the privileged teacher's verdict per record (trust: verified)."""
        return self.config.trust == "verified"

    @property
    def sampling_logprob(self) -> bool:
        """Whether the plan reads the sampling policy's token log-probs (uni_opd's l_old)."""
        return self.config.name == "uni_opd"

    @property
    def needs_signals(self) -> bool:
        return bool(self.signal_names)

    @property
    def views(self) -> tuple[str, ...]:
        """Scoring views this objective needs, in SCORING_VIEWS order; only these are computed."""
        needed = {v for r in self.routes if r is not None for v in r.views} | self._signal_views()
        return tuple(v for v in SCORING_VIEWS if v in needed)

    def _signal_views(self) -> set[str]:
        """The views whose sampled-token log-probs the routing signals are made of."""
        signals, needed = set(self.signal_names), set()
        if signals & set(_GAP_SIGNALS):
            needed |= {"teacher_priv", "student_priv"}
        if signals & {"q_teacher_plain", "visual_advantage"}:
            needed |= {"teacher_priv", "teacher_plain"}
        return needed

    def token_signals(
        self, token_logprob: dict[str, Tensor], entropy: dict[str, Tensor] | None = None
    ) -> TokenSignals | None:
        """Routing signals from the scoring views' sampled-token log-probs (and, for EOPD, the
        target view's entropies); None if not routed."""
        names = self.signal_names
        if not names:
            return None
        if "advantage_gap" in names:
            plain = token_logprob["teacher_plain"] if "q_teacher_plain" in names else None
            return token_signals(token_logprob["teacher_priv"], token_logprob["student_priv"], plain)
        if self.split_on == "teacher_entropy":
            return TokenSignals(teacher_entropy=entropy[self.routes[0].target].detach().double())
        return TokenSignals(
            visual_advantage=information_edge(token_logprob["teacher_priv"], token_logprob["teacher_plain"])
        )

    def step_statistics(self, signals: TokenSignals | None, prune_keys: Tensor | None = None) -> dict[str, float]:
        """Statistics over all valid tokens of the step: thresholds, the prune cut-off, the split
        groups' sizes (`count/route0`, `count/route1`)."""
        stats: dict[str, float] = {}
        if signals is not None and signals.advantage_gap is not None:
            stats.update(compute_thresholds(signals, self.config.outlier_fraction))
        if self.router == "prune":
            keys = prune_keys.reshape(-1).double()
            n_drop = int(self.config.prune_fraction * keys.numel())
            # Cut-off = the n_drop-th largest key; tokens with key >= it are dropped.
            stats["prune_cutoff"] = (
                float("inf") if n_drop == 0 else torch.sort(keys, descending=True).values[n_drop - 1].item()
            )
        if self.router == "split":
            values = getattr(signals, self.split_on).reshape(-1).double()
            if self.config.split_threshold == "quantile":
                threshold = torch.quantile(values, self.config.split_quantile).item()
            else:
                threshold = trimmed_mean(values, self.config.outlier_fraction).item()
            high = int((values >= threshold).sum())
            stats.update(
                {self.split_on: threshold, "count/route1": float(high), "count/route0": float(values.numel() - high)}
            )
        return stats

    def prune_keys(self, signals: TokenSignals, generator: torch.Generator | None = None) -> Tensor:
        """Per-token keys whose largest `prune_fraction` are dropped by pruned_opd."""
        a = signals.advantage_gap.double()
        if self.config.prune_by == "largest_A":
            return a
        if self.config.prune_by == "smallest_A":
            return -a
        return torch.rand(a.shape, generator=generator, dtype=torch.float64).to(a.device)

    def assign_routes(
        self, valid: Tensor, signals: TokenSignals | None, stats: dict[str, float], prune_keys: Tensor | None = None
    ) -> Tensor:
        """Route index per token of `valid`'s shape; -1 where not valid or dropped."""
        if self.router == "regimes":
            routes = assign_regimes(signals, stats)
        elif callable(self.router):  # a registered objective's router: signals + thresholds -> route index
            routes = self.router(signals, stats).long()
        elif self.router == "split":
            routes = (getattr(signals, self.split_on) >= stats[self.split_on]).long()
        else:
            routes = torch.zeros(valid.shape, dtype=torch.long, device=valid.device)
            if self.router == "prune":
                routes = torch.where(prune_keys.double() >= stats["prune_cutoff"], -1, routes)
        return torch.where(valid.bool(), routes, -1)


def register_objective(name: str, build: Callable[[ObjectiveConfig], Objective], *, overwrite: bool = False) -> None:
    """Make `objective.name: NAME` build an objective with `build(config)` (CONTRIBUTING.md).

    Args:
        name: the objective's name in recipes; not one of the built-in OBJECTIVES.
        build: config -> Objective. A registered objective may read any knob of the config.
        overwrite: replace a different builder registered under the same name.

    Raises:
        ValueError: the name is taken.
    """
    if name in OBJECTIVES or (name in _REGISTERED and not overwrite and _REGISTERED[name] is not build):
        raise ValueError(f"an objective named {name!r} already exists")
    _REGISTERED[name] = build


def build_objective(config: ObjectiveConfig | None = None) -> Objective:
    """The objective of a config: DOPD's regime table, a baseline's or a comparison method's routes
    (docs/design.md §1.7), a registered objective, or `package.module:builder`.

    Args:
        config: the objective section; None: DOPD with the paper's defaults.

    Returns:
        Objective: its router, routes and the views it scores.

    Raises:
        ValueError: an unknown regime_routes key, a builder that cannot be imported or returns
            something other than an Objective.
    """
    c = config or ObjectiveConfig()
    if c.name in _REGISTERED or ":" in c.name:
        build = _REGISTERED.get(c.name) or _import_builder(c.name)
        objective = build(c)
        if not isinstance(objective, Objective):
            raise ValueError(f"objective builder {c.name!r} must return an Objective, got {type(objective).__name__}")
        return objective
    if c.name == "dopd":
        table = {  # Table 1.4 [paper]
            "LH": dict(target="teacher_priv", divergence="rkl", support="topk", weight=c.beta_light),
            "LL": dict(target="student_priv", divergence="rkl", support="topk", weight=c.beta_weak),
            "HT": dict(target="teacher_priv", divergence="js", support="full", weight=1.0),
            "HS": dict(target="student_priv", divergence="rkl", support="topk", weight=c.beta_light),
        }
        routes: list[Route | None] = []
        for regime in REGIME_NAMES:
            spec = {**table[regime], **c.regime_routes.get(regime, {})}
            unknown = set(spec) - {"target", "divergence", "support", "weight", "enabled"}
            if unknown:
                raise ValueError(
                    f"objective.regime_routes.{regime}: unknown keys {sorted(unknown)}; valid: target, divergence, "
                    f"support, weight, enabled"
                )
            enabled = spec.pop("enabled", True)
            routes.append(Route(**spec) if enabled and spec["weight"] != 0 else None)
        return Objective(c, "regimes", tuple(routes))
    rkl = c.baseline_divergence or "rkl"
    if (
        c.name == "eopd"
    ):  # RKL everywhere, + FKL where the teacher is uncertain [EOPD]; full vocabulary by default [ours]
        support = c.baseline_support or "full"
        low = Route(c.teacher_view, rkl, support, 1.0)
        high = Route(c.teacher_view, rkl, support, 1.0, extra=(("fkl", c.fkl_weight),) if c.fkl_weight else ())
        return Objective(c, "split", (low, high), split_on="teacher_entropy")
    if c.name == "exopd":  # sampled RKL to lambda*l_T + (1 - lambda)*l_ref, ref = the initial student [ExOPD]
        route = Route(c.teacher_view, "rkl", "sampled", 1.0, reference="reference", extrapolation=c.exopd_lambda)
        return Objective(c, "all", (route,))
    if c.name == "uni_opd":  # PPO-clipped sampled reward l_T - l_old, balanced and margin-calibrated [Uni-OPD]
        route = Route(c.teacher_view, "rkl", "sampled", 1.0, clip=(c.uni_clip_eps, c.uni_clip_eps_high))
        return Objective(c, "all", (route,))
    if c.name == "va_opd":  # KL to the privileged teacher, averaged per visual-advantage group [VA-OPD]
        support = c.baseline_support or "topk"
        low, high = (Route("teacher_priv", rkl, support, w) if w else None for w in (c.va_low_weight, c.va_high_weight))
        return Objective(c, "split", (low, high), split_on="visual_advantage")
    target = {
        "vanilla_opd": "teacher_plain",
        "pruned_opd": "teacher_plain",
        "privileged_opd": "teacher_priv",
        "self_distill": "student_priv",
        "uniform": "teacher_priv",
        "vision_opd": "student_priv",  # the model itself shown the evidence crop [Vision-OPD]
    }[c.name]
    default_divergence = "js" if c.name == "uniform" else "rkl"
    route = Route(target, c.baseline_divergence or default_divergence, c.baseline_support or "topk", 1.0)
    return Objective(c, "prune" if c.name == "pruned_opd" else "all", (route,))


def _import_builder(spec: str) -> Callable[[ObjectiveConfig], Objective]:
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"objective.name {spec!r}: cannot import the builder: {err}") from err
