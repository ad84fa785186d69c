"""The routing page (dopd_vl/apps/routing_page.py): the legend follows the objective, the page is
light and carries the numbers that decide each route, box tags stay readable."""

import html
import json
import re
import shutil
from pathlib import Path

import pytest


def test_routing_legend_follows_the_objective_config():
    from dopd_vl.apps.routing_page import regime_legend
    from dopd_vl.method.objectives import ObjectiveConfig

    legend = regime_legend()
    assert legend["HT"].endswith("JS (full) to teacher_priv, weight 1")
    assert legend["HS"].endswith("RKL (topk) to student_priv, weight 0.6")
    assert legend["LL"].endswith("RKL (topk) to student_priv, weight 0.3")
    assert legend["LH"].endswith("RKL (topk) to teacher_priv, weight 0.6")
    assert regime_legend(ObjectiveConfig(regime_routes={"LL": {"enabled": False}}))["LL"].endswith("switched off")


COCO128 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "coco128"


def _coco128_records(tmp_path, stems: list[str]) -> list[dict]:
    """Grounding records of a few COCO128 images (real JPEGs and YOLO boxes), through the builder."""
    from data_builders.grounding import build_grounding, load_annotations
    from dopd_vl.data.sources import load_records

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for stem in stems:
        shutil.copy(COCO128 / "images" / "train2017" / f"{stem}.jpg", images)
        shutil.copy(COCO128 / "labels" / "train2017" / f"{stem}.txt", labels)
    out = tmp_path / "grounding.jsonl"
    loaded = load_annotations("yolo", images, labels, COCO128 / "coco128.yaml")
    build_grounding(loaded, out, objects="all")
    return list(load_records(out))


def _page_data(page: str) -> tuple[list[dict], list[dict], dict]:
    """What the page carries: every token span's attributes, every figure's tags, the image styles."""
    spans = [
        {k: html.unescape(v) for k, v in re.findall(r'(data-[a-z-]+)="([^"]*)"', span)}
        for span in re.findall(r'<span class="tok"[^>]*>', page)
    ]
    figures = [json.loads(html.unescape(m)) for m in re.findall(r"<figure data-labels='([^']*)'", page)]
    styles = dict(re.findall(r'\.(img-\d+) \{ background-image: url\("data:([a-z/]+);base64,', page))
    return spans, figures, styles


def test_a_coco128_page_is_light_keeps_jpegs_once_and_shows_the_deciding_numbers(tmp_path):
    """3 records over 2 COCO128 JPEGs (two records share one): under 0.5 MB, each image embedded once
    and still a JPEG, q values of 1e-5 visible (not 0.000), thresholds in the same units, one colour
    per label across the page, and no box tag covering another."""
    from dopd_vl.apps.routing_page import LABEL_COLORS, RoutedResponse, write_routing_html

    records = _coco128_records(tmp_path, ["000000000009", "000000000025"])
    by_image: dict[str, list[dict]] = {}
    for r in records:
        by_image.setdefault(r["prompt"][0]["content"][0]["image"], []).append(r)
    shared, other = sorted(by_image.values(), key=len, reverse=True)[:2]
    chosen = [*shared[:2], other[0]]  # two records of one image, one of the other
    routed = [
        RoutedResponse(r, ["2", "x"], ["HT", "HS"], [4.064, 0.1], [1.2e-5, 3.0e-2], [3.4e-5, 1.0e-3]) for r in chosen
    ]
    thresholds = {"A": 0.1623, "q_student": 2.5e-5, "q_teacher": 7.5e-6}
    path = write_routing_html(tmp_path / "page.html", routed, thresholds, image_root=tmp_path)
    page = path.read_text()
    assert path.stat().st_size < 500_000
    spans, figures, styles = _page_data(page)
    assert len(styles) == 2 and set(styles.values()) == {"image/jpeg"}  # once per image, still JPEG
    assert page.count("data:image/jpeg;base64,") == 2
    first = spans[0]
    assert float(first["data-q-student"]) == 1.2e-5 and float(first["data-q-teacher"]) == 3.4e-5
    assert "q_S=1.200e-05 (ln -11.331)  q_T=3.400e-05 (ln -10.289)" in page  # HT: q_T >= q_S, visible
    assert "7.500e-06" in page and "2.500e-05" in page and "0.162 nats" in page  # thresholds, same units
    labels = sorted({t["label"] for figure in figures for t in figure})
    drawn = re.findall(r'stroke="(#[0-9a-f]{6})" stroke-width="2"/>.*?<text[^>]*>([^<]*)</text>', page)
    by_label: dict[str, set] = {}
    for colour, label in drawn:
        by_label.setdefault(html.unescape(label), set()).add(colour)
    assert set(by_label) == set(labels) and all(len(c) == 1 for c in by_label.values())  # one colour a label
    assert {next(iter(c)) for c in by_label.values()} <= set(LABEL_COLORS)
    for figure in figures:  # no tag covers another, and each stays on the drawn image
        rects = [t["at"] for t in figure]
        for i, a in enumerate(rects):
            for b in rects[i + 1 :]:
                assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1]), (a, b)
    assert all(t["at"][0] >= 0 and t["at"][1] >= 0 for f in figures for t in f)


