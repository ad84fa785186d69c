"""`dopd plot RUN_DIR`: PNG figures from a run folder's metrics.jsonl (docs/design.md §4.5 names)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dopd_vl.errors import DopdError
from dopd_vl.method.routing import REGIME_COLORS, REGIME_NAMES

logger = logging.getLogger(__name__)

__all__ = ["read_metrics", "plot_run"]


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
    """Regime occupancy, thresholds, entropy, loss and (when logged) accuracy over steps."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in rows]

    def series(key: str) -> list[float] | None:
        values = [r.get(key) for r in rows]
        return values if any(v is not None for v in values) else None

    def figure(name: str, title: str, ylabel: str, lines: dict[str, list | None], **style) -> Path | None:
        lines = {k: v for k, v in lines.items() if v is not None}
        if not lines:
            return None
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for label, values in lines.items():
            ax.plot(steps, [float("nan") if v is None else v for v in values], label=label, **style.get(label, {}))
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    written = []
    fractions = {r: series(f"frac/{r}") for r in REGIME_NAMES}
    if all(v is not None for v in fractions.values()):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.stackplot(
            steps,
            *[fractions[r] for r in REGIME_NAMES],
            labels=list(REGIME_NAMES),
            colors=[REGIME_COLORS[r] for r in REGIME_NAMES],
            alpha=0.85,
        )
        ax.set(title="Regime occupancy (token fractions)", xlabel="step", ylabel="fraction", ylim=(0, 1))
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "regimes.png", dpi=110)
        plt.close(fig)
        written.append(out / "regimes.png")
    written.append(
        figure(
            "thresholds",
            "Routing thresholds (trimmed means)",
            "value",
            {
                "A (advantage gap)": series("threshold/A"),
                "q_S (privileged student)": series("threshold/q_student"),
                "q_T (teacher)": series("threshold/q_teacher"),
            },
        )
    )
    written.append(
        figure(
            "entropy",
            "Entropy at response tokens (nats)",
            "entropy",
            {
                "student (plain view)": series("entropy/student"),
                "teacher (privileged)": series("entropy/teacher_priv"),
            },
        )
    )
    written.append(figure("loss", "Routed loss", "loss", {"loss": series("loss")}))
    written.append(
        figure("accuracy", "Rollout accuracy (student, plain view)", "accuracy", {"accuracy": series("accuracy")})
    )
    written = [p for p in written if p is not None]
    logger.info("wrote %d plots to %s", len(written), out)
    return written
