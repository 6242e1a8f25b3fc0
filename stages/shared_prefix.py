"""Greedy decoding of many prompts that continue one prefilled prefix (one KV cache per shared prefix).

Region captions of one image share the image and the constant instruction; refine's calls share the system
prompt. That prefix is prefilled once (`prefill`), and every prompt that starts with it runs only its own
tokens (`greedy`, `next_token_logits`) on a copy of the prefix's cache, batched with rows of other prefixes.
The answers are the tokens that greedy decoding of each full prompt alone gives (tests check it).

What transformers does for us: the KV cache (`DynamicCache`), the attention masks from a 2-D padding mask
over cache + new tokens, the rotary embeddings from explicit `position_ids`, the logits processors.
What it does not do, and this module does:
- batch rows whose prefixes are different caches of different lengths: the caches are left-padded with
  zeros to one length and the padding masked (`stack`); a row's new tokens are left-padded too, so the pads
  sit between its prefix and its own tokens and all rows decode in the same column;
- give each row its positions. Qwen2-VL's multimodal rotary positions (mrope) count the image as
  max(grid_h, grid_w) / merge positions, not as its number of tokens, so the first text position after a
  cached image prefix is `max(prefix positions) + 1`, not the cache length. `generate` derives that from
  `model.model.rope_deltas`, state the model keeps from its last full prompt: one offset per batch row of
  that prompt, stale for new rows that continue other prefixes (and shared by every stage that holds the
  same loaded model). Here each prefix records its own next position, and every call passes explicit
  `position_ids` ([3, rows, tokens] with equal axes for text under mrope, [rows, tokens] otherwise);
- run the greedy loop (generate cannot take a batch of different caches); it applies what our
  `GenerationConfig` sets, with transformers' own processors: repetition penalty and min_new_tokens.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.generation import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from engine.config import GenerationConfig


@dataclass
class Prefix:
    """A prefilled prompt start: its keys and values per layer ([1, kv_heads, length, head_dim]), its
    token ids and the rotary position of the token after it."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    ids: list[int]
    next_position: int

    @property
    def length(self) -> int:
        return len(self.ids)


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest common token prefix, leaving every sequence at least one token of its own."""
    shortest = min(len(s) for s in sequences)
    n = 0
    while n < shortest - 1 and all(s[n] == sequences[0][n] for s in sequences):
        n += 1
    return n


def cache_kwarg(model: Any) -> str:
    """The forward argument that takes the cache (`cache` in recent transformers, else `past_key_values`)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, longest] ids left-padded with `pad_id`, and the mask of the real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def prefill(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    next_positions: list[int],
    **inputs: Any,
) -> list[Prefix]:
    """Run a batch of left-padded prefixes in one forward (`inputs`: pixel values and the like) and keep
    each row's keys and values without its padding."""
    cache = DynamicCache(config=model.config)
    model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
        **{cache_kwarg(model): cache},
        **inputs,
    )
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    prefixes = []
    for row, next_position in enumerate(next_positions):
        start = int((mask[row] == 0).sum())  # left padding
        layers = [
            (layer.keys[row : row + 1, :, start:], layer.values[row : row + 1, :, start:])
            for layer in cache.layers
        ]
        prefixes.append(Prefix(layers, input_ids[row, start:].tolist(), next_position))
    return prefixes


def text_prefix(model: Any, ids: list[int], device: torch.device, rope_axes: int) -> Prefix:
    """A text-only prefix: positions 0..n-1 (on every mrope axis), the next one is n."""
    input_ids = torch.tensor([ids], device=device)
    pos = positions(torch.arange(len(ids), device=device)[None], rope_axes)
    return prefill(model, input_ids, None, pos, [len(ids)])[0]


def positions(rows: torch.Tensor, rope_axes: int) -> torch.Tensor:
    """[rows, tokens] text positions in the layout the model takes: the same on each mrope axis."""
    return rows if rope_axes == 1 else rows[None].expand(rope_axes, -1, -1)


