"""A chat vision-language model behind one batched `generate(images, prompts)` call.

Works with any transformers image-text-to-text model whose processor has a chat template (Qwen2-VL and
Qwen2.5-VL by default; InternVL and others loaded the same way). Greedy decoding only: deterministic.
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from engine.config import GenerationConfig, ModelRef
from engine.models import load_model, load_processor


class ChatVLM:
    def __init__(self, ref: ModelRef, generation: GenerationConfig) -> None:
        self.processor = load_processor(AutoProcessor, ref)
        self.processor.tokenizer.padding_side = "left"  # batched generation appends after the prompt
        self.model, self.device = load_model(AutoModelForImageTextToText, ref)
        self.generation = generation

    def _chat_text(self, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.inference_mode()
    def generate(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        """One greedy answer per (image, prompt) pair."""
        if not images:
            return []
        texts = [self._chat_text(prompt) for prompt in prompts]
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        pad_id = self.processor.tokenizer.pad_token_id
        output = self.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=self.generation.max_new_tokens,
            min_new_tokens=self.generation.min_new_tokens,
            repetition_penalty=self.generation.repetition_penalty,
            pad_token_id=pad_id if pad_id is not None else self.processor.tokenizer.eos_token_id,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)
