"""Inputs for the vision-language model tests, built without tunelab's data side: a batch about LLaMA-Factory's demo
image, as a Qwen2-VL collator produces it, and a plain training loop. Shared by test_vision_language*.py."""

import torch
from helpers import LF_DATA
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLImageProcessorPil


def image_batch(folder, image: str = "1.jpg") -> dict[str, torch.Tensor]:
    """One conversation about one image, the reply as labels: the inputs a Qwen2-VL collator produces."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
    # 168 x 112 pixels: a 12 x 8 grid of 14-pixel patches, merged 2 x 2 into 24 image tokens.
    picture = Image.open(LF_DATA / "mllm_demo_data" / image).convert("RGB").resize((168, 112))
    features = processor(images=[picture], return_tensors="pt")
    n_tokens = int(features["image_grid_thw"].prod()) // processor.merge_size ** 2
    assert n_tokens == 24
    prompt = tokenizer("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * n_tokens
                       + "<|vision_end|>What is in the picture?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    reply = tokenizer("Two cats are sleeping on a red sofa.<|im_end|>\n")["input_ids"]
    input_ids = torch.tensor([prompt + reply])
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (input_ids == image_token).sum() == n_tokens
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "labels": torch.tensor([[-100] * len(prompt) + reply]),
            "pixel_values": features["pixel_values"], "image_grid_thw": features["image_grid_thw"],
            # 1 marks image tokens: without it Qwen2.5-VL would silently use 1D positions (STACK.md).
            "mm_token_type_ids": (input_ids == image_token).long()}
