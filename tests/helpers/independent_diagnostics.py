"""`dopd diagnose`'s figures recomputed independently: full-vocabulary logits of plain HF forwards,
the routing written out here."""

import math

import pytest
import torch


def independent_statistics(rollouts, config, steps):
    """Per-step thresholds, regimes and edges from full-vocabulary logits of plain HF forwards
    (one batched forward per view and step), log-softmax in float64, routing written out here."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from dopd_vl.data.sources import load_records, records_root
    from dopd_vl.modality.adapters import make_adapter
    from dopd_vl.modality.batches import build_views
    from dopd_vl.models.loading import load_processing, resolve_model_path

    records = {r["id"]: r for r in load_records(config.data.train)}
    models, adapters = {}, {}
    for role in ("student", "teacher"):
        path = resolve_model_path(getattr(config, role).name_or_path)
        processing = load_processing(path)
        auto = AutoModelForImageTextToText if hasattr(processing, "image_processor") else AutoModelForCausalLM
        models[role], adapters[role] = (
            auto.from_pretrained(path).eval(),
            make_adapter(processing, image_root=records_root(config.data.train)),
        )
    vocab = len(adapters["student"].tokenizer)
    out = []
    for step in range(1, steps + 1):
        rows = [r for r in rollouts if r["step"] == step]
        responses = [torch.tensor(r["response_ids"]) for r in rows]
        views = build_views(
            adapters,
            ("student", "teacher_priv", "student_priv", "teacher_plain"),
            [records[r["id"]] for r in rows],
            responses,
        )
        logp = {}
        for view, batch in views.items():
            with torch.no_grad():
                logits = models["teacher" if view.startswith("teacher") else "student"](**batch.inputs).logits
            picked = logits.gather(1, batch.response_positions[..., None].expand(-1, -1, logits.shape[-1]))[
                batch.response_mask
            ]
            logp[view] = (
                picked[:, :vocab]
                .double()
                .log_softmax(-1)
                .gather(-1, batch.response_ids[batch.response_mask][:, None])
                .squeeze(-1)
            )
        t, s, p, own = (logp[v] for v in ("teacher_priv", "student_priv", "teacher_plain", "student"))
        a, q_t, q_s = (t - s).abs(), t.exp(), s.exp()

        def trimmed(v):  # mean of the N - floor(0.05 N) smallest
            return v.sort().values[: len(v) - math.floor(0.05 * len(v))].mean()

        high, confident = a >= trimmed(a), (q_t + q_s) >= trimmed(q_t) + trimmed(q_s)
        paper = [(2 if qt >= qs else 3) if h else (0 if c else 1) for h, c, qt, qs in zip(high, confident, q_t, q_s)]
        edge = [
            (2 if (qt >= qs) == (qp >= qs) else 3) if h else (0 if c else 1)
            for h, c, qt, qs, qp in zip(high, confident, q_t, q_s, p.exp())
        ]
        out.append(
            {
                "paper": paper,
                "edge": edge,
                "endorsement": float((q_t >= q_s).double().mean()),
                "information_edge": t - p,
                "capability": p - own,
            }
        )
    return out


def assert_equals_independent_statistics(result: dict, rollouts: list[dict], config, steps: int) -> None:
    """Every step's regime shares (paper's rule and edge check), endorsement and edges in
    `dopd diagnose`'s result equal `independent_statistics` on the same rollouts."""
    independent = independent_statistics(rollouts, config, steps=steps)
    assert len(result["steps"]) == len(independent) == steps
    for row, ref in zip(result["steps"], independent):
        n = len(ref["paper"])
        assert row["tokens"] == n
        for code, name in enumerate(("LH", "LL", "HT", "HS")):
            assert row[f"frac/{name}"] == pytest.approx(ref["paper"].count(code) / n, abs=1e-12)
            assert row[f"edge_check/frac/{name}"] == pytest.approx(ref["edge"].count(code) / n, abs=1e-12)
            assert row[f"route/{name}"] == row[f"frac/{name}"]  # the recipe is dopd without the edge check
        assert row["endorsement"] == pytest.approx(ref["endorsement"], abs=1e-12)
        assert row["information_edge/mean"] == pytest.approx(float(ref["information_edge"].mean()), abs=1e-5)
        assert row["information_edge/above_1nat"] == pytest.approx(
            float((ref["information_edge"] > 1).double().mean()), abs=1e-12
        )
        assert row["capability_edge/mean"] == pytest.approx(float(ref["capability"].mean()), abs=1e-5)
