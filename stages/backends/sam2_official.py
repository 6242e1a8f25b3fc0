"""SAM 2 through the official `sam2` package: box prompts in, one mask per box at each image's full size out.

Usage::

    segmenter = Sam2Official("tiny:sam2-official")          # the 128 px tiny model of scaffold.tiny_models
    segmenter = Sam2Official("/models/my-sam2")              # a folder: build.json + checkpoint
    segmenter = Sam2Official.from_checkpoint(                # released weights, hydra config of the package
        "sam2.1_hiera_l.yaml", "/models/sam2.1_hiera_large.pt", device="cuda"
    )
    results = segmenter(images, boxes)  # [(masks (N_i, H_i, W_i) bool, scores (N_i,) float32), ...]

A model folder holds the checkpoint in the official format (`{"model": state_dict}`) and `build.json`:
`{"config": "configs/sam2.1/sam2.1_hiera_t.yaml", "checkpoint": "checkpoint.pt", "hydra_overrides": [...]}`,
the hydra overrides being what rebuilds a non-standard architecture (the tiny model's small sizes).
Config names may be short (`sam2.1_hiera_l.yaml`, `sam2_hiera_s`) or the package's full hydra names.
Nothing here downloads: `build_sam2` is given local checkpoint files only.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from engine.models import resolve_model

__all__ = ["Sam2Official", "config_name", "feature_sizes"]

# Hydra's compose state is global: build one model at a time.
_BUILD_LOCK = threading.Lock()


def config_name(name: str) -> str:
    """The package's hydra config name for `sam2.1_hiera_l.yaml`, `sam2.1_hiera_l` or a full name."""
    if not name.endswith(".yaml"):
        name += ".yaml"
    if "/" in name:
        return name
    return f"configs/{'sam2.1' if name.startswith('sam2.1') else 'sam2'}/{name}"


def feature_sizes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """Backbone feature sizes `SAM2ImagePredictor` reshapes to: the image embedding size (image_size /
    backbone stride) times 4, 2 and 1; for 1024 px input that is the predictor's built-in (256, 128, 64)."""
    side = model.sam_image_embedding_size
    return [(4 * side, 4 * side), (2 * side, 2 * side), (side, side)]


def _build(config: str, checkpoint: str | Path, overrides: Sequence[str], device: str) -> torch.nn.Module:
    from sam2.build_sam import build_sam2

    with _BUILD_LOCK:
        return build_sam2(
            config_name(config),
            ckpt_path=str(checkpoint),
            device=device,
            hydra_overrides_extra=list(overrides),
        )


class Sam2Official:
    """Masks for box prompts: each image is embedded once and all of its boxes are decoded in one call."""

    def __init__(self, model_dir_or_tiny_name: str, device: str = "cpu", embed_batch_size: int = 8) -> None:
        folder = Path(resolve_model(model_dir_or_tiny_name))
        spec = json.loads((folder / "build.json").read_text(encoding="utf-8"))
        model = _build(spec["config"], folder / spec["checkpoint"], spec.get("hydra_overrides", []), device)
        self._setup(model, embed_batch_size)

    @classmethod
    def from_checkpoint(
        cls,
        config: str,
        checkpoint_path: str | Path,
        device: str = "cpu",
        hydra_overrides: Sequence[str] = (),
        embed_batch_size: int = 8,
    ) -> Sam2Official:
        """A released checkpoint and its package config: `sam2.1_hiera_l.yaml` + `sam2.1_hiera_large.pt`."""
        self = cls.__new__(cls)
        self._setup(_build(config, checkpoint_path, hydra_overrides, device), embed_batch_size)
        return self

    def _setup(self, model: torch.nn.Module, embed_batch_size: int) -> None:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.model = model
        self.embed_batch_size = max(1, embed_batch_size)
        self.predictor = SAM2ImagePredictor(model)
        # The predictor hard-codes the feature sizes of 1024 px input; any other image_size needs its own.
        self.predictor._bb_feat_sizes = feature_sizes(model)

    @torch.inference_mode()
    def __call__(
        self, images: list[np.ndarray], boxes: list[np.ndarray]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """images: (H, W, 3) uint8 RGB; boxes: (N_i, 4) absolute xyxy per image.

        Returns per image (masks (N_i, H, W) bool, scores (N_i,) float32 predicted IoU). Images without boxes
        are not embedded at all; the others go through `set_image_batch` in chunks of `embed_batch_size`.
        """
        if len(images) != len(boxes):
            raise ValueError(f"{len(images)} images but {len(boxes)} box arrays")
        prompts = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes]
        results: list[tuple[np.ndarray, np.ndarray]] = []
        for image, prompt in zip(images, prompts, strict=True):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
            h, w = image.shape[:2]
            results.append((np.zeros((len(prompt), h, w), bool), np.zeros(len(prompt), np.float32)))
        todo = [i for i, p in enumerate(prompts) if len(p)]
        for start in range(0, len(todo), self.embed_batch_size):
            chunk = todo[start : start + self.embed_batch_size]
            # Writable C-contiguous copies only where needed (torch warns on read-only arrays from PIL).
            self.predictor.set_image_batch([np.require(images[i], requirements="CW") for i in chunk])
            masks, scores, _ = self.predictor.predict_batch(
                box_batch=[prompts[i] for i in chunk], multimask_output=False
            )
            for i, mask, score in zip(chunk, masks, scores, strict=True):
                n, (h, w) = len(prompts[i]), images[i].shape[:2]
                # One box comes back as (1, H, W) and (1,), several as (N, 1, H, W) and (N, 1).
                results[i] = (mask.reshape(n, h, w) > 0.5, score.reshape(n).astype(np.float32))
        self.predictor.reset_predictor()  # do not keep the last chunk's features alive between calls
        return results
