"""Grounding DINO through the official `groundingdino-py` package (0.4.0), for checkpoints in its own format.

The transformers port (`stages.grounding`) cannot load the released `.pth` checkpoints; this backend runs
the package's own model code on them and hands back what `stages.grounding.select_boxes` needs.

Usage with the released weights (the BERT folder must be local: nothing here may reach a model hub)::

    detector = GroundingDinoPy(
        "GroundingDINO_SwinT_OGC.py", "groundingdino_swint_ogc.pth", bert_path="/models/bert-base-uncased"
    )
    prompt, spans = build_prompt(phrases)                      # stages.grounding
    probs, boxes, offsets = detector([image], [prompt])
    regions = select_boxes(probs[0], boxes[0], phrase_token_indices(offsets[0], spans), w, h, cfg)

Tests use `GroundingDinoPy(*resolve_official_grounding("tiny:groundingdino-official"))`.

Two things go beyond the package, each in one place here:
- `apply_transformers5_compat`: the package's BERT wrapper does not run under transformers 5 (see there).
- the `rexverse_swin` config key: the package takes Swin sizes from a fixed table keyed by the `backbone`
  name, so a small test model cannot be written in its config format. A config may add
  `rexverse_swin = dict(embed_dim=..., depths=[...], num_heads=[...], window_size=...)`; while that model is
  built, the package's Swin factory uses these sizes instead of the named preset. Configs without the key
  (all released ones) build exactly as `groundingdino.util.inference.load_model` builds them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from engine.models import resolve_model
from stages.backends.groundingdino_build import (  # re-exported: the backend's one public surface
    apply_transformers5_compat,
    build_official_model,
    load_official_model,
)

__all__ = [
    "GroundingDinoPy",
    "apply_transformers5_compat",
    "build_official_model",
    "load_official_model",
    "resolve_official_grounding",
]


# ImageNet statistics, as in the package's `load_image`.
_MEAN = [0.485, 0.456, 0.406]
_STD = [0.229, 0.224, 0.225]


def resolve_official_grounding(name_or_dir: str) -> tuple[str, str, str | None]:
    """`tiny:groundingdino-official` or a folder -> (config .py, checkpoint .pth, local BERT folder or None).

    A folder must hold exactly one `*.py` config and one `*.pth`/`*.pt` checkpoint; `bert/` beside them is
    the text encoder (None when absent: then the config's `text_encoder_type` must be a local folder).
    """
    folder = Path(resolve_model(name_or_dir))
    if not folder.is_dir():
        raise FileNotFoundError(f"{name_or_dir!r} is not a folder")
    configs = sorted(folder.glob("*.py"))
    checkpoints = sorted([*folder.glob("*.pth"), *folder.glob("*.pt")])
    if len(configs) != 1 or len(checkpoints) != 1:
        raise ValueError(
            f"{folder}: expected one *.py config and one *.pth checkpoint, found "
            f"{[p.name for p in configs]} and {[p.name for p in checkpoints]}"
        )
    bert = folder / "bert"
    return str(configs[0]), str(checkpoints[0]), str(bert) if bert.is_dir() else None


# ---------------------------------------------------------------------------------------------- inference


class GroundingDinoPy:
    """Token probabilities and boxes of the official Grounding DINO, in the layout `select_boxes` reads."""

    def __init__(
        self,
        config_path: str,
        checkpoint_path: str,
        bert_path: str | None = None,
        device: str = "cpu",
        max_image_side: int = 1333,
        min_image_side: int = 800,
    ) -> None:
        self.device = torch.device(device)
        self.model = load_official_model(config_path, checkpoint_path, bert_path, self.device)
        self.tokenizer = self.model.tokenizer
        # The model pads the batch with this tokenizer: right padding keeps each prompt's token positions
        # (the logits' text axis) equal to those of the prompt tokenized alone, which `offsets` describe.
        self.tokenizer.padding_side = "right"
        self.min_image_side = min_image_side
        self.max_image_side = max_image_side
        self.max_text_len = int(self.model.max_text_len)

    def offsets(self, prompt: str) -> list[tuple[int, int]]:
        """Char offsets of the prompt's tokens (the detector interface `stages.grounding` uses)."""
        return [
            (int(a), int(b)) for a, b in self.tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
        ]

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The package's `load_image` transform: shorter side to `min_image_side`, longer capped, normalised.

        `load_image` uses `RandomResize([800], max_size=1333)`; with a single size that is this plain
        `resize`, called directly so that the caller's `random` state is not consumed.
        """
        from groundingdino.datasets import transforms as T

        resized, _ = T.resize(image.convert("RGB"), None, self.min_image_side, self.max_image_side)
        tensor, _ = T.ToTensor()(resized, None)
        tensor, _ = T.Normalize(_MEAN, _STD)(tensor, None)
        return tensor

    @torch.inference_mode()
    def __call__(
        self, images: list[Image.Image], prompts: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, list[list[tuple[int, int]]]]:
        """Run one batch: one prompt per image (use `stages.grounding.build_prompt`).

        Returns probabilities (B, num_queries, text_len) = sigmoid(pred_logits), where text_len is the
        model's fixed text axis (256) and positions past a prompt's tokens are 0; boxes (B, num_queries, 4)
        as cxcywh normalised to each image's own size; and per prompt the tokenizer's (start, end) char
        offsets for each token position of that axis that the prompt fills. Prompts are used verbatim except
        for a final "." added when missing (as the package does), so char spans of the prompt stay valid.
        """
        from groundingdino.util.misc import nested_tensor_from_tensor_list

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            queries = self.model.num_queries
            return torch.zeros(0, queries, self.model.max_text_len), torch.zeros(0, queries, 4), []
        texts = [p if p.endswith(".") else p + "." for p in prompts]
        tensors = [self.preprocess(im) for im in images]
        # The package batches images of different sizes (zero padding plus a mask that the backbone and the
        # deformable attention honour; boxes stay relative to each image's valid area) but not different
        # prompts: its text enhancer expands the (B, L, L) phrase mask with `repeat(nhead, 1, 1)` where
        # nn.MultiheadAttention wants batch-major order, so prompts in one batch swap masks between heads
        # (seen here: probabilities off by up to 1.0). Hence one forward per distinct prompt, with all of
        # its images batched; with one prompt per caption that is one image per forward.
        groups: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            groups.setdefault(text, []).append(i)
        per_image: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for text, members in groups.items():
            batch = nested_tensor_from_tensor_list([tensors[i] for i in members]).to(self.device)
            outputs = self.model(batch, captions=[text] * len(members))
            group_probs = outputs["pred_logits"].sigmoid().float().cpu()
            group_boxes = outputs["pred_boxes"].float().cpu()
            for row, i in enumerate(members):
                per_image[i] = group_probs[row], group_boxes[row]
        probs = torch.stack([per_image[i][0] for i in range(len(images))])
        boxes = torch.stack([per_image[i][1] for i in range(len(images))])
        text_len = probs.shape[-1]
        offsets = [
            [(int(a), int(b)) for a, b in self.tokenizer(t, return_offsets_mapping=True)["offset_mapping"]]
            for t in texts
        ]
        return probs, boxes, [o[:text_len] for o in offsets]
