"""The token routing view (paper Fig. 9): response tokens coloured by DOPD regime, with the
advantage gap A and the two confidences on hover, beside the image, question and privileged context.

`route_records` scores student responses with the same views, signals and router the trainer uses;
`write_routing_html` writes one self-contained HTML page (images inlined), one `<span>` per
response token carrying `data-regime`, `data-a`, `data-q-student`, `data-q-teacher`.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from dopd_vl.data.image_roots import ImageRoots, image_roots
from dopd_vl.data.images import image_parts, load_image
from dopd_vl.data.schema import context_text
from dopd_vl.method.objectives import ObjectiveConfig, build_objective
from dopd_vl.method.routing import REGIME_COLORS, REGIME_NAMES, assign_regimes, token_signals
from dopd_vl.method.views import TEACHER_VIEWS
from dopd_vl.modality.batches import build_views
from dopd_vl.training.models import ModelScorer

__all__ = ["RoutedResponse", "route_records", "regime_legend", "write_routing_html", "label_rectangle"]

REGIME_CONDITION = {
    "LH": "low gap, confident",
    "LL": "low gap, uncertain",
    "HT": "high gap, teacher more confident",
    "HS": "high gap, privileged student more confident",
}


def regime_legend(objective_config: ObjectiveConfig | None = None) -> dict[str, str]:
    """Each regime's condition and the route the objective actually gives it (overrides included)."""
    objective = build_objective(objective_config or ObjectiveConfig())
    if objective.router != "regimes":  # shown as DOPD would route; this objective's loss does not use the regimes
        return {
            name: f"{REGIME_CONDITION[name]} (as DOPD would route; {objective.name} does not route by regime)"
            for name in REGIME_NAMES
        }
    legend = {}
    for name, route in zip(REGIME_NAMES, objective.routes):
        action = (
            "switched off"
            if route is None
            else " + ".join(f"{d.upper()} ({route.support}) to {route.target}, weight {w:g}" for d, w in route.terms)
        )
        legend[name] = f"{REGIME_CONDITION[name]}: {action}"
    return legend


@dataclass
class RoutedResponse:
    record: dict
    tokens: list[str]
    regimes: list[str]
    advantage_gap: list[float]
    q_student: list[float]
    q_teacher: list[float]
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def route_records(
    student: nn.Module,
    teacher: nn.Module,
    adapters: dict[str, object],
    records: list[dict],
    responses: list[Tensor],
    vocab_size: int,
    objective_config: ObjectiveConfig | None = None,
) -> tuple[list[RoutedResponse], dict[str, float]]:
    """Route every token of `responses` (one per record) with DOPD; thresholds over all of them."""
    objective = build_objective(objective_config or ObjectiveConfig())
    routed_by_gap = "advantage_gap" in objective.signal_names
    # The regimes shown are DOPD's: objectives that route otherwise are shown as DOPD would route them.
    names = ("student", "teacher_priv", "student_priv") + (
        ("teacher_plain",) if "q_teacher_plain" in objective.signal_names else ()
    )
    views = build_views(adapters, names, records, responses)
    was_training = student.training
    student.eval()
    scorers = {v: ModelScorer(teacher if v in TEACHER_VIEWS else student) for v in names if v != "student"}
    targets = {v: scorer.score(views[v], vocab_size, 256, True, True) for v, scorer in scorers.items()}
    student.train(was_training)
    logprob = {v: t.token_logprob for v, t in targets.items()}
    signals = (
        objective.token_signals(logprob)
        if routed_by_gap
        else token_signals(logprob["teacher_priv"], logprob["student_priv"])
    )
    if not routed_by_gap:
        objective = build_objective(ObjectiveConfig(outlier_fraction=objective.config.outlier_fraction))
    stats = objective.step_statistics(signals)
    regimes = assign_regimes(signals, stats)
    tokenizer = adapters["student"].tokenizer
    out, start = [], 0
    for record, response in zip(records, responses):
        n = response.numel()
        sl = slice(start, start + n)
        out.append(
            RoutedResponse(
                record,
                [tokenizer.decode([int(t)]) for t in response],
                [REGIME_NAMES[int(r)] for r in regimes[sl]],
                signals.advantage_gap[sl].tolist(),
                signals.q_student[sl].tolist(),
                signals.q_teacher[sl].tolist(),
            )
        )
        start += n
    return out, {k: float(v) for k, v in stats.items() if k in ("A", "q_student", "q_teacher")}


