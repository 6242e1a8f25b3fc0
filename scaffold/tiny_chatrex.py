"""A tiny random ChatRex for tests and the fixture config: `tiny:chatrex`.

Built the way a real one is (`ChatRexForConditionalGeneration.from_parts` on pretrained parts), from the
project's tiny-model factory: the factory's CLIP vision tower (64 px, patch 16 -> 4x4 grid), a seeded random
ConvNeXt (128 px, stride 32 -> 4x4 grid, channels 16/32/64/128) and the factory's `qwen2-lm` LLM + tokenizer,
extended with the 106 ChatRex tokens. Weights are random: only shapes and code paths mean something. The
LLM keeps the factory's zeroed LM-head rows for non-word tokens, so an untrained tiny ChatRex generates corpus
words and rarely EOS; bound generation with `max_new_tokens`.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import torch

from scaffold import tiny_models
from scaffold.tiny_models import TINY_PREFIX, build_atomically, cache_root, ensure_tiny_model

__all__ = ["TINY_NAME", "build_tiny_chatrex", "ensure_tiny_chatrex", "resolve_chatrex"]

TINY_NAME = f"{TINY_PREFIX}chatrex"
_SEED = 0
_SOURCES = ("configuration.py", "modeling.py", "processor.py", "parsing.py")
# Share the factory's lock when it has one: model init draws from torch's global RNG, and two builders in
# two threads of one process would interleave their draws.
_BUILD_LOCK = getattr(tiny_models, "_BUILD_LOCK", None) or threading.RLock()


def build_tiny_chatrex(out_dir: str | Path, cache_dir: Path | None = None) -> Path:
    """Build the tiny ChatRex (model + processor) into `out_dir`; same bytes on every run."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPVisionModel,
        ConvNextConfig,
        ConvNextModel,
    )
    from transformers.utils import logging as hf_logging

    from chatrex.modeling import ChatRexForConditionalGeneration
    from chatrex.processor import ChatRexProcessor

    out = Path(out_dir)
    llm_dir = ensure_tiny_model("qwen2-lm", cache_dir)
    clip_dir = ensure_tiny_model("clip", cache_dir)
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        tokenizer = AutoTokenizer.from_pretrained(llm_dir)
        llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
        # The factory's folder is a whole CLIPModel: its text tower is expected to go unused, so silence the
        # load report that lists it.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            vision = CLIPVisionModel.from_pretrained(clip_dir, dtype=torch.float32)
        finally:
            hf_logging.set_verbosity(verbosity)
        convnext = ConvNextModel(
            ConvNextConfig(
                num_channels=3,
                patch_size=4,
                hidden_sizes=[16, 32, 64, 128],
                depths=[1, 1, 1, 1],
                image_size=128,
            )
        )
        model = ChatRexForConditionalGeneration.from_parts(
            vision,
            convnext,
            llm,
            tokenizer,
            num_object_tokens=100,
            low_res_size=64,
            high_res_size=128,
            roi_output_size=4,
            box_embed_dim=32,
        ).eval()
    processor = ChatRexProcessor.from_model_config(tokenizer, model.config)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def ensure_tiny_chatrex(cache_dir: Path | None = None) -> Path:
    """The cached tiny ChatRex folder, built atomically on first use (as `scaffold.tiny_models` does)."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return build_atomically(
        root / f"chatrex-{_spec_hash(cache_dir)}", lambda tmp: build_tiny_chatrex(tmp, cache_dir)
    )


def resolve_chatrex(name_or_path: str) -> str:
    """`tiny:chatrex` -> its built folder; any other model id or path is returned unchanged."""
    if name_or_path == TINY_NAME:
        return str(ensure_tiny_chatrex())
    return name_or_path


def _spec_hash(cache_dir: Path | None) -> str:
    """Hash of the ChatRex code and the parts' folder names (those hash the factory and library versions)."""
    h = hashlib.sha256()
    chatrex_dir = Path(__file__).resolve().parents[1] / "chatrex"
    for path in [*(chatrex_dir / name for name in _SOURCES), Path(__file__)]:
        h.update(path.read_bytes())
    for part in ("qwen2-lm", "clip"):
        h.update(ensure_tiny_model(part, cache_dir).name.encode())
    return h.hexdigest()[:10]
