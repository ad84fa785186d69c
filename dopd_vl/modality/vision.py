"""Qwen3-VL (any image-text-to-text model with a processor): records -> prompt ids + pixels.

Images are opened with Pillow from paths confined to the dataset root and resized by the model's
own processor, as `processor.apply_chat_template(..., tokenize=True)` does for Qwen3-VL.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from dopd_vl.data import image_parts, resolve_image_path
from dopd_vl.errors import DatasetError
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
        images = [self.load_image(record, path) for path in image_parts(record)]
        encoded = self.processor(text=[text], images=images or None, return_tensors="pt")
        extras = {"mm_token_type_ids": encoded["mm_token_type_ids"][0].long()} if "mm_token_type_ids" in encoded else {}
        if images:
            extras["pixel_values"] = encoded["pixel_values"]
            extras["image_grid_thw"] = encoded["image_grid_thw"]
        return PromptInputs(input_ids=encoded["input_ids"][0].long(), text=text, extras=extras)

    def load_image(self, record: dict, image: str) -> Image.Image:
        rid = record.get("id", "?")
        path = resolve_image_path(self.image_root, image, rid)
        try:
            with Image.open(path) as img:
                img.load()  # decode now: a truncated file fails here, not inside the processor
                return img.convert("RGB")
        except FileNotFoundError as err:
            raise DatasetError(f"image not found: {path}", record=rid, field="prompt.image") from err
        except (UnidentifiedImageError, OSError) as err:
            raise DatasetError(f"unreadable image {path}: {err}", record=rid, field="prompt.image") from err
