"""UPN architecture: backbone -> deformable encoder -> prompt-selected queries -> deformable decoder.

Built from transformers' Deformable DETR parts (encoder, decoder with iterative box refinement, sine position
embedding, the two-stage proposal helpers), all pure PyTorch, so it runs on CPU without a compiled kernel.
What UPN adds (paper section 3.1, and the published inference code's structure) is the granularity prompt:
one learned embedding per granularity (fine: parts and small objects; coarse: whole objects). The prompt
scores every encoder token (<token, prompt>), the top-k tokens become the decoder's reference boxes, and the
decoder's outputs are scored against the same prompt: one model, two kinds of "object". Architecture only:
losses, matching and training live in `upn/loss.py` and `pipelines/train_upn.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoBackbone, AutoConfig, DeformableDetrConfig, PreTrainedModel
from transformers import initialization as init
from transformers.models.deformable_detr.modeling_deformable_detr import (
    DeformableDetrDecoder,
    DeformableDetrEncoder,
    DeformableDetrMLPPredictionHead,
    DeformableDetrModel,
    DeformableDetrMultiscaleDeformableAttention,
    DeformableDetrSinePositionEmbedding,
    inverse_sigmoid,
)
from transformers.utils import ModelOutput

from upn.configuration_upn import UPNConfig


@dataclass
class UPNEncoding(ModelOutput):
    """The encoder's memory and the multi-scale bookkeeping the decoder needs (computed once per image)."""

    memory: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # (B, N) True where a token is a real pixel
    spatial_shapes: torch.Tensor | None = None
    spatial_shapes_list: list[tuple[int, int]] | None = None
    level_start_index: torch.Tensor | None = None
    valid_ratios: torch.Tensor | None = None


@dataclass
class UPNOutput(ModelOutput):
    """Per query: objectness logit and box (cx, cy, w, h, normalized to the input); plus every decoder layer's
    and the encoder's selected proposals, which the training loss also supervises."""

    logits: torch.Tensor | None = None  # (B, Q)
    pred_boxes: torch.Tensor | None = None  # (B, Q, 4)
    aux_logits: torch.Tensor | None = None  # (B, L, Q), L decoder layers (last = logits)
    aux_boxes: torch.Tensor | None = None  # (B, L, Q, 4)
    enc_logits: torch.Tensor | None = None  # (B, Q): the top-k encoder tokens' own scores
    enc_boxes: torch.Tensor | None = None  # (B, Q, 4)


def deformable_config(config: UPNConfig) -> DeformableDetrConfig:
    """The Deformable DETR config that sizes transformers' encoder and decoder modules."""
    return DeformableDetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        d_model=config.d_model,
        encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers,
        encoder_attention_heads=config.encoder_attention_heads,
        decoder_attention_heads=config.decoder_attention_heads,
        encoder_ffn_dim=config.encoder_ffn_dim,
        decoder_ffn_dim=config.decoder_ffn_dim,
        encoder_n_points=config.encoder_n_points,
        decoder_n_points=config.decoder_n_points,
        num_feature_levels=config.num_feature_levels,
        num_queries=config.num_queries,
        dropout=config.dropout,
        activation_function=config.activation_function,
        two_stage=True,
        with_box_refine=True,
        disable_custom_kernels=True,
    )


