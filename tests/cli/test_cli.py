"""The `dopd` command: --version, inspect, and one-line errors."""

import json
import shutil
import subprocess
import sys

import pytest

from dopd_vl import __version__
from dopd_vl.cli import main


@pytest.mark.integration
def test_version_through_the_console_script():
    out = subprocess.run([sys.executable, "-m", "dopd_vl.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"dopd-vl {__version__}"


def test_inspect_prints_every_view_with_token_counts(tiny_vl_dir, image_dataset, capsys):
    assert main(["inspect", "--student", str(tiny_vl_dir), "--data", str(image_dataset), "--index", "1"]) == 0
    out = capsys.readouterr().out
    for view in ("student", "teacher_priv", "student_priv", "teacher_plain"):
        assert f"=== {view}: " in out
    assert "<|vision_start|>[image]<|vision_end|>" in out and "Relevant objects" in out
    counts = [int(line.split(": ")[1].split()[0]) for line in out.splitlines() if line.startswith("=== ")]
    assert counts[0] == counts[3] < counts[1] == counts[2]


def test_inspect_errors_are_one_line_naming_file_and_record(tiny_text_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": [{"role": "user", "content": "hi"}]}\n{"id": "b", "prompt": []}\n')
    assert main(["inspect", "--student", str(tiny_text_dir), "--data", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bad.jsonl:2" in err and "record b" in err and "field prompt" in err
    assert main(["inspect", "--student", str(tiny_text_dir), "--data", str(tmp_path / "missing.jsonl")]) == 1
    assert "file not found" in capsys.readouterr().err


def test_eval_prints_a_summary_line_and_writes_the_report_beside_the_model(tiny_text_dir, tmp_path, capsys):
    """Without --out the terminal gets one summary line and the answers go to eval/MODEL-DATA.json beside
    the model folder; a second run names the report it replaces."""
    from helpers.runs import ARITH

    model = tmp_path / "student"
    shutil.copytree(tiny_text_dir, model)
    args = ["eval", "--model", str(model), "--data", str(ARITH), "--limit", "3", "--max-new-tokens", "2"]
    assert main([*args, "--device", "cpu"]) == 0
    report = tmp_path / "eval" / "student-data.json"
    said = capsys.readouterr().out.strip()
    written = json.loads(report.read_text())
    per_type = ", ".join(f"{kind} {v['accuracy']:.3f}" for kind, v in sorted(written["per_type"].items()))
    assert said == f"accuracy {written['accuracy']:.3f} over 3 records ({per_type}); report in {report}"
    assert len(written["responses"]) == 3
    assert main([*args, "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"report in {report} (replacing the earlier {report})")


def test_an_override_after_a_flag_is_told_where_overrides_go(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "configs/tiny_text.yaml", "--dry-run", "optim.lr=1e-3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "overrides go before any --flag" in err
    assert "dopd train CONFIG optim.lr=1e-3 [--flags]" in err


def test_a_mistyped_recipe_key_gets_a_guess_and_its_source(capsys):
    from conftest import REPO

    assert main(["train", str(REPO / "configs" / "tiny_text.yaml"), "optim.lrr=1e-3", "--dry-run"]) == 1
    err = capsys.readouterr().err.strip()
    assert "did you mean optim.lr?" in err and err.endswith("(from the override 'optim.lrr=1e-3')")
