"""Routed-loss benchmark: naive vs chunked DOPD loss vs TRL's chunked JSD, side by side.

    python bench/loss_bench.py [--quick]            # CPU (the CPU goals)
    python bench/loss_bench.py --device cuda        # GPU, bf16 (the GPU goals; see gpu_main)

Every configuration runs in a fresh subprocess on the same synthetic hidden states (V = 151,936).
Methods, each timed for one forward + backward with gradients to the student's hidden states and
output embedding:

* naive:   DOPD reference path (`dopd_loss`) over materialised fp32 logits of the three views.
* chunked: `chunked_objective_loss` from hidden states (routing signals given, as the trainer's
           scoring pass provides them); `chunked+signals` also times computing those signals.
* trl:     `trl.kernels.chunked_divergence.ChunkedDivergenceFunction`, one full-vocabulary JSD
           (beta 0.5) to one teacher: a single-term loss, no routing (extra `bench`).

Memory: peak resident set size of the subprocess (`ru_maxrss`) during the measured call minus the
resident size just before it, i.e. the extra memory the loss needs beyond its inputs. A naive run
that needs more than `--naive-limit-gb` is stopped by an address-space limit and reported as
"at least" that much.

Prints one JSON line per configuration, then one JSON line with the ratios at T=4096, H=1024.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

V = 151_936
VOCAB = 151_669
TARGET = (1024, 4096)  # (H, T)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _inputs(h: int, t: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    student_w = (torch.randn(V, h, generator=g) / h**0.5).requires_grad_()
    teacher_w = torch.randn(V, h, generator=g) / h**0.5
    student_h = torch.randn(t, h, generator=g).requires_grad_()
    teacher_h = student_h.detach() + 0.8 * torch.randn(t, h, generator=g)
    spriv_h = student_h.detach() + 0.3 * torch.randn(t, h, generator=g)
    ids = torch.randint(0, VOCAB, (t,), generator=g)
    return student_w, teacher_w, student_h, teacher_h, spriv_h, ids


def worker(method: str, h: int, t: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from dopd_vl import (
        ObjectiveConfig,
        build_objective,
        chunked_objective_loss,
        dopd_loss,
        normalization_weights,
        target_states,
        token_signals,
    )

    student_w, teacher_w, student_h, teacher_h, spriv_h, ids = _inputs(h, t)
    objective = build_objective(ObjectiveConfig())
    mask = torch.ones(1, t, dtype=torch.bool)
    weight = normalization_weights(mask.sum(-1), "sequence")

    def signals_and_targets():
        targets = {
            "teacher_priv": target_states(teacher_h, teacher_w, ids, VOCAB),
            "student_priv": target_states(spriv_h, student_w, ids, VOCAB),
        }
        sig = token_signals(targets["teacher_priv"].token_logprob, targets["student_priv"].token_logprob)
        route = objective.assign_routes(torch.ones(t, dtype=torch.bool), sig, objective.step_statistics(sig))
        return targets, route

    pre = None
    if method == "chunked":  # signals come from the trainer's scoring pass: not timed here
        pre = signals_and_targets()

    def run():
        if method == "naive":
            s_logits = (student_h @ student_w[:VOCAB].T)[None]
            with torch.no_grad():
                t_logits = (teacher_h @ teacher_w[:VOCAB].T)[None]
                p_logits = (spriv_h @ student_w[:VOCAB].T)[None]
            loss = dopd_loss(s_logits, t_logits, p_logits, ids[None], mask).loss
        elif method in ("chunked", "chunked+signals"):
            targets, route = pre if pre is not None else signals_and_targets()
            loss = chunked_objective_loss(objective, student_h, student_w, ids, route, weight, targets, VOCAB).loss
        elif method == "trl":
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

            div, _ = ChunkedDivergenceFunction.apply(
                student_h, student_w[:VOCAB], None, teacher_h, teacher_w[:VOCAB], None, 0.5
            )
            loss = div.mean()
        else:
            raise ValueError(method)
        loss.backward()
        return loss.item()

    rss_before = _rss_bytes()
    start = time.perf_counter()
    loss = run()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "method": method,
        "H": h,
        "T": t,
        "V": V,
        "seconds": round(seconds, 3),
        "peak_extra_gb": round((peak - rss_before) / 2**30, 3),
        "loss": loss,
    }


def _run_subprocess(method: str, h: int, t: int, limit_gb: float) -> dict:
    code = (
        "import json, resource, sys; sys.path.insert(0, '.');"
        f"resource.setrlimit(resource.RLIMIT_AS, ({int(limit_gb * 2**30)}, {int(limit_gb * 2**30)})) if "
        f"{method == 'naive'} else None;"
        "from bench.loss_bench import worker;"
        f"print('RESULT ' + json.dumps(worker({method!r}, {h}, {t})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    failed = "MemoryError" in proc.stderr or "DefaultCPUAllocator" in proc.stderr or proc.returncode in (-9, 137)
    if failed:
        return {
            "method": method,
            "H": h,
            "T": t,
            "V": V,
            "seconds": None,
            "peak_extra_gb": f">= {limit_gb}",
            "error": "out of memory at the address-space limit",
        }
    raise RuntimeError(f"{method} H={h} T={t} failed:\n{proc.stderr[-3000:]}")


# ------------------------------------------------------------------------------------------- GPU
GPU_SIZES = [(1024, 4096), (2048, 16384), (4096, 16384)]
GPU_TARGET = (4096, 16384)
GPU_METHODS = ("naive", "dopd", "dopd_torch", "vanilla", "trl")


def gpu_measure(fn, device, reps: int = 3) -> tuple[float, float | None]:
    """Median seconds of `reps` calls after one warm-up (CUDA events on a GPU), and the peak memory
    the calls allocated beyond what was held before them (GiB; None off CUDA)."""
    import torch

    cuda = device.type == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if cuda else None
    return sorted(times)[len(times) // 2], peak


def gpu_case(method: str, h: int, t: int, device, dtype, vocab: int = VOCAB, rows: int = V) -> dict:
    """One method at one size: forward + backward from hidden states and output embeddings
    (routing signals given, as the trainer's scoring provides them)."""
    import torch

    from dopd_vl import (
        ObjectiveConfig,
        auto_chunk_size,
        build_objective,
        chunked_objective_loss,
        dopd_loss,
        normalization_weights,
        target_states,
        triton_available,
    )

    g = torch.Generator(device=device).manual_seed(0)
    student_w = (torch.randn(rows, h, generator=g, device=device) / h**0.5).to(dtype).requires_grad_()
    teacher_w = (torch.randn(rows, h, generator=g, device=device) / h**0.5).to(dtype)
    student_h = torch.randn(t, h, generator=g, device=device).to(dtype).requires_grad_()
    teacher_h = (student_h.detach().float() + 0.8 * torch.randn(t, h, generator=g, device=device)).to(dtype)
    spriv_h = (student_h.detach().float() + 0.3 * torch.randn(t, h, generator=g, device=device)).to(dtype)
    ids = torch.randint(0, vocab, (t,), generator=g, device=device)
    mask = torch.ones(1, t, dtype=torch.bool, device=device)
    weight = normalization_weights(mask.sum(-1), "sequence")
    config = ObjectiveConfig(name="vanilla_opd", baseline_support="full") if method == "vanilla" else ObjectiveConfig()
    objective = build_objective(config)
    backend = "torch" if method == "dopd_torch" or not triton_available(device) else "triton"
    chunk = auto_chunk_size(device, vocab, backend=backend)
    with torch.no_grad():
        targets = {
            "teacher_priv": target_states(teacher_h, teacher_w, ids, vocab),
            "student_priv": target_states(spriv_h, student_w, ids, vocab),
        }
        targets["teacher_plain"] = targets["teacher_priv"]
        signals = objective.token_signals({k: v.token_logprob for k, v in targets.items()})
        route = objective.assign_routes(
            torch.ones(t, dtype=torch.bool, device=device), signals, objective.step_statistics(signals)
        )

    def run():
        student_w.grad = student_h.grad = None
        if method == "naive":
            s_logits = (student_h @ student_w[:vocab].T)[None]
            with torch.no_grad():
                t_logits, p_logits = (teacher_h @ teacher_w[:vocab].T)[None], (spriv_h @ student_w[:vocab].T)[None]
            loss = dopd_loss(s_logits, t_logits, p_logits, ids[None], mask).loss
        elif method == "trl":
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

            div, _ = ChunkedDivergenceFunction.apply(
                student_h, student_w[:vocab], None, teacher_h, teacher_w[:vocab], None, 0.5
            )
            loss = div.mean()
        else:
            loss = chunked_objective_loss(
                objective, student_h, student_w, ids, route, weight, targets, vocab, chunk, backend
            ).loss
        loss.backward()

    result = {
        "method": method,
        "H": h,
        "T": t,
        "V": rows,
        "backend": None if method in ("naive", "trl") else backend,
        "chunk": None if method in ("naive", "trl") else chunk,
        "dtype": str(dtype).removeprefix("torch."),
    }
    try:
        seconds, peak = gpu_measure(run, device)
        result.update(seconds=round(seconds, 4), peak_extra_gb=None if peak is None else round(peak, 3))
    except torch.OutOfMemoryError:
        result.update(seconds=None, peak_extra_gb=None, error="out of memory")
    except ImportError as err:
        result.update(seconds=None, peak_extra_gb=None, error=f"not installed: {err.name}")
    return result


def gpu_main(device_name: str, sizes: list[tuple[int, int]], vocab: int = VOCAB, rows: int = V) -> dict:
    """Every method at every size in this process, one JSON line each, then the ratios at the target size."""
    import torch

    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = {}
    for h, t in sizes:
        for method in GPU_METHODS:
            if method == "naive" and h * t > 2048 * 16384:  # its fp32 logits alone outgrow a 139 GB card
                r = {
                    "method": method,
                    "H": h,
                    "T": t,
                    "V": rows,
                    "seconds": None,
                    "peak_extra_gb": None,
                    "error": "skipped: out of memory at 2048 x 16384 already",
                }
            else:
                r = gpu_case(method, h, t, device, dtype, vocab, rows)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results[(method, h, t)] = r
            print(json.dumps(r), flush=True)
    at = GPU_TARGET if GPU_TARGET in sizes else sizes[-1]

    def ratio(method: str, key: str):
        a, b = results[(method, *at)].get(key), results[("trl", *at)].get(key)
        return round(a / b, 3) if a is not None and b else None

    summary = {
        "at": {"H": at[0], "T": at[1], "V": rows},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device_name,
        "gpu_time_dopd_over_trl": ratio("dopd", "seconds"),
        "gpu_time_vanilla_over_trl": ratio("vanilla", "seconds"),
        "gpu_memory_dopd_over_trl": ratio("dopd", "peak_extra_gb"),
        "gpu_memory_vanilla_over_trl": ratio("vanilla", "peak_extra_gb"),
        "gpu_time_dopd_torch_over_trl": ratio("dopd_torch", "seconds"),
    }
    print(json.dumps(summary), flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (subprocess per configuration, RSS memory) or cuda (in process, bf16, "
        "CUDA events, max_memory_allocated; cpu:0 runs this mode on the CPU "
        "for smoke tests); default cpu",
    )
    parser.add_argument(
        "--vocab", type=int, help=argparse.SUPPRESS
    )  # small vocabularies for smoke tests of the GPU mode
    parser.add_argument("--quick", action="store_true", help="only H=256, T=1024")
    parser.add_argument(
        "--sizes", help="comma-separated HxT, e.g. 1024x4096 (default: all four; the summary is at the last)"
    )
    parser.add_argument("--naive-limit-gb", type=float, default=20.0, help="address-space limit of naive runs")
    args = parser.parse_args()
    sizes = [(256, 1024)] if args.quick else [(256, 1024), (256, 4096), (1024, 1024), (1024, 4096)]
    if args.sizes:
        sizes = [tuple(int(v) for v in item.split("x")) for item in args.sizes.split(",")]
    if args.device != "cpu":
        gpu_main(
            args.device,
            [tuple(s) for s in sizes] if args.sizes else GPU_SIZES,
            *((args.vocab, args.vocab) if args.vocab else ()),
        )
        return
    results = {}
    for h, t in sizes:
        for method in ("naive", "chunked", "chunked+signals", "trl"):
            r = _run_subprocess(method, h, t, args.naive_limit_gb)
            results[(method, h, t)] = r
            print(json.dumps(r), flush=True)
    h, t = TARGET if TARGET in sizes else sizes[-1]

    def get(method, key):
        return results[(method, h, t)][key]

    naive_mem = get("naive", "peak_extra_gb")
    summary = {
        "at": {"H": h, "T": t, "V": V},
        "memory_chunked_over_naive": round(get("chunked", "peak_extra_gb") / naive_mem, 4)
        if isinstance(naive_mem, float)
        else f"<= {round(get('chunked', 'peak_extra_gb') / args.naive_limit_gb, 4)}",
        "time_chunked_over_trl": round(get("chunked", "seconds") / get("trl", "seconds"), 3),
        "time_chunked_with_signals_over_trl": round(get("chunked+signals", "seconds") / get("trl", "seconds"), 3),
        "memory_chunked_over_trl": round(get("chunked", "peak_extra_gb") / get("trl", "peak_extra_gb"), 3),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
