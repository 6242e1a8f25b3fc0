"""A chat text LLM with two batched calls: greedy `generate` and `yes_probability` for yes/no questions.

Yes/no questions are decided from the next-token distribution (design §4): P(yes) / (P(yes) + P(no)) over
the first token of each answer word is a score that can be thresholded and recorded, and it exists even
for a model that would not answer in the expected words.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.config import GenerationConfig, ModelRef
from engine.models import load_model, load_processor


class ChatLM:
    def __init__(self, ref: ModelRef, generation: GenerationConfig, system_prompt: str = "") -> None:
        self.tokenizer = load_processor(AutoTokenizer, ref)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model, self.device = load_model(AutoModelForCausalLM, ref)
        self.generation = generation
        self.system_prompt = system_prompt

    def chat_text(self, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def first_token_ids(self, words: list[str]) -> list[int]:
        """Ids of the first token of each word, bare and space-prefixed (tokenizers differ), deduplicated.

        A first token that carries no letter of the word (a lone space piece) is skipped: it would count
        every answer that starts with a space.
        """
        ids: set[int] = set()
        for word in words:
            for variant in (word, " " + word):
                encoded = self.tokenizer.encode(variant, add_special_tokens=False)
                piece = self.tokenizer.decode(encoded[:1]).strip() if encoded else ""
                if piece and word.startswith(piece):
                    ids.add(encoded[0])
        return sorted(ids)

    def answer_token_ids(self, yes_words: list[str], no_words: list[str]) -> tuple[list[int], list[int]]:
        """First-token ids of the yes and no words; a config error if they are missing or shared."""
        yes_ids, no_ids = self.first_token_ids(yes_words), self.first_token_ids(no_words)
        if not yes_ids or not no_ids or set(yes_ids) & set(no_ids):
            raise ValueError(
                f"yes words {yes_words} and no words {no_words} must start with distinct tokens of this "
                f"tokenizer (got {yes_ids} vs {no_ids}); change stages.refine.yes_words/no_words"
            )
        return yes_ids, no_ids

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        texts = [self.chat_text(p) for p in prompts]
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return encoded.to(self.device)

    @torch.inference_mode()
    def yes_probability(self, prompts: list[str], yes_ids: list[int], no_ids: list[int]) -> list[float]:
        """P(yes) / (P(yes) + P(no)) of the next token after each prompt."""
        if not prompts:
            return []
        logits = self.model(**self._encode(prompts)).logits[:, -1, :].float()
        probs = logits.softmax(dim=-1)
        p_yes, p_no = probs[:, yes_ids].sum(dim=-1), probs[:, no_ids].sum(dim=-1)
        return (p_yes / (p_yes + p_no).clamp_min(1e-12)).tolist()

    @torch.inference_mode()
    def generate(self, prompts: list[str]) -> list[str]:
        if not prompts:
            return []
        inputs = self._encode(prompts)
        output = self.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=self.generation.max_new_tokens,
            min_new_tokens=self.generation.min_new_tokens,
            repetition_penalty=self.generation.repetition_penalty,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return self.tokenizer.batch_decode(
            output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
