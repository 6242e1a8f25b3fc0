"""Load models one way everywhere: a hub id, a local folder or `tiny:<name>`, on the configured device."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from engine.config import ModelRef
from engine.tiny_models import resolve_model


def pick_device(preference: str) -> torch.device:
    """`auto` picks the first CUDA device Ray assigned to this actor, else the CPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def pick_dtype(preference: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on GPUs that support it, float32 on CPU (CPU bf16 generate is slow and lossy)."""
    if preference != "auto":
        return getattr(torch, preference)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def quiet_loading() -> None:
    """Per-file progress bars of every actor's model load drown the run's own progress in the logs."""
    hf_logging.disable_progress_bar()


def pretrained_kwargs(ref: ModelRef) -> dict[str, Any]:
    """Keyword arguments every `from_pretrained` call of this model gets."""
    kwargs: dict[str, Any] = {"trust_remote_code": ref.trust_remote_code}
    if ref.revision:
        kwargs["revision"] = ref.revision
    return kwargs


def load_model(auto_class: Any, ref: ModelRef) -> tuple[Any, torch.device]:
    """Instantiate `auto_class.from_pretrained(ref)` in eval mode on the configured device and dtype."""
    quiet_loading()
    device = pick_device(ref.device)
    dtype = pick_dtype(ref.dtype, device)
    model = auto_class.from_pretrained(resolve_model(ref.name), dtype=dtype, **pretrained_kwargs(ref))
    return model.to(device).eval(), device


def load_processor(auto_class: Any, ref: ModelRef, **kwargs: Any) -> Any:
    quiet_loading()
    return auto_class.from_pretrained(resolve_model(ref.name), **pretrained_kwargs(ref), **kwargs)


def set_torch_threads(n: int) -> None:
    """Pin intra-op threads per actor: several actors share a node's cores."""
    torch.set_num_threads(n)


def params_hash(params: dict[str, Any]) -> str:
    """Short stable hash of a stage's settings, for provenance."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]
