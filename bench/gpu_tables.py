"""The README's GPU tables, written from the one result file of `bench/gpu_check.sh`.

    python bench/gpu_tables.py RESULT.json [--readme README.md]    # rewrite the tables in place
    # gather gpu_check.sh's parts into OUT_DIR/gpu_result.json
    python bench/gpu_tables.py --collect OUT_DIR

The tables sit between `<!-- gpu-tables:start -->` and `<!-- gpu-tables:end -->` in the README and
say which card, date and commit they come from; whatever the result file lacks is written as
"not measured", never guessed. Result file: {"card", "date", "commit", "source", "loss": [rows of
bench/loss_bench.py --device cuda], "loss_summary", "kernel_tests": {"passed", "failed"}, "recipes": [{"recipe",
"generation", "summary", "steps"}],
"demo": {"seconds", "accuracy_before", "accuracy_after"}}.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- gpu-tables:start -->", "<!-- gpu-tables:end -->"
SIZES = ((1024, 4096), (2048, 16384), (4096, 16384))
LOSS_ROWS = (  # (method, backend, label): the rows every result is read into
    ("naive", None, "naive DOPD (three views' fp32 logits)"),
    ("dopd", "triton", "chunked DOPD, Triton kernels"),
    ("dopd_torch", "torch", "chunked DOPD, torch backend"),
    ("vanilla", "triton", "`vanilla_opd` full RKL, Triton kernels"),
    ("vanilla", "torch", "`vanilla_opd` full RKL, torch backend"),
    ("trl", None, "TRL `ChunkedDivergenceFunction` (one JSD)"),
)
GOALS = (
    "goals: `vanilla_opd` ≤ 1.0× TRL's time and memory; DOPD ≤ 1.3× its time and ≤ 1.5× its memory (H 4096, T 16384)"
)


def render(result: dict) -> str:
    """The GPU section's tables as Markdown, from one result file."""
    commit = result.get("commit") or "unknown"
    lines = [
        f"Measured on **{result['card']}**, {result['date']}, commit `{commit}`"
        + (f" ({result['source']})" if result.get("source") else "")
        + ".",
        "",
    ]
    lines += [
        "| routed loss, bf16, V = 151,936, fwd+bwd | " + " | ".join(f"H {h}, T {t}" for h, t in SIZES) + " |",
        "|---|" + "---|" * len(SIZES),
    ]
    for method, backend, label in LOSS_ROWS:
        cells = [_loss_cell(result.get("loss") or [], method, backend, h, t) for h, t in SIZES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    summary = result.get("loss_summary")
    if summary:
        ratios = ", ".join(f"{k} {v}" for k, v in summary.items() if k.startswith("gpu_") and v is not None)
        lines += ["", f"Ratios at H {summary['at']['H']}, T {summary['at']['T']}: {ratios} ({GOALS})."]
    else:
        lines += ["", f"Ratios with the kernels: not measured ({GOALS})."]
    lines += [
        "",
        "| recipe (two steps, real shapes, random weights) | rollouts | peak memory | step | rollout | scoring | loss "
        "+ backward | update |",
        "|---|---|---|---|---|---|---|---|",
    ]
    recipes = result.get("recipes") or []
    for run in recipes:
        s, last = run["summary"], run["steps"][-1]
        lines.append(
            f"| {Path(run['recipe']).name} | {run['generation']} | {s['peak_memory_gb']} GB | {last['step_s']} s | "
            f"{last['rollout_s']} s | "
            f"{last['scoring_s']} s | {last['loss_backward_s']} s | {last['update_s']} s |"
        )
    if not recipes:
        lines.append("| both paper pairs, eager and compiled rollouts | not measured | | | | | | |")
    checks = []
    tests = result.get("kernel_tests")
    checks.append(
        f"kernel tests run compiled on the card: {tests['passed']} passed, {tests['failed']} failed"
        if tests
        else "kernel tests run compiled on the card: not measured"
    )
    demo = result.get("demo")
    checks.append(
        f"`dopd demo` on the card: {demo['seconds']} s, held-out accuracy {demo['accuracy_before']} → "
        f"{demo['accuracy_after']}"
        if demo
        else "`dopd demo` on the card: not measured"
    )
    lines += ["", "; ".join(checks) + "."]
    return "\n".join(lines)


def _loss_cell(rows: list[dict], method: str, backend: str | None, h: int, t: int) -> str:
    row = next(
        (
            r
            for r in rows
            if r["method"] == method
            and r["H"] == h
            and r["T"] == t
            and (backend is None or r.get("backend") == backend)
        ),
        None,
    )
    if row is None:
        return "not measured"
    if row.get("seconds") is None:
        return row.get("error") or "failed"
    return f"{row['seconds']:.3g} s, {row['peak_extra_gb']:.3g} GB" + (
        f" (chunk {row['chunk']})" if row.get("chunk") else ""
    )


def rewrite(readme: str, result: dict) -> str:
    """`readme` with the block between the markers replaced by the tables of `result`."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise ValueError(f"the README has no {START} ... {END} block")
    return pattern.sub(lambda _: f"{START}\n{render(result)}\n{END}", readme)


def collect(out: Path) -> dict:
    """One result file from the parts bench/gpu_check.sh writes into OUT."""

    def jsonl(path: Path) -> list[dict]:
        return (
            [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
            if path.is_file()
            else []
        )

    def pytest_counts(path: Path) -> dict | None:
        if not path.is_file():
            return None
        text = path.read_text()
        count = lambda word: sum(int(n) for n in re.findall(rf"(\d+) {word}", text))  # noqa: E731
        return {"passed": count("passed"), "failed": count("failed") + count("error")}

    loss = jsonl(out / "loss_gpu.jsonl")
    recipes = []
    for path in sorted(out.glob("recipe_*.jsonl")):
        rows = jsonl(path)
        if rows and "step" not in rows[-1]:
            recipes.append(
                {
                    "recipe": rows[-1]["recipe"],
                    "generation": path.stem.rsplit("_", 1)[-1],
                    "summary": rows[-1],
                    "steps": rows[:-1],
                }
            )
    demo = None
    if (out / "demo_out" / "summary.json").is_file():
        summary = json.loads((out / "demo_out" / "summary.json").read_text())
        seconds = (out / "demo_seconds.txt").read_text().strip() if (out / "demo_seconds.txt").is_file() else None
        demo = {
            "seconds": seconds,
            "accuracy_before": summary["accuracy_before"]["student"]["accuracy"],
            "accuracy_after": summary["accuracy_after"]["student"]["accuracy"],
        }
    commit = (
        subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or None
    )
    card = (out / "gpu.txt").read_text().strip().splitlines()[0] if (out / "gpu.txt").is_file() else "unknown card"
    return {
        "card": card,
        "date": (out / "date.txt").read_text().strip() if (out / "date.txt").is_file() else None,
        "commit": commit,
        "source": "bash bench/gpu_check.sh",
        "loss": [r for r in loss if "method" in r],
        "loss_summary": next((r for r in loss if "at" in r), None),
        "kernel_tests": pytest_counts(out / "kernel_tests.log"),
        "recipes": recipes,
        "demo": demo,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", nargs="?", help="a result file of bench/gpu_check.sh")
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    parser.add_argument(
        "--collect", metavar="OUT_DIR", help="gather gpu_check.sh's parts in OUT_DIR into OUT_DIR/gpu_result.json"
    )
    args = parser.parse_args()
    if args.collect:
        path = Path(args.collect) / "gpu_result.json"
        path.write_text(json.dumps(collect(Path(args.collect)), indent=2) + "\n")
        print(path)
        return
    if not args.result:
        parser.error("give a result file (or --collect OUT_DIR)")
    readme = Path(args.readme)
    readme.write_text(
        rewrite(readme.read_text(encoding="utf-8"), json.loads(Path(args.result).read_text())), encoding="utf-8"
    )
    print(f"rewrote the GPU tables of {readme} from {args.result}")


if __name__ == "__main__":
    main()