def test_tags_avoid_each_other_and_the_image_edges():
    from dopd_vl.apps.routing_page import place_tags

    # Two boxes with the same top-left corner: the second tag moves inside / below, not onto the first.
    placed = place_tags([[10, 40, 100, 90], [10, 40, 60, 70]], ["cat", "dog"], (200, 120))
    a, b = (p["at"] for p in placed)
    assert a == [10, 24, 10 + 7 * 3 + 8, 40]  # above the first box
    assert min(a[3], b[3]) <= max(a[1], b[1])  # the second does not cover it
    # A box at the top edge: its tag goes inside, under the edge, not above the image.
    (top,) = place_tags([[5, 0, 50, 30]], ["car"], (100, 100))
    assert top["at"][1] == 0


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("chromium") is None, reason="no headless Chromium (apt-get install chromium)")
def test_a_real_browser_draws_each_labels_boxes_in_its_colour(tmp_path):
    """Headless Chromium renders the page: every label's colour is on screen (its boxes and tag drawn
    by the browser over the JPEG), and the page carries no image the browser could not decode."""
    import subprocess

    from PIL import Image

    from dopd_vl.apps.routing_page import RoutedResponse, write_routing_html

    records = _coco128_records(tmp_path, ["000000000009"])[:1]
    routed = [RoutedResponse(records[0], ["2"], ["HT"], [1.0], [0.1], [0.2])]
    page = write_routing_html(tmp_path / "page.html", routed, {"A": 0.5}, image_root=tmp_path)
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1200,900",
         page.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    pixels = Image.open(shot).convert("RGB")
    counts = {colour: n for n, colour in pixels.getcolors(1 << 24)}
    _, figures, _ = _page_data(page.read_text())
    colours = set(re.findall(r'stroke="(#[0-9a-f]{6})" stroke-width="2"', page.read_text()))
    assert len(colours) == len({t["label"] for t in figures[0]}) >= 2
    for colour in colours:
        rgb = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
        assert counts.get(rgb, 0) > 100, colour  # its boxes and tag are on screen


def test_a_detectors_boxes_show_their_scores(tmp_path):
    """A box with a `score` (detector predictions, docs/design.md §3.2) is tagged "label 0.87"; a box
    without one keeps its label alone."""
    from PIL import Image

    from dopd_vl.apps.routing_page import RoutedResponse, write_routing_html

    Image.new("RGB", (64, 48), "white").save(tmp_path / "im.png")
    objects = [
        {"label": "cat", "bbox_px": [2, 2, 30, 30], "score": 0.8712},
        {"label": "dog", "bbox_px": [34, 10, 60, 40]},
    ]
    record = {
        "id": "r0",
        "prompt": [{"role": "user", "content": [{"type": "image", "image": "im.png"}, {"type": "text", "text": "?"}]}],
        "privileged_context": "boxes",
        "privileged": {"format": "qwen3vl_grounding_scored", "image_size": [64, 48], "objects": objects},
    }
    routed = [RoutedResponse(record, ["1"], ["LH"], [0.1], [0.5], [0.5])]
    page = write_routing_html(
        tmp_path / "p.html", routed, {"A": 0.2, "q_student": 0.5, "q_teacher": 0.5}, image_root=tmp_path
    ).read_text()
    texts = [html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", page)]
    assert sorted(texts) == ["cat 0.87", "dog"]