class UPNPreTrainedModel(PreTrainedModel):
    config_class = UPNConfig
    base_model_prefix = "upn"
    main_input_name = "pixel_values"

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, DeformableDetrMultiscaleDeformableAttention):
            # Deformable DETR's init: sampling offsets fan out in a ring per head, uniform attention
            init.constant_(module.sampling_offsets.weight, 0.0)
            thetas = torch.arange(module.n_heads, dtype=torch.float32) * (2.0 * math.pi / module.n_heads)
            grid = torch.stack([thetas.cos(), thetas.sin()], -1)
            grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(module.n_heads, 1, 1, 2)
            grid = grid.repeat(1, module.n_levels, module.n_points, 1)
            for i in range(module.n_points):
                grid[:, :, i, :] *= i + 1
            init.copy_(module.sampling_offsets.bias, grid.view(-1))
            init.constant_(module.attention_weights.weight, 0.0)
            init.constant_(module.attention_weights.bias, 0.0)
            init.xavier_uniform_(module.value_proj.weight)
            init.constant_(module.value_proj.bias, 0.0)
            init.xavier_uniform_(module.output_proj.weight)
            init.constant_(module.output_proj.bias, 0.0)
        elif isinstance(module, UPNModel):
            init.normal_(module.level_embed)
            init.normal_(module.granularity_prompts.weight)
            init.constant_(module.logit_bias, self.config.logit_bias_init)
            for head in [*module.decoder.bbox_embed, module.enc_bbox_embed]:
                # boxes start at their reference box (DINO / Deformable DETR refinement init)
                init.constant_(head.layers[-1].weight, 0.0)
                init.constant_(head.layers[-1].bias, 0.0)


