"""The token routing view (paper Fig. 9): response tokens coloured by DOPD regime, with the
advantage gap A and the two confidences on hover, beside the image, question and privileged context.

`route_records` scores student responses with the same views, signals and router the trainer uses;
`write_routing_html` writes one self-contained HTML page (each image inlined once, in its own
format; boxes drawn by the browser in SVG), one `<span>` per response token carrying `data-regime`,
`data-a`, `data-q-student`, `data-q-teacher` at full precision.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
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

__all__ = ["RoutedResponse", "route_records", "regime_legend", "write_routing_html", "place_tags", "LABEL_COLORS"]

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


LABEL_COLORS = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
    "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075",
)  # fmt: skip
"""Box colours, one per label across the whole page (sorted labels, cycled): a label keeps its colour."""
DISPLAY_WIDTH = 480
"""Pixels an image is drawn at (scaled up or down): box tags stay readable at 12 px on any image."""
_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


def write_routing_html(
    path: str | Path,
    routed: list[RoutedResponse],
    thresholds: dict[str, float],
    image_root: str | Path | ImageRoots | None = None,
    title: str = "DOPD token routing",
    objective_config: ObjectiveConfig | None = None,
) -> Path:
    """One HTML page: per record the image (its privileged boxes drawn by the browser over it), the
    question, the privileged context and the response coloured by regime. Every number that decides
    a token's regime is on it: A in nats, q_S and q_T as probabilities in scientific notation and as
    log-probabilities, and the thresholds in the same units. Each distinct image is embedded once per
    page in its own format (a JPEG stays a JPEG); one colour per label across the page; box tags are
    placed so that none covers another. Images are inlined only from inside `image_root`'s allowed
    roots (docs/design.md §3.1): the page is meant to be shared."""
    path = Path(path)
    roots = image_roots(image_root)
    meaning = regime_legend(objective_config)
    legend = "".join(
        f'<span class="legend" style="background:{_tint(name)}">{name}</span> {html.escape(meaning[name])}<br>'
        for name in ("HT", "HS", "LH", "LL")
    )
    labels = sorted({label for item in routed for label, _, _ in _boxes(item.record)})
    colors = {label: LABEL_COLORS[k % len(LABEL_COLORS)] for k, label in enumerate(labels)}
    images: dict[str, tuple[str, str]] = {}  # content hash -> (css class, data URI): each image once
    sections = []
    for item in routed:
        record_id = html.escape(str(item.record.get("id", "")))
        scenes = "".join(
            _scene(item.record, k, ref, roots, images, colors) for k, ref in enumerate(image_parts(item.record))
        )
        answer = (
            f"<p><b>Reference answer:</b> {html.escape(str(item.record['answer']))}</p>"
            if item.record.get("answer") is not None
            else ""
        )
        extra = "".join(f"<p><b>{html.escape(k)}:</b> {html.escape(str(v))}</p>" for k, v in item.extra.items())
        sections.append(
            f'<section class="record" data-id="{record_id}"><h2>{record_id}</h2>'
            f'<div class="row"><div class="images">{scenes}</div><div class="text">'
            f"<p><b>Question:</b> {html.escape(_question(item.record))}</p>"
            f"<p><b>Privileged context</b> (teacher_priv and student_priv "
            f"only):</p><pre>{html.escape(context_text(item.record.get('privileged_context')))}</pre>"
            f"{answer}{extra}<p><b>Student response</b> (hover a token: A, q_S and q_T, "
            f'ln q_S and ln q_T):</p><div class="response">{_tokens(item)}</div></div></div></section>'
        )
    image_css = "".join(f'.{css} {{ background-image: url("{uri}"); }}\n' for css, uri in images.values())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body {{ font-family: sans-serif; max-width: 1200px; margin: 2em auto; }}
.row {{ display: grid; grid-template-columns: {DISPLAY_WIDTH + 12}px 1fr; gap: 1.5em; align-items: start; }}
.scene {{ position: relative; background-size: 100% 100%; image-rendering: pixelated; border: 1px solid #ccc; }}
.scene svg {{ position: absolute; left: 0; top: 0; }} figure {{ margin: 0 0 .5em 0; }}
.tok, .legend {{ padding: 1px 2px; margin: 0 1px; border-radius: 3px; font-family: monospace; white-space: pre-wrap; }}
pre {{ white-space: pre-wrap; background: #f6f6f6; padding: .5em; }}
section {{ border-top: 1px solid #ddd; padding: 1em 0; }} table.thresholds td {{ padding: 0 1em 0 0; }}
{image_css}</style></head><body><h1>{html.escape(title)}</h1>
{_thresholds_table(thresholds)}
<p>{legend}</p>{"".join(sections)}</body></html>"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _tokens(item: RoutedResponse) -> str:
    """One span per token; the data attributes keep full precision (a page reader can recompute the regime)."""
    spans = []
    for t, r, a, qs, qt in zip(item.tokens, item.regimes, item.advantage_gap, item.q_student, item.q_teacher):
        shown = f"{r}: A={a:.3f} nats  q_S={qs:.3e} (ln {_ln(qs)})  q_T={qt:.3e} (ln {_ln(qt)})"
        spans.append(
            f'<span class="tok" data-regime="{r}" data-a="{a!r}" data-q-student="{qs!r}" data-q-teacher="{qt!r}" '
            f'style="background:{_tint(r)}" title="{shown}">{html.escape(t) or "&#8203;"}</span>'
        )
    return "".join(spans)


def _ln(q: float) -> str:
    return f"{math.log(q):.3f}" if q > 0 else "-inf"


def _thresholds_table(thresholds: dict[str, float]) -> str:
    """The thresholds in the tokens' own units: Ā in nats, q̄ as probabilities and log-probabilities."""
    rows = []
    if "A" in thresholds:
        rows.append(f"<tr><td>Ā (advantage gap)</td><td>{thresholds['A']:.3f} nats</td><td></td></tr>")
    for key, name in (("q_student", "q̄_S (privileged student)"), ("q_teacher", "q̄_T (teacher)")):
        if key in thresholds:
            q = thresholds[key]
            rows.append(f"<tr><td>{name}</td><td>{q:.3e}</td><td>ln {_ln(q)}</td></tr>")
    data = html.escape(json.dumps(thresholds), quote=True)
    return (
        f"<p>Thresholds over these tokens (trimmed means):</p><table class=\"thresholds\" data-thresholds='{data}'>"
        + "".join(rows)
        + "</table>"
    )


