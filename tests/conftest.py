"""Session fixtures: the real Qwen tokenizer and tiny Qwen3 / Qwen3-VL models, built once and saved.

Everything is built locally from configs; nothing is downloaded (HF_HUB_OFFLINE is set here too).
"""

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run under Triton's interpreter on CPU (set before triton is imported); a GPU run
# of the suite may set TRITON_INTERPRET=0 to test the compiled kernels instead.
os.environ.setdefault("TRITON_INTERPRET", "1")


def _session_folder(prefix: str) -> str:
    """A fresh folder for this process's session, removed when it exits (each tiny-model cache holds
    hundreds of MB: a suite that leaves them behind fills a CI disk in a few runs)."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


# `tiny:` models are built once per test session into a fresh folder, shared with subprocesses.
os.environ["DOPD_TINY_CACHE"] = _session_folder("dopd-tiny-")
# The trusted image roots the builders record (dopd_vl/data/image_roots.py) go to a fresh folder, never
# the user's ~/.config; subprocesses share it.
os.environ["DOPD_VL_CONFIG_DIR"] = _session_folder("dopd-config-")
# datasets' Arrow cache of every Parquet / JSON file a test reads (a new tmp path each run, so never a
# hit: ~30 MB more in ~/.cache per suite run) goes to a fresh folder too.
os.environ["HF_DATASETS_CACHE"] = _session_folder("dopd-hf-datasets-")

import pytest
import torch

# `make test` runs two pytest-xdist workers on the 2 cores: one thread each (alone: both cores), and
# so do the processes a test starts (a training subprocess beside the other worker would oversubscribe).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# The longest tests (minutes each: torchrun runs, kill-and-resume, the study smokes; then every test
# over about 15 s) start first, so the two workers share them instead of one finishing alone while
# the other idles.
LONGEST_FIRST = (
    "test_split_invariance_over_micro_batches_processes_and_shards",
    "test_two_sharded_processes_survive_sigterm_and_sigkill_and_resume_exactly",
    "test_resume_after_kill_and_after_sigterm_reproduces_the_straight_run",
    "test_trust_study_pipeline_smoke",
    "test_a_training_step_is_the_same_with_either_backend",
    "test_readout_equals_an_independent_computation",
    "test_vanilla_opd_halves_held_out_reverse_kl",
    "test_visual_comparison_pipeline_smoke",
    "test_boxes_lie_pipeline_smoke",
    "test_self_check_passes_silently_and_a_sign_error_falls_back_to_the_torch_backend",
    "test_va_opd_is_split_invariant",
    "test_diagnose_reads_who_is_right_equal_to_an_independent_count",
    "test_every_source_trains_the_same_first_step",
    "test_dopd_train_tiny_vlm_cli",
)


def pytest_collection_modifyitems(config, items):
    """Every worker collects the same order: the longest tests first, the rest as written."""
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.originalname, len(rank)))


def pytest_configure(config):
    """`--dist loadgroup` keeps each xdist_group on one worker, so its fixture is built once; pytest 9.2
    silently drops the groups (pytest-xdist#1386) and the suite's slowest setups run twice."""
    version = tuple(int(p) for p in pytest.__version__.split(".")[:2] if p.isdigit())
    if config.getoption("dist", "no") == "loadgroup" and version >= (9, 2):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} breaks --dist loadgroup (pytest-xdist#1386): pip install 'pytest<9.2' "
            "(pyproject's dev pin)"
        )


REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COCO128 = SHARED / "data" / "coco128"
GSM8K = SHARED / "data" / "gsm8k"


@pytest.fixture(scope="session")
def tokenizer():
    from dopd_vl.models.folders import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory, tokenizer):
    from dopd_vl.models.tiny import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3"), tokenizer=tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_text_teacher_dir(tmp_path_factory, tokenizer):
    """A larger, untied teacher with Qwen2.5-style 152,064 lm-head rows (vs the student's 151,936)."""
    from dopd_vl.models.tiny import build_tiny_qwen3

    return build_tiny_qwen3(
        tmp_path_factory.mktemp("tiny_qwen3_teacher"),
        tokenizer=tokenizer,
        hidden_size=96,
        num_layers=3,
        num_heads=6,
        num_kv_heads=2,
        intermediate_size=192,
        tie_word_embeddings=False,
        lm_head_rows=152_064,
        seed=1,
    )


@pytest.fixture(scope="session")
def tiny_vl_dir(tmp_path_factory, tokenizer):
    from dopd_vl.models.tiny import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny_qwen3_vl"), tokenizer=tokenizer, seed=0)


@pytest.fixture(scope="session")
def image_dataset(tmp_path_factory):
    """A JSONL dataset with three images of different sizes (generated, so no license question)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("image_ds")
    (root / "images").mkdir()
    sizes = [(96, 64), (64, 128), (160, 96)]
    records = []
    for i, (w, h) in enumerate(sizes):
        g = torch.Generator().manual_seed(i)
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / "images" / f"img{i}.png")
        question = ["How many squares?", "Is there a red circle in the picture on the left side?", "Which is left?"][i]
        records.append(
            {
                "id": f"rec{i}",
                "prompt": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": f"images/img{i}.png"},
                            {"type": "text", "text": question},
                        ],
                    }
                ],
                "privileged_context": f"Relevant objects (bbox_2d in 0-1000 coordinates): "
                f'[{{"bbox_2d": [{10 * i}, 20, 300, 400], "label": "square"}}]',
                "privileged": {
                    "format": "qwen3vl_grounding",
                    "objects": [{"label": "square", "bbox_2d": [10 * i, 20, 300, 400]}],
                },
                "answer": str(i),
            }
        )
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def text_records():
    questions = ["What is 2 + 3?", "Tom has 5 apples and eats two of them. How many are left now?", "Name a color."]
    return [
        {
            "id": f"t{i}",
            "prompt": [{"role": "user", "content": q}],
            "privileged_context": f"Hint: step {i}: add the numbers.",
            "answer": str(i),
        }
        for i, q in enumerate(questions)
    ]
