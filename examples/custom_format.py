"""A custom privileged format: boxes as a Markdown table, registered and used two ways.

    python examples/custom_format.py --images DIR --annotations FILE.json --out OUT.jsonl

1. Through the Python API: register the format, load annotations, build records.
2. Through the CLI: `dopd build grounding ... --privileged-format examples.custom_format:MarkdownBoxes`
   (run from the repository root so that `examples` is importable), which imports and registers it.
"""

from __future__ import annotations

import argparse

from data_builders import qwen3vl_box, register_format


class MarkdownBoxes:
    """Objects as a Markdown table with Qwen3-VL 0-1000 coordinates."""

    name = "markdown_boxes"

    def render(self, privileged: dict) -> str:
        rows = ["| object | x1 | y1 | x2 | y2 |", "|---|---|---|---|---|"]
        for obj in privileged["objects"]:
            x1, y1, x2, y2 = qwen3vl_box(obj["bbox_px"], privileged["image_size"])
            rows.append(f"| {obj['label']} | {x1} | {y1} | {x2} | {y2} |")
        return "Objects in the image (0-1000 coordinates):\n" + "\n".join(rows)


def main() -> None:
    from data_builders import build_grounding, load_annotations

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="coco", choices=("coco", "yolo", "voc"))
    parser.add_argument("--images", required=True)
    parser.add_argument("--annotations", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    register_format(MarkdownBoxes())
    images = load_annotations(args.format, args.images, args.annotations)
    report = build_grounding(images, args.out, privileged_format="markdown_boxes")
    print(f"wrote {args.out}: {report.summary()}")
    print(report.records[0]["privileged_context"])


if __name__ == "__main__":
    main()
