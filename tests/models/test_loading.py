"""Tiny models build, save and reload through the real from_pretrained path; tokenizer checks."""

import pytest
import torch

from dopd_vl.errors import ModelError
from dopd_vl.models.folders import load_tokenizer
from dopd_vl.models.loading import (
    check_same_tokenizer,
    final_hidden_states,
    is_vision_model,
    load_model,
    load_processing,
    output_embedding_weight,
    vision_token_ids,
)


def test_shipped_tokenizer_is_qwens_real_vocabulary(tokenizer):
    assert len(tokenizer) == 151_669
    assert tokenizer("Hello world").input_ids == [9707, 1879]
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655


def test_tiny_qwen3_reloads_with_from_pretrained(tiny_text_dir):
    tok = load_processing(tiny_text_dir)
    assert tok("Hello world").input_ids == [9707, 1879] and tok.convert_tokens_to_ids("<|im_start|>") == 151644
    model = load_model(tiny_text_dir)
    assert type(model).__name__ == "Qwen3ForCausalLM" and not is_vision_model(model)
    assert (tiny_text_dir / "model.safetensors").exists()
    ids = torch.tensor([[9707, 1879]])
    hidden = final_hidden_states(model, {"input_ids": ids})
    logits = model(input_ids=ids).logits
    assert torch.allclose(hidden @ output_embedding_weight(model).T, logits, atol=1e-5)


def test_tiny_qwen3_vl_reloads_with_auto_processor(tiny_vl_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vl_dir)
    assert type(processor).__name__ == "Qwen3VLProcessor"
    assert processor.tokenizer("Hello world").input_ids == [9707, 1879]
    assert processor.tokenizer.convert_tokens_to_ids("<|im_start|>") == 151644
    model = load_model(tiny_vl_dir)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration" and is_vision_model(model)
    assert set(vision_token_ids(processor)) == {151652, 151653, 151654, 151655, 151656}


def test_load_model_errors_clearly_on_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="cannot load"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelError, match="dtype"):
        load_model(tmp_path, dtype="float8")


def test_different_tokenizers_are_a_clear_error(tiny_text_dir):
    student = load_tokenizer(tiny_text_dir)
    teacher = load_tokenizer(tiny_text_dir)
    teacher.add_tokens(["<|my_extra_token|>"])
    with pytest.raises(ModelError, match="tokenizers differ"):
        check_same_tokenizer(student, teacher)


def test_padded_lm_head_rows_are_accepted_and_short_heads_rejected(tiny_text_dir, tiny_text_teacher_dir):
    student, teacher = load_model(tiny_text_dir), load_model(tiny_text_teacher_dir)
    assert output_embedding_weight(student).shape[0] == 151_936
    assert output_embedding_weight(teacher).shape[0] == 152_064
    tok = load_tokenizer(tiny_text_dir)
    assert check_same_tokenizer(tok, tok, student, teacher) == 151_669
    student.resize_token_embeddings(1000)
    with pytest.raises(ModelError, match="fewer than the tokenizer"):
        check_same_tokenizer(tok, tok, student, teacher)
