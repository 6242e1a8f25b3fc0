"""Configuration of UPN, ChatRex's Universal Proposal Network (arXiv 2411.18363, section 3.1).

The defaults follow the sizes of IDEA-Research's published `upn_large` config (read from their inference
code: 256-wide deformable encoder and decoder, 6 layers each, 8 heads, FFN 2048, 5 feature levels, 900
queries, Swin-L backbone); the backbone here defaults to a small ConvNeXt so a random model stays cheap.
Any transformers backbone with `out_features` works (ConvNeXt, Swin, ResNet...) via `backbone_config`.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

GRANULARITIES = ("fine", "coarse")  # prompt row 0: parts and small objects; row 1: whole objects


def default_backbone_config() -> dict[str, Any]:
    """A small ConvNeXt returning its last three stages (strides 8, 16, 32)."""
    return {
        "model_type": "convnext",
        "hidden_sizes": [48, 96, 192, 384],
        "depths": [2, 2, 6, 2],
        "out_features": ["stage2", "stage3", "stage4"],
    }


class UPNConfig(PretrainedConfig):
    """Sizes of the backbone, the deformable encoder/decoder, the queries and the two granularity prompts.

    `prompt_in_queries`: the published model uses its prompt to pick the decoder's queries (two-stage top-k
    by prompt similarity) and to score them; with this flag the prompt is also added to each query's content,
    so the decoder itself knows which granularity it is refining. Off for converted published weights.
    `logit_scale`: objectness logit = scale * <query, prompt> + bias (published: scale 1, no bias); None
    means 1/sqrt(d_model), which keeps random-init logits near the bias.
    """

    model_type = "upn"

    def __init__(
        self,
        backbone_config: dict[str, Any] | None = None,
        d_model: int = 256,
        encoder_layers: int = 6,
        decoder_layers: int = 6,
        encoder_attention_heads: int = 8,
        decoder_attention_heads: int = 8,
        encoder_ffn_dim: int = 2048,
        decoder_ffn_dim: int = 2048,
        encoder_n_points: int = 4,
        decoder_n_points: int = 4,
        num_feature_levels: int = 4,
        num_queries: int = 900,
        dropout: float = 0.0,
        activation_function: str = "relu",
        image_size: int = 800,
        image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        image_std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        granularities: tuple[str, ...] = GRANULARITIES,
        prompt_in_queries: bool = True,
        logit_scale: float | None = None,
        logit_bias_init: float = -4.595,  # log(0.01 / 0.99): the focal-loss prior of RetinaNet/DETR
        init_std: float = 0.02,
        **kwargs: Any,
    ) -> None:
        self.backbone_config = dict(backbone_config or default_backbone_config())
        self.d_model = d_model
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.encoder_attention_heads = encoder_attention_heads
        self.decoder_attention_heads = decoder_attention_heads
        self.encoder_ffn_dim = encoder_ffn_dim
        self.decoder_ffn_dim = decoder_ffn_dim
        self.encoder_n_points = encoder_n_points
        self.decoder_n_points = decoder_n_points
        self.num_feature_levels = num_feature_levels
        self.num_queries = num_queries
        self.dropout = dropout
        self.activation_function = activation_function
        self.image_size = image_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.granularities = list(granularities)
        self.prompt_in_queries = prompt_in_queries
        self.logit_scale = logit_scale
        self.logit_bias_init = logit_bias_init
        self.init_std = init_std
        super().__init__(**kwargs)

    def granularity_index(self, granularity: str) -> int:
        if granularity not in self.granularities:
            raise ValueError(f"unknown granularity {granularity!r}; this model knows {self.granularities}")
        return self.granularities.index(granularity)
