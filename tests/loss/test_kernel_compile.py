"""The Triton kernels compiled ahead of time for real cards (sm_80, sm_90, sm_100), without a GPU:
Triton lowers them to cubins with the ptxas it ships (tests/helpers/compile_kernels.py). The
interpreter tests (test_kernels.py) check the arithmetic; this checks that a GPU can run it."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

HELPER = REPO / "tests" / "helpers" / "compile_kernels.py"
pytest.importorskip("triton")


def _compile(package: str, tmp_path, extra_path: str | None = None) -> list[dict]:
    env = {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "TRITON_CACHE_DIR": str(tmp_path / "triton-cache"),
        "PYTHONPATH": os.pathsep.join(p for p in (extra_path, str(REPO)) if p),
    }
    done = subprocess.run(
        [sys.executable, str(HELPER), package, "--workers", "2"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.integration
def test_every_kernel_compiles_for_every_target_and_logits_dtype(tmp_path):
    rows = _compile("dopd_vl", tmp_path)
    failures = [
        f"{r['kernel']} {r.get('target')} {r.get('dtype')} {r.get('variant')}: {r['error']}"
        for r in rows
        if not r["ok"]
    ]
    assert failures == []
    kernels = {r["kernel"] for r in rows}
    assert kernels == {
        f"dopd_vl.loss.kernels.{k}"
        for k in ("_lse_entropy_kernel", "_full_divergence_kernel", "_exp_combination_kernel")
    }
    assert {(r["target"], r["dtype"]) for r in rows} == {
        (t, d) for t in ("sm_80", "sm_90", "sm_100") for d in ("bf16", "fp16", "fp32")
    }
    assert sum(r["kernel"].endswith("_full_divergence_kernel") for r in rows) == 3 * 3 * 3  # rkl, fkl, js
    assert all(r["shared"] <= r["shared_limit"] for r in rows)


def test_a_kernel_the_list_does_not_name_fails_the_check(tmp_path):
    package = tmp_path / "pkg" / "extra_kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import triton\nimport triton.language as tl\n\n\n@triton.jit\ndef _forgotten(x_ptr, n, BLOCK: tl.constexpr):\n"
        "    cols = tl.arange(0, BLOCK)\n    tl.store(x_ptr + cols, tl.load(x_ptr + cols, mask=cols < n) * 2, "
        "mask=cols < n)\n\n\n"
        "def compile_variants(logits_dtype):\n    return {}\n"
    )
    rows = _compile("extra_kernels", tmp_path, extra_path=str(tmp_path / "pkg"))
    assert rows == [
        {
            "kernel": "extra_kernels._forgotten",
            "ok": False,
            "error": "not listed by its module's compile_variants(): add its signature there",
        }
    ]