def _boxes(record: dict) -> list[tuple[str, list[float], str]]:
    """(label, [x1, y1, x2, y2] pixels, tag text) of a grounding record's privileged boxes (none
    otherwise); a detector's box shows its confidence in its tag ("cat 0.87")."""
    privileged = record.get("privileged") if isinstance(record.get("privileged"), dict) else {}
    boxes = []
    for o in privileged.get("objects") or []:
        if isinstance(o, dict) and isinstance(o.get("bbox_px"), list) and len(o["bbox_px"]) == 4:
            label = str(o.get("label", ""))
            score = o.get("score")
            tag = f"{label} {score:.2f}" if isinstance(score, (int, float)) and not isinstance(score, bool) else label
            boxes.append((label, [float(v) for v in o["bbox_px"]], tag))
    return boxes


def _scene(record: dict, index: int, ref, roots, images: dict, colors: dict[str, str]) -> str:
    """An image drawn at DISPLAY_WIDTH, from the page's one copy of it, with (the first image of a
    grounding record) an SVG layer of its boxes and tags. The figure's `data-labels` says where each
    tag went (label, box and tag rectangle, in display pixels)."""
    data, mime, (width, height) = _image_bytes(ref, roots, str(record.get("id", "")))
    digest = hashlib.sha1(data).hexdigest()[:16]
    if digest not in images:
        images[digest] = (f"img-{len(images)}", f"data:{mime};base64,{base64.b64encode(data).decode()}")
    css = images[digest][0]
    scale = DISPLAY_WIDTH / width
    w, h = DISPLAY_WIDTH, round(height * scale)
    boxes = _boxes(record) if index == 0 else []
    placed = place_tags([[v * scale for v in box] for _, box, _ in boxes], [text for _, _, text in boxes], (w, h))
    shapes = []
    for (label, _, text), tag in zip(boxes, placed):
        color = colors[label]
        x1, y1, x2, y2 = tag["box"]
        tx1, ty1, tx2, ty2 = tag["at"]
        shapes.append(
            f'<rect x="{x1:.1f}" y="{y1:.1f}" width="{x2 - x1:.1f}" height="{y2 - y1:.1f}" fill="none" '
            f'stroke="{color}" stroke-width="2"/><rect x="{tx1}" y="{ty1}" width="{tx2 - tx1}" height="{ty2 - ty1}" '
            f'fill="{color}"/><text x="{tx1 + 3}" y="{ty2 - 4}" font-size="12" fill="white" '
            f'style="paint-order: stroke" stroke="black" stroke-width="2">{html.escape(text)}</text>'
        )
    svg = f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}">{"".join(shapes)}</svg>'
    caption = (
        "<figcaption>privileged boxes: "
        + " ".join(
            f'<span class="box-label" style="border-left: 12px solid {colors[label]}; padding-left: 4px">'
            f"{html.escape(label)}</span>"
            for label in sorted({label for label, _, _ in boxes})
        )
        + "</figcaption>"
        if boxes
        else ""
    )
    tags = html.escape(json.dumps(placed), quote=True)
    return (
        f"<figure data-labels='{tags}' data-image='{css}'><div class=\"scene {css}\" role=\"img\" "
        f'aria-label="image {index}" style="width:{w}px;height:{h}px">{svg}</div>{caption}</figure>'
    )


