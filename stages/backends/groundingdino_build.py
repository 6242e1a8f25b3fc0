"""Build groundingdino-py's model from its SLConfig files, under transformers 5, with local files only.

Split from `groundingdino_py` (inference) so that the tiny-model factory (`scaffold/`) can build the model
without importing the engine's model loading, which imports the factory in turn.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

__all__ = ["apply_transformers5_compat", "build_official_model", "load_official_model"]

logger = logging.getLogger(__name__)

_SWIN_KEYS = {"embed_dim", "depths", "num_heads", "window_size"}
# Building swaps a module attribute for a moment (`rexverse_swin`) and reads the global RNG: one at a time.
_BUILD_LOCK = threading.RLock()


# ------------------------------------------------------------------------------ transformers 5 compatibility


class _BertWarper(torch.nn.Module):
    """Stand-in for groundingdino's `BertModelWarper` under transformers 5.

    Why: the package's wrapper re-implements transformers 4's `BertModel.forward` with helpers transformers 5
    removed (`get_extended_attention_mask`, `get_head_mask`, `invert_attention_mask`: its constructor fails)
    and calls `BertEmbeddings`/`BertEncoder` with arguments they no longer take (`past_key_values_length`,
    `head_mask`, `past_key_values`), so putting the helpers back is not enough. Grounding DINO needs what that
    forward did and `BertModel.forward` of transformers 5 cannot do: a (B, L, L) mask that keeps each phrase's
    tokens to themselves, and positions that restart per phrase. This runs the same three submodules (same
    names, so released checkpoints load unchanged) with the same additive mask. The decoder/cache branches
    of the original are never used by Grounding DINO and are left out.
    """

    _rexverse_compat = True

    def __init__(self, bert_model: torch.nn.Module) -> None:
        super().__init__()
        self.config = bert_model.config
        self.embeddings = bert_model.embeddings
        self.encoder = bert_model.encoder
        self.pooler = bert_model.pooler

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPoolingAndCrossAttentions:
        hidden = self.embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids
        )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # (B, L) padding mask or (B, L, L) phrase mask -> broadcast over heads; 0 keeps, dtype-min drops.
        keep = attention_mask[:, None] if attention_mask.dim() == 3 else attention_mask[:, None, None]
        additive = (1.0 - keep.to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        sequence = self.encoder(hidden, attention_mask=additive).last_hidden_state
        pooled = self.pooler(sequence) if self.pooler is not None else None
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=sequence, pooler_output=pooled)


def apply_transformers5_compat() -> bool:
    """Let groundingdino-py 0.4.0 build its text encoder under transformers 5; True if this call patched.

    Idempotent and isolated: it rebinds only the name `BertModelWarper` in
    `groundingdino.models.GroundingDINO.groundingdino` (the one place that constructs the wrapper) to
    `_BertWarper`; transformers' `BertModel` and the package's own class stay untouched. Nothing is done
    where `BertModel` still has `get_extended_attention_mask` (transformers 4: the package works as is).
    """
    import groundingdino.models.GroundingDINO.groundingdino as gd_model
    from transformers import BertModel

    with _BUILD_LOCK:
        if hasattr(BertModel, "get_extended_attention_mask"):
            return False
        if getattr(gd_model.BertModelWarper, "_rexverse_compat", False):
            return False  # already patched (also by an earlier copy of this module, e.g. after a reload)
        gd_model.BertModelWarper = _BertWarper
        return True


# ------------------------------------------------------------------------------------------ model loading


@contextmanager
def _swin_sizes(sizes: dict[str, Any] | None) -> Iterator[None]:
    """While building, make the package's Swin factory use `sizes` instead of its named preset."""
    if not sizes:
        yield
        return
    if set(sizes) != _SWIN_KEYS:
        raise ValueError(f"rexverse_swin needs exactly {sorted(_SWIN_KEYS)}, got {sorted(sizes)}")
    import groundingdino.models.GroundingDINO.backbone.backbone as backbone_module
    from groundingdino.models.GroundingDINO.backbone.swin_transformer import SwinTransformer

    def build_swin(modelname: str, pretrain_img_size: int, **kwargs: Any) -> SwinTransformer:
        return SwinTransformer(pretrain_img_size=pretrain_img_size, **kwargs, **sizes)

    original = backbone_module.build_swin_transformer
    backbone_module.build_swin_transformer = build_swin
    try:
        yield
    finally:
        backbone_module.build_swin_transformer = original


def _text_encoder_dir(configured: str, config_path: Path, bert_path: str | None) -> str:
    """`bert_path`, else the config's `text_encoder_type` (relative to the config file); must be a folder.

    The package would otherwise hand a hub id such as `bert-base-uncased` to `from_pretrained`, which
    downloads: refuse instead, so that a missing local copy fails fast and never reaches the network.
    """
    folder = Path(bert_path) if bert_path else Path(configured)
    if not bert_path and not folder.is_absolute():
        folder = config_path.parent / folder
    if not folder.is_dir():
        raise ValueError(
            f"text encoder {str(bert_path or configured)!r} of {config_path} is not a local folder; "
            "pass bert_path= (a folder saved with save_pretrained, e.g. bert-base-uncased)"
        )
    return str(folder)


def build_official_model(
    config_path: str | Path, bert_path: str | None = None, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """The package's `build_model` for an SLConfig file, random weights, local text encoder, in eval mode."""
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig

    config_path = Path(config_path)
    args = SLConfig.fromfile(str(config_path))
    args.text_encoder_type = _text_encoder_dir(args.text_encoder_type, config_path, bert_path)
    args.device = str(device)
    # Gradient checkpointing only saves training memory; at inference it changes nothing but warnings.
    args.use_checkpoint = False
    args.use_transformer_ckpt = False
    # The package prints its text encoder path; keep stdout for the caller's own output (CLI contracts).
    with _BUILD_LOCK, _swin_sizes(getattr(args, "rexverse_swin", None)), redirect_stdout(sys.stderr):
        apply_transformers5_compat()
        model = build_model(args)
    return model.to(device).eval()


def load_official_model(
    config_path: str | Path,
    checkpoint_path: str | Path,
    bert_path: str | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """What `groundingdino.util.inference.load_model` does (`checkpoint["model"]`, non-strict), run here.

    Missing keys are logged as warnings: they mean random weights in a released model. Weights stored in
    another float dtype (the tiny model's are float16) are cast to the model's dtype by `load_state_dict`.
    """
    from groundingdino.util.misc import clean_state_dict

    model = build_official_model(config_path, bert_path, "cpu")
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(clean_state_dict(checkpoint["model"]), strict=False)
    if missing:
        logger.warning(
            "%s: %d weights missing from the checkpoint: %s", checkpoint_path, len(missing), missing
        )
    if unexpected:
        logger.info("%s: %d checkpoint entries unused: %s", checkpoint_path, len(unexpected), unexpected)
    return model.to(device).eval()
