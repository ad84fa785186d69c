"""Qwen3 (any causal LM with a chat template): records -> prompt token ids."""

from __future__ import annotations

from dopd_vl.errors import DatasetError
from dopd_vl.modality.prompts import PromptConfig, PromptInputs, prompt_messages

__all__ = ["TextAdapter"]


class TextAdapter:
    modality = "text"

    def __init__(self, tokenizer, config: PromptConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.pad_token_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )

    def prompt(self, record: dict, view: str) -> PromptInputs:
        text = self.prompt_text(record, view)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        return PromptInputs(input_ids=ids.long(), text=text)

    def prompt_text(self, record: dict, view: str) -> str:
        """The view's rendered chat text (what `prompt` tokenizes; the preflight tokenizes many at once)."""
        messages = [_flatten_text(m, record) for m in prompt_messages(record, view, self.config.privileged_template)]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=self.config.enable_thinking
        )


def _flatten_text(message: dict, record: dict) -> dict:
    """Text models take string contents; a list of text parts is joined, an image is an error."""
    content = message["content"]
    if isinstance(content, str):
        return message
    if any(part.get("type") != "text" for part in content):
        raise DatasetError(
            "an image in the prompt, but the model is text-only", record=record.get("id", "?"), field="prompt.content"
        )
    return {**message, "content": "".join(part["text"] for part in content)}