def _image_bytes(ref, roots, record_id: str) -> tuple[bytes, str, tuple[int, int]]:
    """The image's own encoded bytes and type (a JPEG file stays a JPEG) and its size; an image the
    browser may not show (another format) or one built in memory becomes a PNG."""
    image = load_image(ref, roots, record_id)  # decoded and confined to the roots: faults named as ever
    raw = None
    if isinstance(ref, dict) and ref.get("bytes") is not None:
        raw = ref["bytes"]
    elif isinstance(ref, (str, Path)) or (isinstance(ref, dict) and ref.get("path")):
        raw = roots.resolve(str(ref["path"] if isinstance(ref, dict) else ref), record_id).read_bytes()
    if raw is not None:
        from PIL import Image

        with Image.open(io.BytesIO(raw)) as probe:
            mime = _MIME.get(probe.format or "")
        if mime:
            return raw, mime, image.size
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "image/png", image.size


def place_tags(boxes: list[list[float]], labels: list[str], size: tuple[int, int]) -> list[dict]:
    """Where each box's tag goes (display pixels, 12 px text): the first of above the box's top-left
    corner, inside it under the top edge, below its bottom edge, inside above the bottom edge, that
    stays in the image and covers no tag placed before it (else the least covering one)."""
    width, height = size
    placed: list[dict] = []
    for box, label in zip(boxes, labels):
        w, h = 7 * len(label) + 8, 16
        left = int(min(max(box[0], 0), max(width - w, 0)))
        candidates = [box[1] - h, box[1], box[3], box[3] - h]
        best, best_cover = None, None
        for top in candidates:
            top = int(min(max(top, 0), max(height - h, 0)))
            rect = [left, top, left + w, top + h]
            cover = sum(_overlap(rect, p["at"]) for p in placed)
            if best is None or cover < best_cover:
                best, best_cover = rect, cover
            if cover == 0:
                break
        placed.append({"label": label, "box": [round(v, 1) for v in box], "at": best})
    return placed


def _overlap(a: list[int], b: list[int]) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def _tint(regime: str) -> str:
    """The regime colour of every plot (`REGIME_COLORS`, method/routing.py), translucent behind text."""
    return f"{REGIME_COLORS[regime]}66"


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
