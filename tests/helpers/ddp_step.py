"""One optimizer step's gradient on 8 fixed responses, split as the mode says (split-invariance test).

    python tests/helpers/ddp_step.py MODE NORMALIZATIONS OUT.pt [OBJECTIVE]  # MODE 1x8 | 4x2
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 \\
        tests/helpers/ddp_step.py 2x2x2 NORMALIZATIONS OUT.pt                 # 2 processes x 2 x 2

Responses are fixed (not sampled) so every split sees exactly the same tokens; the main process
saves, per normalisation (comma-separated), the step's metrics and the student's gradient
(summed over processes) to OUT.pt.
"""

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from dopd_vl.config import load_config  # noqa: E402
from dopd_vl.rollout import Rollout  # noqa: E402
from dopd_vl.trainer import MicroBatch, Trainer  # noqa: E402

NUM_RECORDS, PER_RECORD = 4, 2


def fixed_responses(eos: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    out = []
    for i in range(NUM_RECORDS * PER_RECORD):
        length = 3 + (5 * i) % 9  # lengths 3..11, so micro-batches pad differently
        ids = torch.randint(200, 20_000, (length,), generator=g)
        if i % 3 == 0:
            ids[-1] = eos  # some responses end with EOS, some were cut at max_new_tokens
        out.append(ids)
    return out


def main() -> None:
    mode, normalizations, out_path = sys.argv[1], sys.argv[2].split(","), Path(sys.argv[3])
    objective = sys.argv[4] if len(sys.argv) > 4 else "dopd"
    config = load_config(REPO / "configs" / "tiny_text.yaml", [
        f"data.train={REPO / 'configs' / 'data' / 'arith' / 'data.jsonl'}",
        f"output_dir={out_path.parent / ('run-' + mode)}",
        "objective.top_k=16",
        f"objective.name={objective}",
        "loss_chunk_size=5",
        "optim.max_grad_norm=0",
        "student.dtype=float64",  # exact comparison: float32 matmuls differ with padding shapes
        "teacher.dtype=float64",
    ])
    trainer = Trainer(config)
    records = trainer.records[:NUM_RECORDS]
    responses = fixed_responses(trainer.tokenizer.eos_token_id)
    owner = [i // PER_RECORD for i in range(len(responses))]

    def micro_batch(rows: list[int]) -> MicroBatch:
        used = sorted({owner[r] for r in rows})
        return MicroBatch([records[i] for i in used], Rollout([used.index(owner[r]) for r in rows], [responses[r] for r in rows], ["eos"] * len(rows)))

    process, processes = trainer.accelerator.process_index, trainer.accelerator.num_processes
    splits = {"1x8": [list(range(8))], "4x2": [[0, 1], [2, 3], [4, 5], [6, 7]]}
    if mode == "2x2x2":
        assert processes == 2, "2x2x2 runs under torchrun with 2 processes"
        mine = [[0, 1], [2, 3]] if process == 0 else [[4, 5], [6, 7]]
    else:
        mine = splits[mode]
    results = {}
    for normalization in normalizations:
        trainer.config.objective.normalization = normalization
        metrics = trainer.train_step([micro_batch(rows) for rows in mine], update=False)
        grads = {n: p.grad.detach().clone() for n, p in trainer.student.named_parameters() if p.grad is not None}
        trainer.optimizer.zero_grad(set_to_none=True)
        results[normalization] = {"metrics": metrics, "grads": grads}
    if trainer.accelerator.is_main_process:
        torch.save(results, out_path)


if __name__ == "__main__":
    main()
