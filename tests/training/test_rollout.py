"""Rollout: vision tokens never sampled, lengths cut at the first EOS with pad == eos or not."""

import pytest
import torch

from dopd_vl.data.sources import load_records
from dopd_vl.modality.adapters import make_adapter
from dopd_vl.models.loading import load_model, load_processing, vision_token_ids
from dopd_vl.training.rollout import RolloutConfig, sample_responses
from dopd_vl.training.step import sample_step

EOS = 151645


def _boost_eos(model, bias):
    """Make EOS likely (a random tiny model almost never samples it) through generation_config."""
    model.generation_config.sequence_bias = [[[EOS], bias]]


def test_vision_rollout_never_samples_vision_tokens(tiny_vl_dir, image_dataset):
    processor = load_processing(tiny_vl_dir)
    model = load_model(tiny_vl_dir)
    vision_ids = vision_token_ids(processor)
    # Push the vision tokens up so that, unsuppressed, they would be sampled all the time.
    model.generation_config.sequence_bias = [[[i], 12.0] for i in vision_ids]
    adapter = make_adapter(processor, image_root=image_dataset.parent)
    torch.manual_seed(0)
    out = sample_responses(
        model,
        adapter,
        load_records(image_dataset),
        RolloutConfig(num_generations=2, max_new_tokens=12),
        [EOS],
        vision_ids,
    )
    assert len(out.responses) == 6 and out.record_index == [0, 0, 1, 1, 2, 2]
    for r in out.responses:
        assert not torch.isin(r, torch.tensor(vision_ids)).any()
    unsuppressed = sample_responses(
        model, adapter, load_records(image_dataset)[:1], RolloutConfig(num_generations=1, max_new_tokens=4), [EOS], None
    )
    assert torch.isin(unsuppressed.responses[0], torch.tensor(vision_ids)).any()  # the test can fail


@pytest.mark.parametrize("pad_is_eos", [True, False])
def test_lengths_and_stop_reasons(tiny_text_dir, text_records, pad_is_eos):
    tok = load_processing(tiny_text_dir)
    model = load_model(tiny_text_dir)
    _boost_eos(model, 9.0)
    adapter = make_adapter(tok)
    adapter.pad_token_id = EOS if pad_is_eos else tok.pad_token_id
    assert (adapter.pad_token_id == EOS) == pad_is_eos
    torch.manual_seed(1)
    out = sample_responses(model, adapter, text_records, RolloutConfig(num_generations=4, max_new_tokens=6), [EOS])
    assert set(out.stop_reasons) == {"eos", "length"}  # both happen with this bias and seed
    for response, reason in zip(out.responses, out.stop_reasons):
        assert 1 <= response.numel() <= 6
        eos_positions = (response == EOS).nonzero().flatten().tolist()
        if reason == "eos":
            assert eos_positions == [response.numel() - 1]
        else:
            assert eos_positions == [] and response.numel() == 6
    assert out.lengths.tolist() == [r.numel() for r in out.responses]


def test_rollout_never_samples_lm_head_padding_rows_and_greedy_is_deterministic(tiny_text_teacher_dir, text_records):
    """The teacher fixture has 152,064 lm-head rows for 151,669 tokens: the extra rows must never be
    sampled (a fresh model gives them real probability), and temperature 0 decodes greedily."""
    from dopd_vl.models.loading import eos_token_ids, never_sampled_token_ids, vocab_size

    processing, model = load_processing(tiny_text_teacher_dir), load_model(tiny_text_teacher_dir)
    size = vocab_size(processing)
    never = never_sampled_token_ids(processing, model)
    assert never == list(range(size, 152_064))
    padding = never[:5]
    model.generation_config.sequence_bias = [[[i], 15.0] for i in padding]  # make them the likeliest
    adapter = make_adapter(processing)
    config = RolloutConfig(num_generations=2, max_new_tokens=8)
    torch.manual_seed(0)
    unsuppressed = sample_responses(model, adapter, text_records, config, eos_token_ids(processing, model))
    assert any((r >= size).any() for r in unsuppressed.responses)  # the check below can fail
    torch.manual_seed(0)
    out = sample_responses(model, adapter, text_records, config, eos_token_ids(processing, model), never)
    assert all((r < size).all() for r in out.responses)
    greedy = RolloutConfig(num_generations=1, max_new_tokens=6, temperature=0.0)
    first = sample_responses(model, adapter, text_records, greedy, eos_token_ids(processing, model), never)
    torch.manual_seed(123)
    second = sample_responses(model, adapter, text_records, greedy, eos_token_ids(processing, model), never)
    assert all(torch.equal(a, b) for a, b in zip(first.responses, second.responses))


