"""Qwen3-VL (any image-text-to-text model with a processor): records -> prompt ids + pixels.

Images are opened with Pillow from paths under the dataset root, or decoded from the record's
embedded images, and resized by the model's own processor, as `processor.apply_chat_template(..., tokenize=True)` does
for Qwen3-VL.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from dopd_vl.data.image_roots import ImageRoots, image_roots
from dopd_vl.data.images import image_parts, load_image
from dopd_vl.modality.prompts import PromptConfig, PromptInputs, prompt_messages


class VisionAdapter:
    modality = "vision"

    def __init__(self, processor, config: PromptConfig, image_root: str | Path | ImageRoots | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.config = config
        self.pad_token_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        self.image_root = image_roots(image_root)  # read once: every image path is confined to these (§3.1)

    def prompt(self, record: dict, view: str) -> PromptInputs:
        messages = prompt_messages(record, view, self.config.privileged_template)
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images = self.view_images(record, messages)
        encoded = self.processor(text=[text], images=images or None, return_tensors="pt")
        extras = {"mm_token_type_ids": encoded["mm_token_type_ids"][0].long()} if "mm_token_type_ids" in encoded else {}
        if images:
            extras["pixel_values"] = encoded["pixel_values"]
            extras["image_grid_thw"] = encoded["image_grid_thw"]
        return PromptInputs(input_ids=encoded["input_ids"][0].long(), text=text, extras=extras)

    def prompt_length(self, record: dict, view: str, image_sizes: list[tuple[int, int]]) -> int | None:
        """The view's prompt length in tokens from its images' (width, height) alone, without
        decoding them: the template's text, each image's one placeholder expanded to the patches
        the processor will make (Qwen-VL's smart resize). None when the view holds a crop or the
        processor is not a Qwen-VL one: then `prompt` must render it."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        messages = prompt_messages(record, view, self.config.privileged_template)
        images = self.processor.image_processor
        patch, merge, size = (
            getattr(images, "patch_size", None),
            getattr(images, "merge_size", None),
            getattr(images, "size", None),
        )
        pixels = (
            (getattr(size, "shortest_edge", None), getattr(size, "longest_edge", None))
            if size is not None and not isinstance(size, dict)
            else ((size or {}).get("shortest_edge"), (size or {}).get("longest_edge"))
        )
        if not (patch and merge and all(pixels)) or any(
            "crop" in part for m in messages if isinstance(m["content"], list) for part in m["content"]
        ):
            return None
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        count = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        for width, height in image_sizes:
            h, w = smart_resize(height, width, factor=patch * merge, min_pixels=pixels[0], max_pixels=pixels[1])
            count += (h // patch) * (w // patch) // merge**2 - 1  # the placeholder becomes this many tokens
        return count

    def view_images(self, record: dict, messages: list[dict]) -> list[Image.Image]:
        """The images of a view's messages in order: the prompt's, then privileged crops of them."""
        prompt_images = [self.load_image(record, ref) for ref in image_parts(record)]
        images, k = [], 0
        for message in messages:
            for part in message["content"] if isinstance(message["content"], list) else []:
                if part.get("type") != "image":
                    continue
                if "crop" in part:
                    images.append(
                        crop_image(prompt_images[part.get("image_index", 0)], part["crop"], record.get("id", "?"))
                    )
                else:
                    images.append(prompt_images[k])
                    k += 1
        return images

    def load_image(self, record: dict, image) -> Image.Image:
        """A path (resolved under the dataset root) or an embedded image, decoded to RGB."""
        return load_image(image, self.image_root, record.get("id", "?"))


MIN_CROP_SIDE = 32
"""Qwen3-VL's patch x merge size: a smaller crop is enlarged (around its centre, inside the image)
before resizing, because the processor cannot resize an image side below it."""


def crop_image(image: Image.Image, box: list[float], record: str) -> Image.Image:
    """The pixels of `box` = [x1, y1, x2, y2] (a privileged crop part), at least MIN_CROP_SIDE wide
    and high where the image allows; a box outside the image is a DatasetError naming the record."""
    from dopd_vl.errors import DatasetError

    w, h = image.size
    if box[2] > w + 0.5 or box[3] > h + 0.5:
        raise DatasetError(f"crop {box} lies outside the {w}x{h} image", record=record, field="privileged_context.crop")
    x1, x2 = _at_least(box[0], box[2], w)
    y1, y2 = _at_least(box[1], box[3], h)
    return image.crop((round(x1), round(y1), round(x2), round(y2)))


def _at_least(lo: float, hi: float, size: int) -> tuple[float, float]:
    """Grow [lo, hi] symmetrically to MIN_CROP_SIDE (or the whole side), kept inside [0, size]."""
    need = min(MIN_CROP_SIDE, size) - (hi - lo)
    if need <= 0:
        return lo, min(hi, size)
    lo, hi = lo - need / 2, hi + need / 2
    shift = max(0.0, -lo) - max(0.0, hi - size)
    return lo + shift, hi + shift
