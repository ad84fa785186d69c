"""One optimizer step on 8 fixed responses, split as each job says (split-invariance tests).

    python tests/helpers/ddp_step.py NORMALIZATIONS OUT.pt --jobs 1x8:ddp:text,4x2:ddp:text [--objective O] [--update]
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 tests/helpers/ddp_step.py NORMALIZATIONS OUT.pt \\
        --jobs 2x2x2:ddp:text,2x2x2:fsdp:text+text_untied+vision                 # 2 processes x 2 x 2

A job is MODE:PARALLEL:CASES: the split (1x8 and 4x2 on one process, 2x2x2 on two), `parallel`
and the recipes of `CASES` (joined by +). Responses are fixed (not sampled) so every split sees
exactly the same tokens; the main process saves, per job, case and normalisation (comma-separated),
the step's metrics and the student's gradient (summed over processes; whole, also when sharded;
embedding-sized tensors as count sketches, `compact`) to OUT.pt; with --update AdamW then applies the
last normalisation's gradient, and the student's weights before (and their SHA-256) and after are
saved too.
"""

import argparse
import hashlib
import sys
import zlib
from pathlib import Path

import torch

from dopd_vl.distributed import reduce_sum

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from dopd_vl.training.config import load_config  # noqa: E402
from dopd_vl.training.rollout import (
    MicroBatch,  # noqa: E402
    Rollout,  # noqa: E402
)
from dopd_vl.training.trainer import Trainer  # noqa: E402

NUM_RECORDS, PER_RECORD = 4, 2
TEXT = [f"data.train={REPO / 'configs' / 'data' / 'arith' / 'data.jsonl'}"]
# recipe, overrides: tied and untied output embeddings, a text and a vision student; under fsdp a whole teacher, a live
# privileged student
CASES = {
    "text": ("tiny_text.yaml", TEXT),
    "text_untied": (
        "tiny_text.yaml",
        [
            *TEXT,
            "student.name_or_path=tiny:qwen3:tie_word_embeddings=false,seed=3",
            "teacher.shard=false",
            "objective.privileged_student=live",
        ],
    ),  # the paper's: the sharded student scores student_priv
    "text_vanilla": (
        "tiny_text.yaml",
        [*TEXT, "objective.name=vanilla_opd"],
    ),  # its frozen privileged copy is never used
    "text_kernels": (
        "tiny_text.yaml",
        [*TEXT, "objective.name=vanilla_opd", "loss_backend=triton"],
    ),  # Triton interpreter: minutes, not in the suite
    "vision": (
        "tiny_vlm.yaml",
        [f"data.train={REPO / 'configs' / 'data' / 'shapes' / 'data.jsonl'}", "gradient_checkpointing=true"],
    ),
}


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


