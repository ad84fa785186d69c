"""`dopd plot RUN_DIR`: PNG figures from a run folder's metrics.jsonl (docs/design.md §4.5 names)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dopd_vl.errors import DopdError
from dopd_vl.method.routing import REGIME_COLORS, REGIME_NAMES

logger = logging.getLogger(__name__)

__all__ = ["read_metrics", "plot_run", "run_figures"]


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DopdError(f"{path}: no metrics.jsonl (is {run_dir} a run folder written by `dopd train`?)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DopdError(f"{path}:{n}: not JSON: {err}") from err
    if not rows:
        raise DopdError(f"{path}: empty")
    return rows


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Regime occupancy, thresholds, entropy, loss and (when logged) accuracy over steps, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in run_figures(read_metrics(run_dir)).items():
        fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")  # legends sit outside the axes
        plt.close(fig)
        written.append(out / f"{name}.png")
    logger.info("wrote %d plots to %s", len(written), out)
    return written


def run_figures(rows: list[dict]) -> dict:
    """name -> matplotlib figure of a run's metrics: integer steps on x, one unit per y axis, a legend
    only for several series and always beside the data, never on it."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [r["step"] for r in rows]

    def series(key: str) -> list[float] | None:
        values = [r.get(key) for r in rows]
        return None if all(v is None for v in values) else [float("nan") if v is None else v for v in values]

    def axes_style(ax, title: str, ylabel: str, legend: bool) -> None:
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
        if legend:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)

    def lines(ax, curves: dict[str, list | None], title: str, ylabel: str, log: bool = False) -> bool:
        curves = {k: v for k, v in curves.items() if v is not None}
        for label, values in curves.items():
            ax.plot(steps, values, label=label, marker="o" if len(steps) < 12 else None, markersize=3)
        if log and all(v > 0 for values in curves.values() for v in values if v == v):
            ax.set_yscale("log")  # probabilities near 0 stay visible
        axes_style(ax, title, ylabel, legend=len(curves) > 1)
        return bool(curves)

    figures = {}
    fractions = {r: series(f"frac/{r}") for r in REGIME_NAMES}
    if all(v is not None for v in fractions.values()):
        fig, ax = plt.subplots(figsize=(6.8, 3.6))
        ax.stackplot(
            steps,
            *[fractions[r] for r in REGIME_NAMES],
            labels=list(REGIME_NAMES),
            colors=[REGIME_COLORS[r] for r in REGIME_NAMES],
            alpha=0.85,
        )
        ax.set(ylim=(0, 1))
        axes_style(ax, "Regime occupancy (token fractions)", "fraction of tokens", legend=True)
        figures["regimes"] = fig
    gap, q = series("threshold/A"), {"q_S (privileged student)": series("threshold/q_student")}
    q["q_T (teacher)"] = series("threshold/q_teacher")
    if gap is not None or any(v is not None for v in q.values()):
        fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.6))
        lines(left, {"A (advantage gap)": gap}, "Gap threshold Ā (trimmed mean)", "nats")
        lines(right, q, "Confidence thresholds (trimmed means)", "probability", log=True)
        figures["thresholds"] = fig
    single = {
        "entropy": ("Entropy at response tokens", "nats", {"student (plain view)": series("entropy/student")}),
        "loss": ("Routed loss", "loss", {"loss": series("loss")}),
        "accuracy": ("Rollout accuracy (student, plain view)", "accuracy", {"accuracy": series("accuracy")}),
    }
    single["entropy"][2]["teacher (privileged)"] = series("entropy/teacher_priv")
    for name, (title, ylabel, curves) in single.items():
        if any(v is not None for v in curves.values()):
            fig, ax = plt.subplots(figsize=(6.8, 3.6))
            lines(ax, curves, title, ylabel)
            figures[name] = fig
    for fig in figures.values():
        fig.tight_layout()
    return figures