def stack(prefixes: list[Prefix], rows: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """One cache for a batch of rows (row r continues `prefixes[rows[r]]`) and its [rows, length] mask.

    Shorter prefixes are left-padded with zeros and masked out; their keys keep the rotary positions they
    were computed with, so padding changes no attention score.
    """
    longest = max(p.length for p in prefixes)
    device = prefixes[0].layers[0][0].device
    index = torch.tensor(rows, device=device)
    stacked = DynamicCache()
    for layer in range(len(prefixes[0].layers)):
        keys, values = [], []
        for prefix in prefixes:
            k, v = prefix.layers[layer]
            pad = longest - k.shape[-2]
            keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
            values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
        stacked.update(
            torch.cat(keys).index_select(0, index), torch.cat(values).index_select(0, index), layer
        )
    mask = torch.zeros(len(prefixes), longest, dtype=torch.long, device=device)
    for i, prefix in enumerate(prefixes):
        mask[i, longest - prefix.length :] = 1
    return stacked, mask.index_select(0, index)


def _suffix_batch(
    prefixes: list[Prefix], rows: list[int], suffixes: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded suffix ids, their mask and their positions (each row counting on from its prefix)."""
    width = max(len(s) for s in suffixes)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (row, suffix) in enumerate(zip(rows, suffixes, strict=True)):
        start = prefixes[row].next_position
        ids[r, width - len(suffix) :] = torch.tensor(suffix)
        mask[r, width - len(suffix) :] = 1
        pos[r] = start  # pads: any position, they are masked
        pos[r, width - len(suffix) :] = torch.arange(start, start + len(suffix))
    return ids.to(device), mask.to(device), pos.to(device)


def _forward(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: DynamicCache, rope_axes: int
):
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions(pos, rope_axes),
        use_cache=True,
        logits_to_keep=1,
        **{cache_kwarg(model): cache},
    )
    return out.logits[:, -1, :].float()


@torch.inference_mode()
def next_token_logits(
    model: Any,
    prefixes: list[Prefix],
    rows: list[int],
    suffixes: list[list[int]],
    pad_id: int,
    rope_axes: int,
) -> torch.Tensor:
    """[rows, vocab] float logits of the token after each prefix + suffix."""
    cache, prefix_mask = stack(prefixes, rows)
    ids, mask, pos = _suffix_batch(prefixes, rows, suffixes, pad_id, prefix_mask.device)
    return _forward(model, ids, torch.cat([prefix_mask, mask], dim=1), pos, cache, rope_axes)


def _history(
    prefixes: list[Prefix], rows: list[int], suffixes: list[list[int]], device: torch.device
) -> torch.Tensor:
    """Each row's whole prompt (prefix + suffix) for the repetition penalty, left-padded with its own first
    token: a token already in the row, so the padding penalises nothing the prompt alone would not."""
    prompts = [prefixes[row].ids + suffix for row, suffix in zip(rows, suffixes, strict=True)]
    width = max(len(p) for p in prompts)
    return torch.tensor([[p[0]] * (width - len(p)) + p for p in prompts], device=device)


@torch.inference_mode()
def greedy(
    model: Any,
    prefixes: list[Prefix],
    rows: list[int],
    suffixes: list[list[int]],
    generation: GenerationConfig,
    eos_ids: list[int],
    pad_id: int,
    rope_axes: int,
) -> list[list[int]]:
    """Greedy new tokens of each row (prefix `prefixes[rows[r]]` + `suffixes[r]`), EOS included, as
    `generate(do_sample=False)` would give for that row's full prompt alone."""
    cache, prefix_mask = stack(prefixes, rows)
    device = prefix_mask.device
    ids, mask, pos = _suffix_batch(prefixes, rows, suffixes, pad_id, device)
    mask = torch.cat([prefix_mask, mask], dim=1)
    history = _history(prefixes, rows, suffixes, device)
    processors = LogitsProcessorList()
    if generation.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(generation.repetition_penalty))
    if generation.min_new_tokens > 0:
        processors.append(
            MinNewTokensLengthLogitsProcessor(history.shape[1], generation.min_new_tokens, eos_ids)
        )
    eos = torch.tensor(eos_ids, device=device)
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    new: list[torch.Tensor] = []
    for _ in range(generation.max_new_tokens):
        scores = processors(history, _forward(model, ids, mask, pos, cache, rope_axes))
        token = scores.argmax(dim=-1).masked_fill(done, pad_id)
        new.append(token)
        done |= torch.isin(token, eos)
        if bool(done.all()):
            break
        history = torch.cat([history, token[:, None]], dim=1)
        ids, pos = token[:, None], pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(new, dim=1).tolist()
