"""A chat text LLM with two batched calls: greedy `generate` and `yes_probability` for yes/no questions.

Yes/no questions are decided from the next-token distribution (design §4): P(yes) / (P(yes) + P(no)) over
the first token of each answer word is a score that can be thresholded and recorded, and it exists even
for a model that would not answer in the expected words.

Every prompt starts with the same tokens (the chat template's system turn with the system prompt, and the
opening of the user turn): they are prefilled once per actor and each call runs only its own tokens on a
copy of that cache (`stages/shared_prefix.py`), with the answers of the full prompts.
"""

from __future__ import annotations

from collections import Counter

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.config import GenerationConfig, ModelRef
from engine.models import load_model, load_processor
from stages import shared_prefix
from stages.shared_prefix import Prefix


class ChatLM:
    def __init__(
        self,
        ref: ModelRef,
        generation: GenerationConfig,
        system_prompt: str = "",
        shared_prefix: bool = True,
    ) -> None:
        self.tokenizer = load_processor(AutoTokenizer, ref)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model, self.device = load_model(AutoModelForCausalLM, ref)
        self.generation = generation
        self.system_prompt = system_prompt
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos)
        # the token start every prompt shares (empty: nothing to share, or sharing off)
        self.prefix_ids = self._common_start() if shared_prefix else []
        self._prefix: Prefix | None = None
        # prompt tokens run through the model (the shared start counted once), prefills of the shared start
        self.counts: Counter[str] = Counter()

    def chat_text(self, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _ids(self, prompt: str) -> list[int]:
        return self.tokenizer(self.chat_text(prompt), add_special_tokens=False).input_ids

    def _common_start(self) -> list[int]:
        """The tokens before the user's text: common to two prompts that differ from their first letter."""
        probes = [self._ids(text) for text in ("A", "Z")]
        return probes[0][: shared_prefix.common_prefix_length(probes)]

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

    def _suffixes(self, prompts: list[str]) -> list[list[int]] | None:
        """Each prompt's tokens after the shared start, or None when some prompt does not begin with it."""
        n = len(self.prefix_ids)
        if not n:
            return None
        ids = [self._ids(p) for p in prompts]
        if any(i[:n] != self.prefix_ids or len(i) == n for i in ids):
            return None
        if self._prefix is None:
            self._prefix = shared_prefix.text_prefix(self.model, self.prefix_ids, self.device, rope_axes=1)
            self.counts["prefix_prefills"] += 1
            self.counts["prefill_tokens"] += n
        self.counts["prefill_tokens"] += sum(len(i) - n for i in ids)
        return [i[n:] for i in ids]

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        texts = [self.chat_text(p) for p in prompts]
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        self.counts["prefill_tokens"] += int(encoded["attention_mask"].sum())
        return encoded.to(self.device)

    @torch.inference_mode()
    def yes_probability(self, prompts: list[str], yes_ids: list[int], no_ids: list[int]) -> list[float]:
        """P(yes) / (P(yes) + P(no)) of the next token after each prompt."""
        if not prompts:
            return []
        suffixes = self._suffixes(prompts)
        if suffixes is not None:
            rows = [0] * len(prompts)
            logits = shared_prefix.next_token_logits(
                self.model, [self._prefix], rows, suffixes, self.tokenizer.pad_token_id, rope_axes=1
            )
        else:
            logits = self.model(**self._encode(prompts)).logits[:, -1, :].float()
        probs = logits.softmax(dim=-1)
        p_yes, p_no = probs[:, yes_ids].sum(dim=-1), probs[:, no_ids].sum(dim=-1)
        return (p_yes / (p_yes + p_no).clamp_min(1e-12)).tolist()

    @torch.inference_mode()
    def generate(self, prompts: list[str]) -> list[str]:
        if not prompts:
            return []
        suffixes = self._suffixes(prompts)
        if suffixes is not None:
            tokens = shared_prefix.greedy(
                self.model,
                [self._prefix],
                [0] * len(prompts),
                suffixes,
                self.generation,
                self.eos_ids,
                self.tokenizer.pad_token_id,
                rope_axes=1,
            )
            return self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        inputs = self._encode(prompts)
        output = self.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=self.generation.max_new_tokens,
            min_new_tokens=self.generation.min_new_tokens,
            repetition_penalty=self.generation.repetition_penalty,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos_ids,
        )
        return self.tokenizer.batch_decode(
            output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
