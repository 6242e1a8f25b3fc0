"""A chat vision-language model behind batched greedy calls: one prompt per image, or many prompts per image
that share the image and their common start (one image encoding, one prefill per image).

Works with any transformers image-text-to-text model whose processor has a chat template (Qwen2-VL and
Qwen2.5-VL by default; InternVL and others loaded the same way). Greedy decoding only: deterministic.
"""

from __future__ import annotations

import inspect
from collections import Counter

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from engine.config import GenerationConfig, ModelRef
from engine.models import load_model, load_processor
from stages import shared_prefix
from stages.shared_prefix import Prefix


class ChatVLM:
    def __init__(self, ref: ModelRef, generation: GenerationConfig) -> None:
        self.processor = load_processor(AutoProcessor, ref)
        self.processor.tokenizer.padding_side = "left"  # batched generation appends after the prompt
        self.model, self.device = load_model(AutoModelForImageTextToText, ref)
        self.generation = generation
        self.model_type: str = self.model.config.model_type
        # Qwen2-VL / Qwen2.5-VL: 3-axis multimodal rotary positions, computed by the model's get_rope_index
        self._rope_index = getattr(getattr(self.model, "model", None), "get_rope_index", None)
        self.rope_axes = 3 if self._rope_index is not None else 1
        tokenizer = self.processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = self.model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos)
        # what this model has run: images through the vision tower, prompt tokens prefilled (no padding)
        self.counts: Counter[str] = Counter()

    def _chat_text(self, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _inputs(self, texts: list[str], images: list[Image.Image], **kwargs) -> dict[str, torch.Tensor]:
        inputs = self.processor(text=texts, images=images, return_tensors="pt", **kwargs).to(self.device)
        if "pixel_values" in inputs:  # the processor returns float32 pixels; the weights may be bfloat16
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def input_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) of the image as the model sees it after its processor's resize (Qwen2-VL family:
        `smart_resize` to multiples of patch x merge within the processor's pixel bounds)."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        ip = self.processor.image_processor
        size = ip.size
        min_pixels = getattr(size, "shortest_edge", None) or getattr(ip, "min_pixels", None)
        max_pixels = getattr(size, "longest_edge", None) or getattr(ip, "max_pixels", None)
        height, width = smart_resize(
            image.height, image.width, ip.patch_size * ip.merge_size, min_pixels, max_pixels
        )
        return width, height

    @torch.inference_mode()
    def generate(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        """One greedy answer per (image, prompt) pair, each a full prompt (nothing shared between rows)."""
        return self._generate_full(images, prompts) if images else []

    def _generate_full(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        inputs = self._inputs([self._chat_text(prompt) for prompt in prompts], images, padding=True)
        self.counts["images_encoded"] += len(images)
        self.counts["prefill_tokens"] += int(inputs["attention_mask"].sum())
        output = self.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=self.generation.max_new_tokens,
            min_new_tokens=self.generation.min_new_tokens,
            repetition_penalty=self.generation.repetition_penalty,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)

    def _prompt_ids(
        self, texts: list[str], image: Image.Image
    ) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
        """The processor's inputs for the first prompt (pixels once) and the token ids of every prompt.

        The processor expands the image placeholder to one token per merged patch; the other prompts are
        tokenised the same way without preprocessing the image again, checked against the processor's own
        ids for the first prompt.
        """
        inputs = self._inputs(texts[:1], [image])
        first = inputs["input_ids"][0].tolist()
        image_token = self.processor.image_token
        n_image = first.count(self.model.config.image_token_id)
        tokenizer = self.processor.tokenizer
        ids = [tokenizer(t.replace(image_token, image_token * n_image)).input_ids for t in texts]
        if ids[0] != first:
            raise RuntimeError(
                f"{type(self.processor).__name__} tokenises prompts differently from its tokenizer with an "
                "expanded image placeholder; set region_caption.shared_prefix: false"
            )
        return inputs, ids

    def _image_prefixes(self, prepared: list[tuple[dict[str, torch.Tensor], int]]) -> list[Prefix]:
        """Prefill the first `length` tokens (the image and the constant text) of each image's prompts,
        all images in one left-padded batch, each image encoded once."""
        rows = [inputs["input_ids"][0, :length].tolist() for inputs, length in prepared]
        input_ids, mask = shared_prefix.left_pad(rows, self.pad_id, self.device)
        extra = {
            key: torch.cat([inputs[key] for inputs, _ in prepared])
            for key in prepared[0][0]
            if key not in ("input_ids", "attention_mask", "mm_token_type_ids")
        }
        if "mm_token_type_ids" in prepared[0][0]:
            types = [inputs["mm_token_type_ids"][0, :length].tolist() for inputs, length in prepared]
            extra["mm_token_type_ids"] = shared_prefix.left_pad(types, 0, self.device)[0]
        if self._rope_index is None:
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            return shared_prefix.prefill(self.model, input_ids, mask, pos, [len(r) for r in rows], **extra)
        accepted = inspect.signature(self._rope_index).parameters
        rope_inputs = {k: v for k, v in extra.items() if k in accepted}
        pos, _ = self._rope_index(input_ids, attention_mask=mask, **rope_inputs)
        # the first text token after a prefix: one past its largest position (an image spans
        # max(grid_h, grid_w) / merge positions, fewer than its tokens)
        nexts = [int(pos[:, row].max()) + 1 for row in range(len(rows))]
        return shared_prefix.prefill(self.model, input_ids, mask, pos, nexts, **extra)

    @torch.inference_mode()
    def generate_shared(
        self, groups: list[tuple[Image.Image, list[str]]], rows_per_call: int
    ) -> list[list[str]]:
        """Greedy answers to several prompts per image; each image is encoded once and the prompts' common
        start (image and constant instruction) prefilled once, up to `rows_per_call` images per forward;
        rows of several images decode as one batch of up to `rows_per_call`. The answers are those of
        `generate` on each full prompt alone."""
        answers: list[list[str]] = [[""] * len(prompts) for _, prompts in groups]
        prepared: list[tuple[int, dict[str, torch.Tensor], list[list[int]], int]] = []
        for g, (image, prompts) in enumerate(groups):
            if not prompts:
                continue
            inputs, ids = self._prompt_ids([self._chat_text(p) for p in prompts], image)
            length = shared_prefix.common_prefix_length(ids)
            if self.model.config.image_token_id in ids[0][length:]:
                # the prompts differ before the image ends: nothing to share, run them as full prompts
                answers[g] = self._generate_full([image] * len(prompts), prompts)
                continue
            prepared.append((g, inputs, ids, length))
        pending: list[tuple[Prefix, list[int], tuple[int, int]]] = []
        for start in range(0, len(prepared), rows_per_call):
            chunk = prepared[start : start + rows_per_call]
            prefixes = self._image_prefixes([(inputs, length) for _, inputs, _, length in chunk])
            for (g, _, ids, length), prefix in zip(chunk, prefixes, strict=True):
                self.counts["images_encoded"] += 1
                self.counts["prefill_tokens"] += length + sum(len(i) - length for i in ids)
                pending += [(prefix, i[length:], (g, j)) for j, i in enumerate(ids)]
                while len(pending) >= rows_per_call:
                    self._decode(pending[:rows_per_call], answers)
                    pending = pending[rows_per_call:]
        if pending:
            self._decode(pending, answers)
        return answers

    def _decode(
        self, rows: list[tuple[Prefix, list[int], tuple[int, int]]], answers: list[list[str]]
    ) -> None:
        prefixes: list[Prefix] = []
        for prefix, _, _ in rows:
            if not any(p is prefix for p in prefixes):
                prefixes.append(prefix)
        index = [next(k for k, p in enumerate(prefixes) if p is prefix) for prefix, _, _ in rows]
        tokens = shared_prefix.greedy(
            self.model,
            prefixes,
            index,
            [suffix for _, suffix, _ in rows],
            self.generation,
            self.eos_ids,
            self.pad_id,
            self.rope_axes,
        )
        texts = self.processor.batch_decode(tokens, skip_special_tokens=True)
        for (_, _, (g, j)), text in zip(rows, texts, strict=True):
            answers[g][j] = text