def write_routing_html(
    path: str | Path,
    routed: list[RoutedResponse],
    thresholds: dict[str, float],
    image_root: str | Path | ImageRoots | None = None,
    title: str = "DOPD token routing",
    objective_config: ObjectiveConfig | None = None,
) -> Path:
    """One HTML page: per record the image, question, privileged context and the coloured response.
    The legend is derived from the objective (pass the config used for `route_records`). Images are
    inlined only from inside `image_root`'s allowed roots (docs/design.md §3.1): the page is meant to
    be shared, so a record's path must not pull another local file into it."""
    path = Path(path)
    roots = image_roots(image_root)
    meaning = regime_legend(objective_config)
    legend = "".join(
        f'<span class="legend" style="background:{_tint(name)}">{name}</span> {html.escape(meaning[name])}<br>'
        for name in ("HT", "HS", "LH", "LL")
    )
    sections = []
    for item in routed:
        spans = "".join(
            f'<span class="tok" data-regime="{r}" data-a="{a:.4f}" data-q-student="{qs:.4f}" data-q-teacher="{qt:.4f}" '
            f'style="background:{_tint(r)}" title="{r}: A={a:.3f}  q_S={qs:.3f}  '
            f'q_T={qt:.3f}">{html.escape(t) or "&#8203;"}</span>'
            for t, r, a, qs, qt in zip(item.tokens, item.regimes, item.advantage_gap, item.q_student, item.q_teacher)
        )
        images = "".join(
            _image_html(item.record, k, load_image(ref, roots, str(item.record.get("id", ""))))
            for k, ref in enumerate(image_parts(item.record))
        )
        answer = (
            f"<p><b>Reference answer:</b> {html.escape(str(item.record['answer']))}</p>"
            if item.record.get("answer") is not None
            else ""
        )
        extra = "".join(f"<p><b>{html.escape(k)}:</b> {html.escape(str(v))}</p>" for k, v in item.extra.items())
        record_id = html.escape(str(item.record.get("id", "")))
        sections.append(
            f'<section class="record" data-id="{record_id}"><h2>{record_id}</h2>'
            f'<div class="row"><div class="images">{images}</div><div class="text">'
            f"<p><b>Question:</b> {html.escape(_question(item.record))}</p>"
            f"<p><b>Privileged context</b> (teacher_priv and student_priv "
            f"only):</p><pre>{html.escape(context_text(item.record.get('privileged_context')))}</pre>"
            f"{answer}{extra}<p><b>Student response</b> (hover a token for A, q_S, q_T):</p><div "
            f'class="response">{spans}</div></div></div></section>'
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; }}
.row {{ display: flex; gap: 1.5em; }} .images img {{ max-width: 320px; image-rendering: pixelated; border: 1px solid
#ccc; }}
.box-label {{ padding-left: 4px; margin-right: 6px; font-size: 90%; }} figure {{ margin: 0; }}
.tok, .legend {{ padding: 1px 2px; margin: 0 1px; border-radius: 3px; font-family: monospace; white-space: pre-wrap; }}
pre {{ white-space: pre-wrap; background: #f6f6f6; padding: .5em; }} section {{ border-top: 1px solid #ddd; padding: 1em
0; }}
</style></head><body><h1>{html.escape(title)}</h1>
<p>Thresholds over these tokens: <code>{
        html.escape(json.dumps({k: round(v, 4) for k, v in thresholds.items()}))
    }</code></p>
<p>{legend}</p>{"".join(sections)}</body></html>"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _image_html(record: dict, index: int, image) -> str:
    """An inlined image; a grounding record's first image with its privileged boxes (supervision's
    box annotator) and labels drawn, and a legend of the labels in the boxes' colours. Where each
    label was drawn is in the figure's `data-labels` (label, box and label rectangle, pixels)."""
    privileged = record.get("privileged") if isinstance(record.get("privileged"), dict) else {}
    objects = [o for o in privileged.get("objects") or [] if isinstance(o, dict) and isinstance(o.get("bbox_px"), list)]
    if index != 0 or not objects:
        return f'<img src="{_data_uri(image)}" alt="image">'
    import numpy as np

    sv = _supervision()
    names = [str(o.get("label", "")) for o in objects]
    labels = sorted(set(names))
    palette = sv.ColorPalette.DEFAULT
    detections = sv.Detections(
        xyxy=np.array([o["bbox_px"] for o in objects], dtype=float).reshape(-1, 4),
        class_id=np.array([labels.index(name) for name in names]),
    )
    drawn = sv.BoxAnnotator(color=palette, thickness=2).annotate(image.convert("RGB"), detections)
    placed = _draw_labels(
        drawn, [o["bbox_px"] for o in objects], names, [palette.by_idx(labels.index(n)) for n in names]
    )
    legend = "".join(
        f'<span class="box-label" style="border-left: 12px solid '
        f'{palette.by_idx(k).as_hex()}">{html.escape(label)}</span> '
        for k, label in enumerate(labels)
    )
    return (
        f"<figure data-labels='{html.escape(json.dumps(placed), quote=True)}'><img src=\"{_data_uri(drawn)}\" "
        f'alt="image with the privileged boxes"><figcaption>privileged boxes: {legend}</figcaption></figure>'
    )


def label_rectangle(box: list[float], text_size: tuple[int, int], image_size: tuple[int, int]) -> list[int]:
    """Where a box's label goes ([x1, y1, x2, y2] pixels): on the box's top edge, above it, where
    there is room; inside the box, under its top edge, where the box touches the top of the image
    (above it the label would be clipped to a strip). Kept inside the image horizontally."""
    (w, h), (width, height) = text_size, image_size
    left = int(min(max(box[0], 0), max(width - w, 0)))
    top = int(box[1]) - h if box[1] >= h else int(max(box[1], 0))
    top = min(top, max(height - h, 0))
    return [left, top, left + w, top + h]


def _draw_labels(image, boxes: list[list[float]], names: list[str], colors) -> list[dict]:
    """Each label on a filled rectangle in its box's colour (`label_rectangle` places it)."""
    from PIL import ImageDraw, ImageFont

    draw, font, pad = ImageDraw.Draw(image), ImageFont.load_default(), 2
    _, line_top, _, line_bottom = draw.textbbox((0, 0), "Tg", font=font)  # one height for every label
    placed = []
    for box, name, color in zip(boxes, names, colors):
        left, _, right, _ = draw.textbbox((0, 0), name, font=font)
        rect = label_rectangle(box, (right - left + 2 * pad, line_bottom - line_top + 2 * pad), image.size)
        draw.rectangle(rect, fill=color.as_rgb())
        draw.text((rect[0] + pad - left, rect[1] + pad - line_top), name, fill="black", font=font)
        placed.append({"label": name, "box": [round(float(v), 1) for v in box], "at": rect})
    return placed


def _tint(regime: str) -> str:
    """The plots' regime colour, translucent behind text (one palette: dopd_vl/apps/plots.py)."""
    return f"{REGIME_COLORS[regime]}66"


def _supervision():
    """supervision warns at import that OpenCV is absent; its Pillow path is what we use."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*OpenCV.*")
        import supervision

    return supervision


def _question(record: dict) -> str:
    for message in record["prompt"]:
        if message.get("role") == "user":
            content = message["content"]
            return (
                content
                if isinstance(content, str)
                else " ".join(p.get("text", "") for p in content if p.get("type") == "text")
            )
    return ""


def _data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