def _greedy(model, adapter, records, **options):
    config = RolloutConfig(num_generations=1, max_new_tokens=6, temperature=0.0, **options)
    out = sample_responses(model, adapter, records, config, [EOS])
    return [r.tolist() for r in out.responses], out.stop_reasons


def test_length_sorted_generation_batches_give_the_same_greedy_answers_in_order(tmp_path):
    # Prompts of several lengths, interleaved, rendered without a chat suffix so that a random tiny
    # model's greedy answer depends on each prompt's own last characters.
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO))
    from dopd_vl import build_char_tokenizer
    from dopd_vl.models.tiny import build_tiny_qwen3

    tok = build_char_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model = load_model(
        build_tiny_qwen3(
            tmp_path / "m",
            tokenizer=tok,
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            intermediate_size=64,
            lm_head_rows=0,
            seed=0,
        )
    )
    adapter = make_adapter(tok)
    texts = ["7+3=", "a longer question?", "xyz", "12*4+1=", "Q", "hello there, model", "9-9="]
    records = [{"id": f"r{i}", "prompt": [{"role": "user", "content": t}]} for i, t in enumerate(texts)]
    eos = [tok.eos_token_id]
    config = dict(num_generations=1, max_new_tokens=4, temperature=0.0)
    whole = sample_responses(model, adapter, records, RolloutConfig(**config), eos)
    chunked = sample_responses(model, adapter, records, RolloutConfig(**config, generation_batch_size=3), eos)
    assert [r.tolist() for r in chunked.responses] == [
        r.tolist() for r in whole.responses
    ] and chunked.stop_reasons == whole.stop_reasons
    assert len({tuple(r.tolist()) for r in whole.responses}) > 2  # answers differ by prompt: a wrong order would show


def test_compiled_generation_gives_the_eager_greedy_tokens(tiny_text_dir, text_records):
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile's CPU backend needs a C compiler, and none is installed")
    tok = load_processing(tiny_text_dir)
    model = load_model(tiny_text_dir)
    adapter = make_adapter(tok)
    eager = _greedy(model, adapter, text_records)
    try:
        compiled = _greedy(model, adapter, text_records, generation="compiled")
    except Exception as err:  # noqa: BLE001 - compilation unavailable on this machine (backend, toolchain)
        pytest.skip(f"torch.compile is unavailable here: {type(err).__name__}: {err}".splitlines()[0])
    assert compiled == eager


def test_generation_option_is_checked():
    from dopd_vl.errors import ConfigError
    from dopd_vl.training.config import load_config

    assert (
        load_config(None, ["rollout.generation=compiled", "rollout.generation_batch_size=16"]).rollout.generation
        == "compiled"
    )
    with pytest.raises(ConfigError, match="rollout.generation must be"):
        load_config(None, ["rollout.generation=vllm"])


def test_auto_generation_falls_back_to_eager_when_compiling_fails(tmp_path, monkeypatch, caplog):
    """`rollout.generation: auto` compiles where that pays (a GPU; forced here): a compile that
    fails makes the run generate eagerly with one warning; an explicit `compiled` keeps raising."""
    import logging

    import dopd_vl.training.run as setup_module
    import dopd_vl.training.trainer as trainer_module
    from dopd_vl.training.config import load_config

    from conftest import REPO

    def failing_compile(*args, **kwargs):
        raise RuntimeError("deliberately failing compile")

    monkeypatch.setattr(torch, "compile", failing_compile)
    monkeypatch.setattr(
        setup_module, "resolve_generation", lambda mode, device: "compiled" if mode == "auto" else mode
    )  # as on a GPU
    overrides = [f"output_dir={tmp_path / 'run'}", "rollout.max_new_tokens=3", "optim.batch_size=1"]
    trainer = trainer_module.Trainer(
        load_config(REPO / "configs" / "tiny_text.yaml", overrides + ["rollout.generation=auto"])
    )
    assert trainer.run.backends.generation == "compiled"
    with caplog.at_level(logging.WARNING):
        first, second = sample_step(trainer.run, trainer.step), sample_step(trainer.run, trainer.step)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "deliberately failing compile" in warnings[0]
    assert trainer.run.backends.generation == "eager" and first[0].rollout.responses and second[0].rollout.responses
    assert trainer.run.info()["rollout_generation"] == {
        "requested": "auto",
        "used": "eager",
        "fallback_reason": "RuntimeError: deliberately failing compile",
    }
    explicit = trainer_module.Trainer(
        load_config(REPO / "configs" / "tiny_text.yaml", overrides + ["rollout.generation=compiled"])
    )
    with pytest.raises(RuntimeError, match="deliberately failing compile"):
        sample_step(explicit.run, explicit.step)
