"""`dopd plot`'s figures read at a glance: legends beside the data (never on it), whole steps on the
x axis, one unit per y axis, and no legend for a single series."""

import json

import pytest

from dopd_vl.apps.plots import plot_run, run_figures


def _rows(steps: int) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        share = [0.4, 0.3, 0.1, 0.2]
        row = {"step": step, "loss": 1.0 / step, "entropy/student": 2.0, "entropy/teacher_priv": 1.5}
        row.update({f"frac/{r}": v for r, v in zip(("LH", "LL", "HT", "HS"), share)})
        row.update({"threshold/A": 0.16, "threshold/q_student": 1e-4 * step, "threshold/q_teacher": 3e-5 * step})
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def figures():
    import matplotlib

    matplotlib.use("Agg")
    made = run_figures(_rows(3))  # a 3-step run: the case whose axis once read 0.5, 1.5, 2.5
    yield made
    import matplotlib.pyplot as plt

    for fig in made.values():
        plt.close(fig)


def test_legends_sit_beside_the_data_and_single_series_have_none(figures):
    for name, fig in figures.items():
        fig.canvas.draw()
        for ax in fig.axes:
            legend = ax.get_legend()
            series = len(ax.get_lines()) or len(ax.collections)
            if series <= 1:
                assert legend is None, name
                continue
            assert legend is not None, name
            box, area = legend.get_window_extent(), ax.get_window_extent()
            assert box.x0 >= area.x1, (name, box, area)  # wholly to the right of the plotting area


def test_the_step_axis_shows_whole_steps_only(figures):
    for name, fig in figures.items():
        fig.canvas.draw()
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), (name, ticks)


def test_thresholds_keep_nats_and_probabilities_on_separate_axes(figures):
    gap, conf = figures["thresholds"].axes
    assert gap.get_ylabel() == "nats" and conf.get_ylabel() == "probability"
    assert conf.get_yscale() == "log"  # probabilities of 1e-5 are not a flat line at 0


def test_plot_run_writes_a_png_per_figure(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(3)))
    written = plot_run(run)
    assert sorted(p.stem for p in written) == ["entropy", "loss", "regimes", "thresholds"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_diagnose_png_keeps_its_legends_off_the_data():
    """diagnose.png's occupancy legend once covered the HS bar's label: every legend sits outside its panel."""
    import matplotlib
    import torch

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dopd_vl.eval.diagnose import diagnose_figure

    summary = {
        f"{p}/{g}": v
        for p in ("frac", "edge_check/frac")
        for g, v in zip(("LH", "LL", "HT", "HS"), (0.4, 0.3, 0.07, 0.23))
    }
    summary.update(endorsement=0.7, **{"information_edge/above_1nat": 0.1})
    result = {"summary": summary, "tokens": 100, "recipe": {"student": "s", "teacher": "t"}}
    g = torch.Generator().manual_seed(0)
    pooled = {k: torch.rand(100, generator=g) for k in ("advantage_gap", "q_teacher", "q_student", "information_edge")}
    fig = diagnose_figure(result, pooled, [{"threshold/A": 0.5}])
    fig.canvas.draw()
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is not None:
            box, area = legend.get_window_extent(), ax.get_window_extent()
            assert box.y1 <= area.y0 or box.x0 >= area.x1, (ax.get_title(), box, area)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "HS\n0.230" in texts  # the share printed whole, uncovered
    plt.close(fig)
