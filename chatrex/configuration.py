"""ChatRex configuration: two vision encoders, an object encoder and a causal LM in one config.json.

ChatRex (arXiv 2411.18363, §3.2) reads an image twice: a CLIP/SigLIP ViT at low resolution and a ConvNeXt at
high resolution, sized so that both end on the same token grid (ViT-L/14 at 336 px and ConvNeXt stride 32 at
768 px both give 24x24). The high-resolution feature maps also feed the object encoder (RoIAlign per box).
Everything a model needs to be rebuilt from its folder lives here; token spellings and the prompt layout are
documented in `chatrex/processor.py`.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

__all__ = ["ChatRexConfig"]

# ViT-L/14 at 336 px, as the paper's low-resolution encoder.
_CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
    "projection_dim": 768,
}
# ConvNeXt-L stage layout, as the paper's high-resolution encoder.
_CONVNEXT_L = {"hidden_sizes": [192, 384, 768, 1536], "depths": [3, 3, 27, 3], "image_size": 768}


@strict
class ChatRexConfig(PreTrainedConfig):
    r"""Configuration of [`ChatRexForConditionalGeneration`].

    Args:
        vision_config: low-resolution vision tower (`clip_vision_model` or `siglip_vision_model`).
        convnext_config: high-resolution encoder (`convnext`); its stages feed the projector and RoIAlign.
        text_config: the causal LM (any `AutoModelForCausalLM` config; Qwen2 by default).
        num_object_tokens: N, the number of index tokens `<obj0>`..`<obj{N-1}>` = the most boxes per image.
        low_res_size: square input side of the vision tower, in pixels.
        high_res_size: square input side of the ConvNeXt, in pixels.
        vision_feature_layer: which hidden state of the vision tower to use (-2: the penultimate, as LLaVA).
        roi_stages: ConvNeXt stages (1-based, 1 = stride 4 ... 4 = stride 32) that the object encoder pools.
        roi_output_size: RoIAlign grid per box and stage.
        roi_pooling: "mean" averages each stage's RoI grid into one vector (compact; pretrained ConvNeXt
            channels already say what an object is); "flatten" keeps the grid (C x S x S per stage), which
            a small or from-scratch encoder needs to see an object's shape.
        object_features: "roi" (RoIAlign of the ConvNeXt stages + box embedding, the paper) or "box" (the box
            embedding alone: the ablation without high-resolution object features).
        box_embed_dim: size of the sin-cos embedding of a box's 4 normalised coordinates (multiple of 8).
        projector_hidden_act: activation of both projector MLPs.
        question_first: prompt layout the model is trained with: False (default) puts the question after
            the object tokens, True before them, so each object token can already attend to the question
            (`chatrex/processor.py`; measured for a small LLM trained from scratch in docs/chatrex.md).
        index_tagged_objects: each object token also carries the input embedding of its `<objN>` index
            token (added to the object feature), so naming a box needs no look back to the token before it.
        image_token_id: id of `<image>`, the placeholder replaced by one image token each.
        object_token_id: id of `<roi>`, the placeholder replaced by one box's object feature.
        object_index_start_id: id of `<obj0>`; `<obj{i}>` has id `object_index_start_id + i`.
        ground_start_id, ground_end_id, objects_start_id, objects_end_id: ids of `<ground>`, `</ground>`,
            `<objects>`, `</objects>`.
        new_token_start_id, new_token_end_id: the half-open id range of every token ChatRex added to the LLM
            vocabulary; the alignment stage trains exactly these embedding and LM-head rows.
    """

    model_type = "chatrex"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=_CLIP_L_336
        ),
        "convnext_config": SubConfigSpec(
            config_class=AutoConfig, model_type="convnext", init_kwargs=_CONVNEXT_L
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    convnext_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_object_tokens: int = 100
    low_res_size: int = 336
    high_res_size: int = 768
    vision_feature_layer: int = -2
    roi_stages: list[int] | None = None
    roi_output_size: int = 7
    roi_pooling: str = "mean"
    object_features: str = "roi"
    question_first: bool = False
    index_tagged_objects: bool = False
    box_embed_dim: int = 256
    projector_hidden_act: str = "gelu"
    image_token_id: int | None = None
    object_token_id: int | None = None
    object_index_start_id: int | None = None
    ground_start_id: int | None = None
    ground_end_id: int | None = None
    objects_start_id: int | None = None
    objects_end_id: int | None = None
    new_token_start_id: int | None = None
    new_token_end_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.roi_stages is None:
            self.roi_stages = list(range(1, len(self.convnext_config.hidden_sizes) + 1))
        self.roi_stages = [int(s) for s in self.roi_stages]
        # The wrapped LLM decides about tying; mirror it so save/load treats the composite the same way.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    # ------------------------------------------------------------------------------------ derived layout

    @property
    def image_grid_size(self) -> int:
        """Tokens per side of the image grid (the low-resolution patch grid)."""
        return self.low_res_size // self.vision_config.patch_size

    @property
    def num_image_tokens(self) -> int:
        return self.image_grid_size**2

    @property
    def convnext_stride(self) -> int:
        """Total stride of the last ConvNeXt stage: the stem's patch size, then x2 per further stage."""
        return self.convnext_config.patch_size * 2 ** (len(self.convnext_config.hidden_sizes) - 1)

    def validate_layout(self) -> None:
        """Fail early, with numbers, when the two encoders would not produce the same token grid."""
        patch = self.vision_config.patch_size
        if self.low_res_size % patch:
            raise ValueError(
                f"low_res_size {self.low_res_size} is not a multiple of the ViT patch size {patch}"
            )
        if self.high_res_size % self.convnext_stride:
            raise ValueError(
                f"high_res_size {self.high_res_size} is not a multiple of the ConvNeXt stride "
                f"{self.convnext_stride}"
            )
        high_grid = self.high_res_size // self.convnext_stride
        if high_grid != self.image_grid_size:
            raise ValueError(
                f"the encoders disagree on the token grid: ViT {self.low_res_size}/{patch} = "
                f"{self.image_grid_size} but ConvNeXt {self.high_res_size}/{self.convnext_stride} = "
                f"{high_grid}; "
                f"choose high_res_size = {self.image_grid_size * self.convnext_stride}"
            )
        num_stages = len(self.convnext_config.hidden_sizes)
        bad = [s for s in self.roi_stages if not 1 <= s <= num_stages]
        if bad or not self.roi_stages:
            raise ValueError(
                f"roi_stages must be non-empty stage numbers in 1..{num_stages}, got {self.roi_stages}"
            )
        if self.roi_pooling not in ("mean", "flatten"):
            raise ValueError(f"roi_pooling must be 'mean' or 'flatten', got {self.roi_pooling!r}")
        if self.object_features not in ("roi", "box"):
            raise ValueError(f"object_features must be 'roi' or 'box', got {self.object_features!r}")
        if self.box_embed_dim % 8:
            raise ValueError(
                f"box_embed_dim must be a multiple of 8 (sin+cos per coordinate), got {self.box_embed_dim}"
            )
        missing = [
            name
            for name in ("image_token_id", "object_token_id", "object_index_start_id", "new_token_start_id")
            if getattr(self, name) is None
        ]
        if missing:
            raise ValueError(
                f"ChatRexConfig lacks the special token ids {missing}; build the model with "
                "ChatRexForConditionalGeneration.from_parts(...), which extends the tokenizer and sets them"
            )


AutoConfig.register("chatrex", ChatRexConfig, exist_ok=True)
