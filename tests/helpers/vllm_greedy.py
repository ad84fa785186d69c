"""The vLLM engine against the hf engine on the tiny vLLM recipe (tests/vllm, in .venv-vllm).

    python tests/helpers/vllm_greedy.py OUT_DIR

Greedy (temperature 0) runs of 3 optimizer steps, one per engine. Before and after the vllm run
trains, both engines answer the same 8 records; after it, the student's weights are perturbed
without a sync (the engines must now differ: the comparison can fail) and synced (equal again).
Writes OUT_DIR/result.json. vLLM needs the `__main__` guard: its engine may start processes.
"""

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "tiny_text_vllm.yaml"
ARITH = REPO / "configs" / "data" / "arith" / "data.jsonl"


def responses(trainer, engine, records) -> list[list[int]]:
    out = engine.sample(trainer.run.models, trainer.run.data.adapters["student"], records, trainer.run.config.rollout)
    return [r.tolist() for r in out.responses]


def main(out: Path) -> None:
    from dopd_vl.training.config import load_config
    from dopd_vl.training.engines import HFEngine
    from dopd_vl.training.trainer import Trainer

    common = [f"data.train={ARITH}", "rollout.temperature=0", "max_steps=3", "save_steps=100", "optim.lr=1e-2"]
    result = {}
    for engine in ("vllm", "hf"):
        trainer = Trainer(load_config(RECIPE, [*common, f"rollout.engine={engine}", f"output_dir={out / engine}"]))
        records = [trainer.run.data.records[i] for i in range(8)]
        both = lambda: {engine.name: responses(trainer, engine, records) for engine in (trainer.run.engine, HFEngine())}
        if engine == "vllm":
            result["before"] = both()
        trainer.train()
        metrics = [json.loads(line) for line in (out / engine / "metrics.jsonl").read_text().splitlines()]
        result[f"{engine}_losses"] = [m["loss"] for m in metrics]
        result[f"{engine}_metrics"] = metrics
        if engine == "vllm":
            result["after"] = both()
            with torch.no_grad():  # the live student moves; the engine keeps the last synced weights
                for p in trainer.run.models.student.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
            result["unsynced"] = both()
            trainer.run.engine.sync(trainer.run.models.student)
            result["resynced"] = both()
            del trainer
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
