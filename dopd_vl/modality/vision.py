"""Qwen3-VL (any image-text-to-text model with a processor): records -> prompt ids + pixels.

Images are opened with Pillow from paths under the dataset root, or decoded from the record's
embedded images, and resized by the model's own processor, as `processor.apply_chat_template(..., tokenize=True)` does for Qwen3-VL.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from dopd_vl.data import image_parts, load_image
from dopd_vl.modality import PromptConfig, PromptInputs, prompt_messages


class VisionAdapter:
    modality = "vision"

    def __init__(self, processor, config: PromptConfig, image_root: str | Path | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.config = config
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.image_root = image_root

    def prompt(self, record: dict, view: str) -> PromptInputs:
        messages = prompt_messages(record, view, self.config.privileged_template)
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images = [self.load_image(record, ref) for ref in image_parts(record)]
        encoded = self.processor(text=[text], images=images or None, return_tensors="pt")
        extras = {"mm_token_type_ids": encoded["mm_token_type_ids"][0].long()} if "mm_token_type_ids" in encoded else {}
        if images:
            extras["pixel_values"] = encoded["pixel_values"]
            extras["image_grid_thw"] = encoded["image_grid_thw"]
        return PromptInputs(input_ids=encoded["input_ids"][0].long(), text=text, extras=extras)

    def load_image(self, record: dict, image) -> Image.Image:
        """A path (resolved under the dataset root) or an embedded image, decoded to RGB."""
        return load_image(image, self.image_root, record.get("id", "?"))
