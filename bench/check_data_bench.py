"""Data preflight benchmark: `check_data` over 100k text records, memory-mapped (Parquet) and JSONL.

    python bench/check_data_bench.py [--records 100000] [--mode quick]

Records are GSM8K-style generated word problems with step hints (the hint builder's output shape),
written once to a temporary folder as JSONL and as Parquet (read through `datasets`, memory-mapped).
Each source is checked as `dopd train` checks it (schema, duplicate ids, the privileged view rendered
and tokenised by the real Qwen tokenizer, prompt length against a limit). Prints one JSON line per
source: seconds, records per second, faults found (0 expected).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_sources(folder: Path, n: int) -> dict[str, Path]:
    import datasets

    rng = random.Random(0)
    rows = []
    for i in range(n):
        a, b, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 20)
        rows.append(
            {
                "id": f"p{i:06d}",
                "prompt": [
                    {
                        "role": "user",
                        "content": f"Dev has {a} boxes with {b} stamps each and finds {c} more. How many stamps?",
                    }
                ],
                "privileged_context": f"Hints:\n1. The boxes hold {a}*{b}=? stamps.\n2. With the extra ones that is "
                f"?+{c}=? stamps.",
                "answer": str(a * b + c),
            }
        )
    jsonl = folder / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = folder / "data.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    return {"jsonl": jsonl, "parquet": parquet}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--mode", choices=("quick", "full"), default="quick")
    args = parser.parse_args()

    from dopd_vl import check_data, load_tokenizer, make_adapter

    adapter = make_adapter(load_tokenizer())
    with tempfile.TemporaryDirectory() as tmp:
        sources = write_sources(Path(tmp), args.records)
        for kind, path in sources.items():
            started = time.perf_counter()
            valid, report, _ = check_data(path, adapter, mode=args.mode, max_prompt_length=512, progress=False)
            seconds = time.perf_counter() - started
            print(
                json.dumps(
                    {
                        "source": kind,
                        "records": report.records,
                        "valid": len(valid),
                        "faults": len(report.faults),
                        "seconds": round(seconds, 2),
                        "records_per_s": round(report.records / seconds),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