class UPNModel(UPNPreTrainedModel):
    """Class-agnostic proposals at a chosen granularity: `model(pixel_values, granularity="coarse")`."""

    def __init__(self, config: UPNConfig) -> None:
        super().__init__(config)
        d = config.d_model
        detr = deformable_config(config)
        self.backbone = AutoBackbone.from_config(AutoConfig.for_model(**config.backbone_config))
        channels = list(self.backbone.channels)
        if config.num_feature_levels < len(channels):
            raise ValueError(
                f"num_feature_levels {config.num_feature_levels} < the backbone's {len(channels)} outputs"
            )
        proj = [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d)) for c in channels]
        in_channels = channels[-1]
        for _ in range(config.num_feature_levels - len(channels)):  # extra coarser levels, stride 2 each
            proj.append(nn.Sequential(nn.Conv2d(in_channels, d, 3, stride=2, padding=1), nn.GroupNorm(32, d)))
            in_channels = d
        self.input_proj = nn.ModuleList(proj)
        self.position_embedding = DeformableDetrSinePositionEmbedding(d // 2, normalize=True)
        self.level_embed = nn.Parameter(torch.zeros(config.num_feature_levels, d))
        self.encoder = DeformableDetrEncoder(detr)
        self.decoder = DeformableDetrDecoder(detr)
        # iterative refinement: the decoder applies layer i's box head to move its reference boxes
        self.decoder.bbox_embed = nn.ModuleList(
            DeformableDetrMLPPredictionHead(d, d, 4, 3) for _ in range(config.decoder_layers)
        )
        self.enc_output = nn.Linear(d, d)  # names used by DeformableDetrModel.gen_encoder_output_proposals
        self.enc_output_norm = nn.LayerNorm(d)
        self.enc_bbox_embed = DeformableDetrMLPPredictionHead(d, d, 4, 3)
        self.query_pos_head = DeformableDetrMLPPredictionHead(2 * d, d, d, 2)
        self.tgt_embed = nn.Embedding(config.num_queries, d)
        self.decoder_norm = nn.LayerNorm(d)
        self.granularity_prompts = nn.Embedding(len(config.granularities), d)
        self.logit_bias = nn.Parameter(torch.zeros(()))
        self.post_init()

    # transformers' two-stage helpers, reused as they are (they read enc_output*, config.d_model)
    gen_encoder_output_proposals = DeformableDetrModel.gen_encoder_output_proposals
    get_proposal_pos_embed = DeformableDetrModel.get_proposal_pos_embed
    get_valid_ratio = DeformableDetrModel.get_valid_ratio

    def objectness(self, features: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """Similarity of each feature to the granularity prompt, as a logit (T-Rex2's contrastive head)."""
        scale = self.config.logit_scale or self.config.d_model**-0.5
        return (features @ prompt) * scale + self.logit_bias

    def encode(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> UPNEncoding:
        """Backbone + projections + deformable encoder; shared by every granularity of one image."""
        batch, _, height, width = pixel_values.shape
        if pixel_mask is None:
            pixel_mask = torch.ones(batch, height, width, dtype=torch.bool, device=pixel_values.device)
        maps = list(self.backbone(pixel_values).feature_maps)
        sources = [proj(f) for proj, f in zip(self.input_proj, maps, strict=False)]
        for level in range(len(maps), self.config.num_feature_levels):
            sources.append(self.input_proj[level](maps[-1] if level == len(maps) else sources[-1]))
        flat, masks, positions, shapes = [], [], [], []
        for level, source in enumerate(sources):
            mask = nn.functional.interpolate(pixel_mask[None].float(), size=source.shape[-2:])[0].bool()
            pos = self.position_embedding(source.shape, source.device, source.dtype, mask=mask)
            shapes.append((source.shape[-2], source.shape[-1]))
            flat.append(source.flatten(2).transpose(1, 2))
            positions.append(pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1))
            masks.append(mask)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=pixel_values.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.get_valid_ratio(m, dtype=flat[0].dtype) for m in masks], 1)
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
        memory = self.encoder(
            inputs_embeds=torch.cat(flat, 1),
            attention_mask=mask_flat,
            spatial_position_embeddings=torch.cat(positions, 1),
            spatial_shapes=spatial_shapes,
            spatial_shapes_list=shapes,
            level_start_index=level_start_index,
            valid_ratios=valid_ratios,
        ).last_hidden_state
        return UPNEncoding(memory, mask_flat, spatial_shapes, shapes, level_start_index, valid_ratios)

    def decode(self, enc: UPNEncoding, granularity: str) -> UPNOutput:
        """Select the prompt's top-k encoder tokens as reference boxes, refine them, score them."""
        prompt = self.granularity_prompts.weight[self.config.granularity_index(granularity)]
        tokens, proposals = self.gen_encoder_output_proposals(enc.memory, ~enc.mask, enc.spatial_shapes_list)
        token_logits = self.objectness(tokens, prompt)
        token_boxes = self.enc_bbox_embed(tokens) + proposals  # unsigmoided
        usable = torch.isfinite(proposals).all(-1)
        k = min(self.config.num_queries, tokens.shape[1])
        top = torch.topk(token_logits.masked_fill(~usable, float("-inf")), k, dim=1).indices
        enc_logits = token_logits.gather(1, top)
        enc_boxes = token_boxes.gather(1, top[..., None].expand(-1, -1, 4))
        reference = enc_boxes.detach().sigmoid()
        query_pos = self.query_pos_head(self.get_proposal_pos_embed(enc_boxes.detach()))
        target = self.tgt_embed.weight[:k][None].expand(tokens.shape[0], -1, -1)
        if self.config.prompt_in_queries:
            target = target + prompt
        out = self.decoder(
            inputs_embeds=target,
            object_queries_position_embeddings=query_pos,
            encoder_hidden_states=enc.memory,
            encoder_attention_mask=enc.mask,
            reference_points=reference,
            spatial_shapes=enc.spatial_shapes,
            spatial_shapes_list=enc.spatial_shapes_list,
            level_start_index=enc.level_start_index,
            valid_ratios=enc.valid_ratios,
        )
        hidden = out.intermediate_hidden_states  # (B, L, Q, d)
        # the decoder detaches its refined references; recompute each layer's boxes with gradients
        before = torch.cat([reference[:, None], out.intermediate_reference_points[:, :-1]], 1)
        boxes = torch.stack(
            [
                (head(hidden[:, i]) + inverse_sigmoid(before[:, i])).sigmoid()
                for i, head in enumerate(self.decoder.bbox_embed)
            ],
            1,
        )
        logits = self.objectness(self.decoder_norm(hidden), prompt)
        return UPNOutput(
            logits=logits[:, -1],
            pred_boxes=boxes[:, -1],
            aux_logits=logits,
            aux_boxes=boxes,
            enc_logits=enc_logits,
            enc_boxes=enc_boxes.sigmoid(),
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        granularity: str = "coarse",
    ) -> UPNOutput:
        return self.decode(self.encode(pixel_values, pixel_mask), granularity)
