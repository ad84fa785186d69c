"""Greedy answers from an exported student with plain transformers only (no dopd_vl import), as a
user of the published folder would: the folder's chat template, its processor, its generation config.

    python plain_generate.py FOLDER DATA.jsonl LIMIT MAX_NEW_TOKENS  -> JSON list of answers on stdout
"""

import json
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

folder, data, limit, max_new_tokens = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
records = [json.loads(line) for line in data.read_text().splitlines() if line.strip()][:limit]
vision = getattr(AutoConfig.from_pretrained(folder), "vision_config", None) is not None
model = (AutoModelForImageTextToText if vision else AutoModelForCausalLM).from_pretrained(folder).eval()
processing = AutoProcessor.from_pretrained(folder) if vision else AutoTokenizer.from_pretrained(folder)
tokenizer = processing.tokenizer if vision else processing
answers = []
for record in records:
    messages = record["prompt"]
    if vision:
        text = processing.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images = [
            Image.open(data.parent / part["image"]).convert("RGB")
            for m in messages
            for part in m["content"]
            if isinstance(m["content"], list) and part["type"] == "image"
        ]
        inputs = processing(text=[text], images=images, return_tensors="pt")
    else:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    answers.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())
print(json.dumps(answers))
