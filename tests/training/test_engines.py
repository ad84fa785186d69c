"""Rollout engines without vLLM (the vLLM runs are in tests/rollout_vllm): the recipe's checks, the errors
a user meets first, the weights a sync hands over (LoRA merged, names as in the checkpoint), the
trainer-side log-probs the mismatch metric compares with, and vision prompts as vLLM takes them."""

import importlib.util
import json
import logging
from types import SimpleNamespace

import pytest
import torch

from dopd_vl.cli import main
from dopd_vl.errors import ConfigError
from dopd_vl.loss.chunked import TargetStates
from dopd_vl.method.objectives import ObjectiveConfig, build_objective
from dopd_vl.method.plan import TokenPlan
from dopd_vl.modality.adapters import make_adapter
from dopd_vl.modality.batches import build_view, response_hidden_states
from dopd_vl.models.loading import load_model, load_processing, output_embedding_weight
from dopd_vl.training.config import LoRAConfig, load_config
from dopd_vl.training.engines import (
    LOGPROB_MISMATCH_WARN,
    VllmEngine,
    engine_logprob_mismatch,
    full_state_items,
    vllm_request,
)
from dopd_vl.training.rollout import Rollout
from dopd_vl.training.routed_loss import RoutedLoss

from conftest import REPO
from helpers.runs import ARITH, SHAPES

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rollout.engine=warp", "rollout.engine must be hf or vllm, got 'warp'"),
        ("rollout.generation=compiled", "rollout.generation='compiled' is an option of the hf engine"),
        ("rollout.generation_batch_size=4", "rollout.generation_batch_size is an option of the hf engine"),
        ("rollout.vllm.gpu_memory_utilization=0", "rollout.vllm.gpu_memory_utilization must be in (0, 1]"),
        ("rollout.vllm.dtype=int8", "rollout.vllm.dtype must be empty (the student's), float32"),
        ("rollout.vllm.tensor_parallel_size=0", "rollout.vllm.tensor_parallel_size must be >= 1"),
        ("rollout.vllm.speed=9", "unknown config key rollout.vllm.speed"),
    ],
)
def test_engine_settings_vllm_cannot_honour_are_errors_at_load(override, message):
    engine = [] if override.startswith("rollout.engine") else ["rollout.engine=vllm"]
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "tiny_text.yaml", [*engine, override])
    assert message in str(err.value)


def test_dry_run_validates_the_vllm_section_without_vllm(capsys):
    code = main(["train", str(REPO / "configs" / "tiny_text_vllm.yaml"), f"data.train={ARITH}", "--dry-run"])
    assert code == 0, capsys.readouterr().err


def test_unknown_engine_is_one_line_naming_the_key_and_the_choices(capsys, tmp_path):
    code = main(["train", str(REPO / "configs" / "tiny_text.yaml"), "rollout.engine=warp", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == "dopd train: error: rollout.engine must be hf or vllm, got 'warp'"


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here: the missing-vLLM message cannot show")
def test_vllm_engine_without_vllm_says_how_to_install_it(capsys, tmp_path):
    args = [f"data.train={ARITH}", "max_steps=1", f"output_dir={tmp_path}"]
    code = main(["train", str(REPO / "configs" / "tiny_text_vllm.yaml"), *args])
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1]  # after the preflight's progress bars
    assert code == 1 and line.startswith("dopd train: error: ") and "Traceback" not in err
    assert "rollout.engine: vllm needs vLLM" in err and "pip install 'dopd-vl[vllm]'" in err and "make test-vllm" in err


def test_vllm_engine_for_a_vision_student_on_cpu_is_one_clear_line(capsys, tmp_path):
    args = [f"data.train={SHAPES}", "max_steps=1", "rollout.engine=vllm", f"output_dir={tmp_path}"]
    code = main(["train", str(REPO / "configs" / "tiny_vlm.yaml"), *args])
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1]  # after the preflight's progress bars
    assert code == 1 and line.startswith("dopd train: error: ") and "Traceback" not in err
    assert "needs a GPU" in line and "torchvision" in err and "rollout.engine: hf" in err


def test_vision_prompts_reach_vllm_as_the_hf_engines_ids_with_their_images(tiny_vl_dir):
    processor = load_processing(tiny_vl_dir)
    adapter = make_adapter(processor, image_root=SHAPES.parent)
    records = [json.loads(line) for line in SHAPES.read_text().splitlines()[:3]]
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for record in records:
        for view in ("student", "student_priv"):
            request, prompt = vllm_request(adapter, record, view), adapter.prompt(record, view)
            assert request["prompt_token_ids"] == prompt.input_ids.tolist()
            (image,) = request["multi_modal_data"]["image"]
            # what vLLM computes from the image with the folder's processor settings: as many
            # patches as the ids already hold placeholders for
            grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
            merge = processor.image_processor.merge_size
            assert int(prompt.input_ids.eq(image_pad).sum()) == int(grid.prod()) // merge**2 > 0


