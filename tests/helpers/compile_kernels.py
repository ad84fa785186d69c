"""Compile every Triton kernel of a package ahead of time for real GPU targets, without a GPU.

    TRITON_INTERPRET=0 python tests/helpers/compile_kernels.py [PACKAGE] [--workers N]

Triton lowers each kernel to a cubin with the `ptxas` it ships, for a named target
(`GPUTarget("cuda", capability, 32)`): lowering errors, unsupported operations and shared-memory
or register overflows show up here, which the interpreter never sees. Every `triton.jit` function
found in the package's modules must be listed by its module's `compile_variants(logits_dtype)`; a
kernel that is not is reported as such, so the list cannot go stale. Prints one JSON line per
(kernel, target, logits dtype, variant): ok, shared memory, warps, or the error.
"""

import argparse
import importlib
import json
import os
import pkgutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
# Per-block shared memory limits (bytes, the opt-in maximum): A100 (sm_80), H100 (sm_90), B200 (sm_100).
TARGETS = {"sm_80": (80, 166_912), "sm_90": (90, 232_448), "sm_100": (100, 232_448)}
DTYPES = ("bf16", "fp16", "fp32")


def jit_functions(package: str) -> dict[str, tuple[str, str]]:
    """`module.name` -> (module, name) of every triton.jit function defined in the package."""
    from triton.runtime.jit import JITFunction

    root = importlib.import_module(package)
    modules = (
        [package] + [m.name for m in pkgutil.walk_packages(root.__path__, prefix=f"{package}.")]
        if hasattr(root, "__path__")
        else [package]
    )
    found = {}
    for name in modules:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if isinstance(value, JITFunction) and value.__module__ == name:
                found[f"{name}.{attr}"] = (name, attr)
    return found


def compile_one(job: tuple) -> dict:
    module_name, kernel, target, dtype, index = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(module_name)
    signature, constexprs = module.compile_variants(dtype)[kernel][index]
    capability, shared_limit = TARGETS[target]
    row = {
        "kernel": f"{module_name}.{kernel}",
        "target": target,
        "dtype": dtype,
        "variant": {k: str(v) for k, v in constexprs.items()},
    }
    try:
        compiled = triton.compile(
            ASTSource(fn=getattr(module, kernel), signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", capability, 32),
        )
        shared = int(compiled.metadata.shared)
        ok = shared <= shared_limit and bool(compiled.asm.get("cubin"))
        row.update(
            ok=ok,
            shared=shared,
            shared_limit=shared_limit,
            num_warps=int(compiled.metadata.num_warps),
            error=None if ok else f"shared memory {shared} B over the {shared_limit} B of {target}",
        )
    except Exception as err:  # noqa: BLE001 - every failure is a finding, reported with its kernel and target
        row.update(ok=False, error=_describe(err))
    return row


def _describe(err: Exception) -> str:
    """Where (`at line:col` and the source line) and why (the innermost cause's message)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    where = f"{lines[0]} {lines[-2].strip()}" if len(lines) >= 2 and lines[-1].strip() == "^" else ""
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    reason = cause.args[-1] if cause.args and isinstance(cause.args[-1], str) and cause is not err else str(cause)
    reason = [line for line in reason.splitlines() if line.strip()][-1] if reason.strip() else ""
    return f"{type(err).__name__} {where}: {reason}".strip()[:600]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("package", nargs="?", default="dopd_vl")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")
    jobs, rows = [], []
    for qualified, (module_name, kernel) in jit_functions(args.package).items():
        module = importlib.import_module(module_name)
        listed = module.compile_variants("fp32") if hasattr(module, "compile_variants") else {}
        if kernel not in listed:
            rows.append(
                {
                    "kernel": qualified,
                    "ok": False,
                    "error": "not listed by its module's compile_variants(): add its signature there",
                }
            )
            continue
        jobs += [
            (module_name, kernel, target, dtype, i)
            for target in TARGETS
            for dtype in DTYPES
            for i in range(len(module.compile_variants(dtype)[kernel]))
        ]
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        rows += list(pool.map(compile_one, jobs))
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
