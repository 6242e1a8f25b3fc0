"""Load models one way everywhere: a hub id, a local folder or `tiny:<name>`, on the configured device."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine.config import ModelRef

if TYPE_CHECKING:
    import torch

# torch and transformers are imported where they are used: the job's driver imports the stage modules (for
# their configs) but runs no model, and importing torch would cost it ~0.45 GB of memory for nothing.

TINY_PREFIX = "tiny:"


def resolve_model(name_or_path: str) -> str:
    """A hub id or folder unchanged; `tiny:<name>` -> the folder of that tiny model, built locally first.

    Tiny models are test and demo scaffolding (`scaffold/`); imported only when such a name is used, so
    the engine depends on no scaffolding, yet the name resolves in every worker that loads the model.
    """
    if not name_or_path.startswith(TINY_PREFIX):
        return name_or_path
    from scaffold.names import resolve_model as resolve_tiny

    return resolve_tiny(name_or_path)


def pick_device(preference: str) -> torch.device:
    """`auto` picks the first CUDA device Ray assigned to this actor, else the CPU."""
    import torch

    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def pick_dtype(preference: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on GPUs that support it, float32 on CPU (CPU bf16 generate is slow and lossy)."""
    import torch

    if preference != "auto":
        return getattr(torch, preference)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def quiet_loading() -> None:
    """Per-file progress bars of every actor's model load drown the run's own progress in the logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def pretrained_kwargs(ref: ModelRef) -> dict[str, Any]:
    """Keyword arguments every `from_pretrained` call of this model gets."""
    kwargs: dict[str, Any] = {"trust_remote_code": ref.trust_remote_code}
    if ref.revision:
        kwargs["revision"] = ref.revision
    return kwargs


# Models loaded in this process, so that stages fused into one actor (caption and region_caption naming the
# same VLM) share one copy of the weights instead of loading it twice. Inference only: nothing mutates them.
_LOADED: dict[tuple[str, str], tuple[Any, torch.device]] = {}


def load_model(auto_class: Any, ref: ModelRef) -> tuple[Any, torch.device]:
    """`auto_class.from_pretrained(ref)` in eval mode on the configured device and dtype, once per process.

    `device_map` puts the weights straight onto the device as they are read: built on the CPU and moved
    after, a 7B model cost ~15 GB of host memory per actor, and eight actors starting on one node at once
    spiked past 120 GB.
    """
    key = (f"{auto_class.__module__}.{auto_class.__qualname__}", ref.model_dump_json())
    if key not in _LOADED:
        quiet_loading()
        device = pick_device(ref.device)
        dtype = pick_dtype(ref.dtype, device)
        model = auto_class.from_pretrained(
            resolve_model(ref.name), dtype=dtype, device_map=device, **pretrained_kwargs(ref)
        )
        _LOADED[key] = (model.eval(), device)
    return _LOADED[key]


def model_inputs(inputs: Any, model: Any, device: torch.device) -> dict[str, Any]:
    """A processor's output on `device`, with its pixels in the model's dtype.

    Processors return float32 pixels, and several models (Grounding DINO's Swin patch embedding among
    them) do not cast them to their bfloat16 weights: every image would fail. Only pixel tensors are
    cast: token ids and masks keep their integer dtype, and coordinates (SAM 2's boxes) stay float32,
    where bfloat16 would move a 1000-px box edge by up to 4 px.
    """
    import torch

    dtype = getattr(model, "dtype", None)
    moved: dict[str, Any] = {}
    for name, value in dict(inputs).items():
        if isinstance(value, torch.Tensor):
            pixels = name.startswith("pixel_values") and value.is_floating_point() and dtype is not None
            value = value.to(device=device, dtype=dtype if pixels else value.dtype)
        moved[name] = value
    return moved


def load_processor(auto_class: Any, ref: ModelRef, **kwargs: Any) -> Any:
    quiet_loading()
    return auto_class.from_pretrained(resolve_model(ref.name), **pretrained_kwargs(ref), **kwargs)


def inference_mode(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`torch.inference_mode()` as a decorator that imports torch when called, not when the module loads."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper
