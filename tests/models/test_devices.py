"""Device and dtype selection (one helper, dopd_vl.models.loading.resolve_device / resolve_dtype) for every
command: dopd eval, dopd inspect, dopd demo, dopd train and the toy experiment. CI has no GPU, so
the CUDA branches are checked by making torch report one."""

import json

import pytest
import torch

from dopd_vl.cli import build_parser, main
from dopd_vl.errors import ModelError
from dopd_vl.models.loading import resolve_device, resolve_dtype


def error_line(stderr: str) -> str:
    """The CLI's error message: exactly one line (progress bars of datasets / transformers aside)."""
    lines = [line for line in stderr.splitlines() if line.startswith("dopd ") and ": error: " in line]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch reports one CUDA GPU with bfloat16 support (nothing is placed on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_auto_is_the_cpu_without_a_gpu_and_float32_there():
    if torch.cuda.is_available():
        pytest.skip("this check is for machines without a GPU")
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    assert resolve_dtype("auto", "cpu") == "float32" and resolve_dtype("auto") == "float32"
    with pytest.raises(ModelError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_auto_is_the_gpu_in_bfloat16_when_one_is_present(fake_gpu, monkeypatch):
    assert resolve_device("auto") == torch.device("cuda:0")
    assert resolve_dtype("auto", torch.device("cuda:0")) == "bfloat16"
    assert resolve_dtype("auto", "cpu") == "float32"  # an explicit CPU stays float32
    assert resolve_dtype("float16", "cuda") == "float16"
    with pytest.raises(ModelError, match="only 1 CUDA GPU"):
        resolve_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda:0")) == "float32"  # e.g. a V100


@pytest.mark.parametrize("bad", ["tpu", "gpu0", "cuda:x"])
def test_bad_device_and_dtype_names_are_clear_errors(bad):
    with pytest.raises(ModelError, match="device must be"):
        resolve_device(bad)
    with pytest.raises(ModelError, match="dtype must be"):
        resolve_dtype("fp8", "cpu")


@pytest.mark.parametrize(
    "command", [["eval", "--model", "m", "--data", "d"], ["inspect", "--student", "m", "--data", "d"], ["demo"]]
)
def test_every_command_takes_device_and_dtype_defaulting_to_auto(command):
    parser = build_parser()
    assert (parser.parse_args(command).device, parser.parse_args(command).dtype) == ("auto", "auto")
    args = parser.parse_args(command + ["--device", "cuda:1", "--dtype", "bfloat16"])
    assert (args.device, args.dtype) == ("cuda:1", "bfloat16")


def test_eval_places_the_model_with_the_shared_helper(tiny_text_dir, text_records, tmp_path, monkeypatch, capsys):
    import dopd_vl.models.loading as models

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in text_records))
    seen = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: seen.append((a, k)) or real(*a, **k))
    out = tmp_path / "report.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_text_dir),
                "--data",
                str(data),
                "--out",
                str(out),
                "--max-new-tokens",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert (
        (report["device"], report["dtype"]) == ("cpu", "float32")
        and seen[0][1]["device"] == "cpu"
        and seen[0][0][1] == "auto"
    )
    if not torch.cuda.is_available():
        assert main(["eval", "--model", str(tiny_text_dir), "--data", str(data), "--device", "cuda"]) == 1
        err = error_line(capsys.readouterr().err)
        assert "no CUDA GPU" in err


def test_trainer_resolves_auto_dtype_and_device_cpu(tiny_text_dir, text_records, tmp_path):
    from dopd_vl.errors import ConfigError
    from dopd_vl.training.config import load_config
    from dopd_vl.training.trainer import Trainer

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in text_records))
    config = load_config(
        None,
        [
            f"student.name_or_path={tiny_text_dir}",
            f"teacher.name_or_path={tiny_text_dir}",
            f"data.train={data}",
            f"output_dir={tmp_path / 'run'}",
            "student.dtype=auto",
            "teacher.dtype=auto",
            "device=cpu",
            "max_steps=1",
        ],
    )
    trainer = Trainer(config)
    assert (
        trainer.run.device.type == "cpu"
        and next(trainer.run.models.student.parameters()).dtype == torch.float32
        and next(trainer.run.models.teacher.parameters()).dtype == torch.float32
    )
    with pytest.raises(ConfigError, match="device must be auto or cpu"):
        load_config(None, ["device=cuda:7"])


def test_toy_experiment_and_demo_pass_the_device_on():
    import inspect as pyinspect
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO))
    from dopd_vl.apps.demo import DemoConfig, run_demo
    from examples.toy_privilege import harness as toy

    assert DemoConfig().device == "auto" and "device" in pyinspect.signature(run_demo).parameters
    for fn in (toy.run_methods, toy.prepare, toy.evaluate, toy.distill, toy.per_token_report):
        assert pyinspect.signature(fn).parameters["device"].default == "auto"