def test_text_requests_carry_token_ids_only(tiny_text_dir):
    adapter = make_adapter(load_processing(tiny_text_dir))
    record = json.loads(ARITH.read_text().splitlines()[0])
    assert vllm_request(adapter, record) == {"prompt_token_ids": adapter.prompt(record, "student").input_ids.tolist()}


def test_a_lora_students_sync_hands_over_the_merged_base_weights_in_checkpoint_names(tiny_text_dir):
    from dopd_vl.models.loading import with_lora

    student = with_lora(load_model(tiny_text_dir), LoRAConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():  # LoRA B starts at zero: move it, so that merging changes the weights
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    reference = load_model(tiny_text_dir).state_dict()
    with torch.no_grad():
        merged_view = dict(full_state_items(student))
    handed = merged_view
    assert set(handed) == set(reference)  # checkpoint names, no lora_ tensors
    changed = [k for k in reference if not torch.equal(merged_view[k], reference[k])]
    assert changed and all(".q_proj." in k or ".v_proj." in k or "proj" in k for k in changed)
    # merged = W + B A * scaling, by hand, for one adapted layer
    layer = student.base_model.model.model.layers[0].self_attn.q_proj
    by_hand = (
        reference["model.layers.0.self_attn.q_proj.weight"]
        + (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
    )
    torch.testing.assert_close(merged_view["model.layers.0.self_attn.q_proj.weight"], by_hand)
    # merged on the fly: the live student's frozen base weights are untouched, bit for bit
    assert torch.equal(layer.base_layer.weight, reference["model.layers.0.self_attn.q_proj.weight"])


def test_trainer_logprobs_for_the_mismatch_are_normalised_over_every_head_row(tiny_text_dir, text_records):
    model = load_model(tiny_text_dir)
    processing = load_processing(tiny_text_dir)
    adapter = make_adapter(processing)
    objective = build_objective(ObjectiveConfig(name="vanilla_opd"))
    responses = [torch.tensor([11, 12, 13]), torch.tensor([21, 22])]
    view = build_view(adapter, "student", text_records[:2], responses)
    n, vocab = int(view.response_mask.sum()), len(processing)
    with torch.no_grad():  # the student itself as every target: a finite loss, the log-probs are what is tested
        hidden = response_hidden_states(model, view)[view.response_mask]
    head = output_embedding_weight(model).detach()
    targets = {v: TargetStates(hidden, head, torch.zeros(n)) for v in objective.views}
    out = RoutedLoss(objective, vocab, chunk_size=2)(
        model, view, plan=TokenPlan(torch.zeros(n, dtype=torch.long), torch.ones(n) / n, None), targets=targets,
        with_logprob=True,
    )  # fmt: skip
    logits = model(**view.inputs).logits.float()  # naive: every row of the head, like vLLM's raw log-probs
    positions, mask = view.response_positions, view.response_mask
    picked = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))[mask].log_softmax(-1)
    ids = torch.cat(responses)
    torch.testing.assert_close(out.student_logprob, picked.gather(1, ids[:, None]).squeeze(1), atol=1e-5, rtol=1e-5)
    assert logits.shape[-1] > vocab  # the padding rows count, as they do in vLLM's normalisation


def test_mismatch_is_the_mean_absolute_gap_over_sampled_tokens():
    rollouts = [
        Rollout([0, 0], [torch.tensor([1, 2]), torch.tensor([3])], ["length", "eos"],
                [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])]),
    ]  # fmt: skip
    total, count = engine_logprob_mismatch(rollouts, [torch.tensor([-1.5, -2.0, -0.25])])
    assert count == 3 and total == pytest.approx(0.5 + 0.0 + 0.25)


def test_a_drifting_engine_warns_once_above_the_documented_level(caplog):
    engine = SimpleNamespace(mismatch_warned=False)  # the warning reads nothing else of the engine
    with caplog.at_level(logging.WARNING, logger="dopd_vl.training.engines"):
        VllmEngine.check_mismatch(engine, LOGPROB_MISMATCH_WARN, step=1)  # at the level: healthy
        assert not caplog.records
        VllmEngine.check_mismatch(engine, 2 * LOGPROB_MISMATCH_WARN, step=2)
        VllmEngine.check_mismatch(engine, 3 * LOGPROB_MISMATCH_WARN, step=3)
    (record,) = caplog.records
    assert "step 2: rollout/logprob_mismatch 0.2 > 0.1" in record.getMessage()
