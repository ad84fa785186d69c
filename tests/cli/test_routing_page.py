"""The routing page (dopd_vl/apps/routing_page.py): the legend follows the objective, box labels
stay readable."""


def test_routing_legend_follows_the_objective_config():
    from dopd_vl.apps.routing_page import regime_legend
    from dopd_vl.method.objectives import ObjectiveConfig

    legend = regime_legend()
    assert legend["HT"].endswith("JS (full) to teacher_priv, weight 1")
    assert legend["HS"].endswith("RKL (topk) to student_priv, weight 0.6")
    assert legend["LL"].endswith("RKL (topk) to student_priv, weight 0.3")
    assert legend["LH"].endswith("RKL (topk) to teacher_priv, weight 0.6")
    assert regime_legend(ObjectiveConfig(regime_routes={"LL": {"enabled": False}}))["LL"].endswith("switched off")


def test_a_box_touching_the_top_edge_gets_its_label_inside_the_box(tmp_path):
    """A label goes above its box where there is room, and inside the box, under its top edge,
    where the box touches the top of the image (above it, it would be clipped to a strip)."""
    import base64
    import html
    import io
    import json
    import re

    from PIL import Image

    from dopd_vl.apps.routing_page import RoutedResponse, write_routing_html

    Image.new("RGB", (120, 90), "white").save(tmp_path / "scene.png")
    objects = [
        {"label": "cat", "bbox_px": [10.0, 0.0, 70.0, 50.0]},  # touches the top edge
        {"label": "dog", "bbox_px": [40.0, 50.0, 110.0, 85.0]},  # room above
    ]
    record = {
        "id": "r0",
        "prompt": [
            {"role": "user", "content": [{"type": "image", "image": "scene.png"}, {"type": "text", "text": "?"}]}
        ],
        "privileged_context": "boxes",
        "privileged": {"format": "qwen3vl_grounding", "image_size": [120, 90], "objects": objects},
    }
    routed = RoutedResponse(record, tokens=["2"], regimes=["LL"], advantage_gap=[0.1], q_student=[0.5], q_teacher=[0.6])
    page = write_routing_html(tmp_path / "page.html", [routed], {"A": 0.1}, image_root=tmp_path).read_text()

    placed = json.loads(html.unescape(re.search(r"<figure data-labels='([^']*)'", page).group(1)))
    assert [p["label"] for p in placed] == ["cat", "dog"]
    cat, dog = (p["at"] for p in placed)
    height = cat[3] - cat[1]
    assert 8 <= height <= 20 and dog[3] - dog[1] == height
    assert cat[1] >= 0 and cat[0] >= 10 and cat[3] <= 50  # inside the box, under its top edge
    assert dog[3] == 50 and dog[1] == 50 - height and dog[0] == 40  # on the top edge, above the box
    drawn = Image.open(io.BytesIO(base64.b64decode(re.search(r'base64,([^"]+)"', page).group(1)))).convert("RGB")
    for x1, y1, x2, y2 in (cat, dog):  # the label's filled rectangle is in the drawing, where the data says
        assert drawn.getpixel((x1 + 1, y1 + 1)) != (255, 255, 255) and drawn.getpixel((x2 - 1, y2 - 1)) != (
            255,
            255,
            255,
        )