def whole(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


SKETCH_ABOVE, SKETCH_BUCKETS = 1 << 18, 1 << 16


def compact(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` flattened when small; an embedding-sized one (151,936 rows: ~10^7 float64 values, 80 MB a
    copy, dozens of copies per file: GBs of disk) as a count sketch: each value added, with a random sign,
    into one of 2^16 buckets, hashed the same way for the same name in every process. The sketch is
    linear (sketch(a) - sketch(b) = sketch(a - b)) and its squared norm is an unbiased estimate of the
    squared norm, within about 0.6% at 2^16 buckets: the test's tolerances (1e-5, 1e-6 relative) sit
    orders of magnitude away from both a split's rounding and a real error."""
    flat = tensor.detach().flatten().to(torch.float64)
    if flat.numel() <= SKETCH_ABOVE:
        return flat
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    bucket = torch.randint(0, SKETCH_BUCKETS, (flat.numel(),), generator=g)
    sign = torch.randint(0, 2, (flat.numel(),), generator=g).to(torch.float64) * 2 - 1
    return torch.zeros(SKETCH_BUCKETS, dtype=torch.float64).index_add_(0, bucket, sign * flat)


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def run_case(mode: str, parallel: str, case: str, args) -> dict:
    recipe, overrides = CASES[case]
    config = load_config(
        REPO / "configs" / recipe,
        [
            f"output_dir={args.out.parent / f'run-{mode}-{parallel}-{case}'}",
            "objective.top_k=16",
            f"objective.name={args.objective}",
            f"parallel={parallel}",
            "loss_chunk_size=5",
            "optim.max_grad_norm=0",
            "optim.lr=1e-3",
            "student.dtype=float64",  # exact comparison: float32 matmuls differ with padding shapes
            "teacher.dtype=float64",
            *overrides,  # last: a case may set its own objective
        ],
    )
    trainer = Trainer(config)
    gathers = count_root_gathers(trainer) if parallel == "fsdp" else {}
    records = trainer.run.data.records[:NUM_RECORDS]
    responses = fixed_responses(trainer.run.tokenizer.eos_token_id)
    owner = [i // PER_RECORD for i in range(len(responses))]

    def micro_batch(rows: list[int]) -> MicroBatch:
        used = sorted({owner[r] for r in rows})
        return MicroBatch(
            [records[i] for i in used],
            Rollout([used.index(owner[r]) for r in rows], [responses[r] for r in rows], ["eos"] * len(rows)),
        )

    process, processes = trainer.run.accelerator.process_index, trainer.run.accelerator.num_processes
    splits = {"1x8": [list(range(8))], "4x2": [[0, 1], [2, 3], [4, 5], [6, 7]]}
    if mode == "2x2x2":
        assert processes == 2, "2x2x2 runs under torchrun with 2 processes"
        mine = [[0, 1], [2, 3]] if process == 0 else [[4, 5], [6, 7]]
    else:
        mine = splits[mode]
    results = {}
    before = {n: whole(p) for n, p in trainer.run.models.student.named_parameters()}
    before_sha256 = {n: digest(t) for n, t in before.items()}
    before = {n: compact(n, t) for n, t in before.items()}
    norms = args.normalizations.split(",")
    for normalization in norms:
        trainer.run.config.objective.normalization = normalization
        metrics = trainer.train_step([micro_batch(rows) for rows in mine], update=False)
        grads = {
            n: compact(n, whole(p.grad)) for n, p in trainer.run.models.student.named_parameters() if p.grad is not None
        }
        tokens = reduce_sum(trainer.run.accelerator, sum(responses[r].numel() for rows in mine for r in rows))
        results[normalization] = {"metrics": metrics, "grads": grads, "tokens": int(tokens)}
        if args.update and normalization == norms[-1]:  # AdamW on the last normalisation's gradient
            trainer.apply_update(metrics["loss"])
            results["update"] = {
                "before": before,
                "before_sha256": before_sha256,
                "after": {n: compact(n, whole(p)) for n, p in trainer.run.models.student.named_parameters()},
            }
        trainer.run.optimizer.zero_grad(set_to_none=True)
    results["root_gathers"] = dict(gathers)
    results["loss_backend"] = (
        trainer.run.backends.loss_backend
    )  # after the kernels' self-check (it may fall back to torch)
    return results


def count_root_gathers(trainer: Trainer) -> dict[str, int]:
    """How often each model's root unit (the one holding its output embedding) is gathered: FSDP's
    FSDPParamGroup.unshard counted when it starts a gather (the group is sharded, none pending)."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    roots = {
        "student": trainer.run.models.student_call,
        "teacher": trainer.run.models.teacher,
        "privileged_student": trainer.run.models.privileged_student,
    }
    counts = dict.fromkeys(roots, 0)
    real = FSDPParamGroup.unshard

    def counted(group, *args, **kwargs):
        if not group.is_unsharded and group._all_gather_result is None:
            for name, root in roots.items():
                if any(module is root for module in group.modules):
                    counts[name] += 1
        return real(group, *args, **kwargs)

    FSDPParamGroup.unshard = counted
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("normalizations")
    parser.add_argument("out", type=Path)
    parser.add_argument("--jobs", required=True, help="MODE:PARALLEL:CASE+CASE,...")
    parser.add_argument("--objective", default="dopd")
    parser.add_argument("--update", action="store_true")
    args = parser.parse_args()
    results = {}
    for job in args.jobs.split(","):
        mode, parallel, cases = job.split(":")
        results[f"{mode}:{parallel}"] = {case: run_case(mode, parallel, case, args) for case in cases.split("+")}
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    torch.save(results, args.out)


if __name__ == "__main__":
    main()
