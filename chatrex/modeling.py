"""ChatRex: an MLLM that answers with indices of input boxes instead of writing coordinates.

Paper: "ChatRex: Taming Multimodal LLM for Joint Perception and Understanding" (arXiv 2411.18363, §3.2-3.3).
Written from the paper's description; layout of the prompt and the token spellings: `chatrex/processor.py`.

    image ──► low-res ViT (CLIP/SigLIP) ──► T x C_vit ─┐
          └─► high-res ConvNeXt ─► last stage T x C_cnx ┴─ concat ─► vision projector ─► image tokens
                       └─► stage maps ─► RoIAlign per box, avg-pooled, concat ─┐
    boxes (0-1 xyxy) ─────────────────────────────► sin-cos embedding ──────┴─► object projector ─► <roi>
    LLM input: [image tokens] \\n <obj0><roi> <obj1><roi> ... \\n question  ─► causal LM ─► answer

The LLM is any `AutoModelForCausalLM`; its vocabulary is extended with the ChatRex tokens and its embeddings
are resized (`from_parts`). Placeholders (`<image>`, `<roi>`) are embedded like any token and then overwritten
with the projected features, so the LLM itself is unmodified and can be swapped freely.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torchvision.ops import roi_align
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

from chatrex.configuration import ChatRexConfig
from chatrex.processor import add_chatrex_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["ChatRexForConditionalGeneration", "ChatRexPreTrainedModel", "sincos_box_embedding"]

Stage = Literal["alignment", "perception", "joint"]


def sincos_box_embedding(boxes: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(K, 4) boxes in 0-1 -> (K, dim): DETR-style sin/cos of each coordinate at dim/8 frequencies.

    Pooled RoI features say what is in a box but little about where it is; the LLM needs both to tell
    "the left cup" from "the right cup".
    """
    half = dim // 8
    exponents = torch.arange(half, dtype=torch.float32, device=boxes.device) / half
    freqs = temperature**-exponents
    angles = boxes.float()[..., None] * (2 * math.pi) * freqs  # (K, 4, half)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)


class ChatRexProjector(nn.Module):
    """LayerNorm + two-layer MLP + output LayerNorm.

    The towers' features come at unrelated scales, so they are normalised first. The output norm keeps the
    projected tokens at the scale of the LLM's own token embeddings (`from_parts` sets its gain to their
    spread): measured on the CPU benchmark, object tokens that had grown to ~17x the norm of a word
    embedding drowned what the LLM's attention added to them, and detection stayed at chance.
    """

    def __init__(self, in_dim: int, out_dim: int, act: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(out_dim, out_dim)
        self.out_norm = nn.LayerNorm(out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out_norm(self.linear_2(self.act(self.linear_1(self.norm(features)))))

    def match_embedding_scale(self, embeddings: torch.Tensor) -> None:
        """Set the output gain so projected tokens spread like the rows of `embeddings` (per dimension)."""
        with torch.no_grad():
            self.out_norm.weight.copy_(embeddings.float().std(dim=0).to(self.out_norm.weight))
            self.out_norm.bias.copy_(embeddings.float().mean(dim=0).to(self.out_norm.bias))


class ChatRexObjectEncoder(nn.Module):
    """Box -> one LLM token: RoIAlign over several ConvNeXt stages, average-pooled, + box position embedding.

    All selected stages are pooled for every box (unlike `MultiScaleRoIAlign`, which picks one FPN level by
    box size): ConvNeXt stages have different channel counts and meanings, and small boxes gain from the
    coarse context as large boxes gain from the fine detail.
    """

    def __init__(self, config: ChatRexConfig) -> None:
        super().__init__()
        self.output_size = config.roi_output_size
        self.box_embed_dim = config.box_embed_dim
        self.flatten = config.roi_pooling == "flatten"
        cells = config.roi_output_size**2 if self.flatten else 1
        self.use_roi = config.object_features == "roi"
        channels = sum(config.convnext_config.hidden_sizes[s - 1] for s in config.roi_stages) * cells
        channels = channels if self.use_roi else 0
        self.projector = ChatRexProjector(
            channels + config.box_embed_dim, config.text_config.hidden_size, config.projector_hidden_act
        )

    def forward(self, feature_maps: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor], image_size: int):
        """(sum n_i, hidden) object features, boxes of all images concatenated in batch order."""
        flat = torch.cat([b.reshape(-1, 4) for b in boxes]).to(feature_maps[0].device, torch.float32)
        batch_index = torch.cat(
            [torch.full((len(b),), i, dtype=torch.float32, device=flat.device) for i, b in enumerate(boxes)]
        )
        rois = torch.cat([batch_index[:, None], flat * image_size], dim=1)
        pooled = []
        for fmap in feature_maps if self.use_roi else []:
            # roi_align in float32: low-precision kernels are missing on some devices and cost nothing here.
            region = roi_align(
                fmap.float(),
                rois,
                output_size=self.output_size,
                spatial_scale=fmap.shape[-1] / image_size,
                sampling_ratio=2,
                aligned=True,
            )
            pooled.append(region.flatten(1) if self.flatten else region.mean(dim=(2, 3)))
        features = torch.cat([*pooled, sincos_box_embedding(flat, self.box_embed_dim)], dim=-1)
        return self.projector(features.to(self.projector.linear_1.weight.dtype))


class ChatRexPreTrainedModel(PreTrainedModel):
    config: ChatRexConfig
    config_class = ChatRexConfig
    base_model_prefix = "chatrex"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class ChatRexForConditionalGeneration(ChatRexPreTrainedModel):
    """Dual vision encoders + object encoder + causal LM; `forward` for training, `generate` for answers."""

    def __init__(self, config: ChatRexConfig) -> None:
        super().__init__(config)
        config.validate_layout()
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.high_res_encoder = AutoModel.from_config(config.convnext_config)
        self.vision_projector = ChatRexProjector(
            config.vision_config.hidden_size + config.convnext_config.hidden_sizes[-1],
            config.text_config.hidden_size,
            config.projector_hidden_act,
        )
        self.object_encoder = ChatRexObjectEncoder(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self._row_mask_hooks: list[Any] = []
        self.post_init()

    # ------------------------------------------------------------------------------------ construction

    @classmethod
    def from_parts(
        cls,
        vision_tower: PreTrainedModel,
        high_res_encoder: PreTrainedModel,
        language_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        num_object_tokens: int = 100,
        **config_kwargs: Any,
    ) -> ChatRexForConditionalGeneration:
        """Assemble a new ChatRex from pretrained parts (e.g. CLIP-L/14-336, ConvNeXt-L, Qwen2).

        Extends `tokenizer` in place with the ChatRex tokens, grows the LLM's embeddings to fit and draws
        the new rows around the mean of the old ones with the old rows' spread (`_extend_embeddings`).
        Projectors start random. `config_kwargs` go to `ChatRexConfig` (sizes, roi_stages, ...).
        """
        describe_timm_stages(high_res_encoder)
        ids = add_chatrex_tokens(tokenizer, num_object_tokens)
        _extend_embeddings(language_model, ids["new_token_start_id"], ids["new_token_end_id"])
        config = ChatRexConfig(
            vision_config=vision_tower.config,
            convnext_config=high_res_encoder.config,
            text_config=language_model.config,
            num_object_tokens=num_object_tokens,
            **ids,
            **config_kwargs,
        )
        model = cls(config)
        # Swap the freshly initialised towers for the pretrained ones (the projectors keep their init).
        model.vision_tower = vision_tower
        model.high_res_encoder = high_res_encoder
        model.language_model = language_model
        old_rows = language_model.get_input_embeddings().weight[: ids["new_token_start_id"]]
        model.vision_projector.match_embedding_scale(old_rows)
        model.object_encoder.projector.match_embedding_scale(old_rows)
        return model

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    # ---------------------------------------------------------------------------------------- features

    def get_image_features(
        self, pixel_values_low: torch.Tensor, pixel_values_high: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, T, hidden) projected image tokens and the ConvNeXt stage maps the object encoder pools."""
        grid = self.config.image_grid_size
        vit = self.vision_tower(
            pixel_values=pixel_values_low.to(self.vision_tower.dtype), output_hidden_states=True
        )
        low = vit.hidden_states[self.config.vision_feature_layer]
        if low.shape[1] == grid * grid + 1:  # CLIP prepends a CLS token; SigLIP does not
            low = low[:, 1:]
        convnext = self.high_res_encoder(
            pixel_values=pixel_values_high.to(self.high_res_encoder.dtype), output_hidden_states=True
        )
        stages = convnext.hidden_states  # HF ConvNeXt: (embeddings, stage 1, ..., stage S)
        if len(stages) == len(self.config.convnext_config.hidden_sizes):  # timm: (stage 1, ..., stage S)
            stages = (None, *stages)
        last = stages[-1]
        if low.shape[1] != grid * grid or tuple(last.shape[-2:]) != (grid, grid):
            raise ValueError(
                f"expected a {grid}x{grid} grid from both encoders, got {low.shape[1]} ViT tokens and a "
                f"{tuple(last.shape[-2:])} ConvNeXt map: are the images {self.config.low_res_size} and "
                f"{self.config.high_res_size} px (use ChatRexProcessor)?"
            )
        high = last.flatten(2).transpose(1, 2).to(low.dtype)
        image_embeds = self.vision_projector(torch.cat([low, high], dim=-1))
        return image_embeds, [stages[s] for s in self.config.roi_stages]

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values_low: torch.Tensor | None = None,
        pixel_values_high: torch.Tensor | None = None,
        boxes: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Token embeddings with `<image>` and `<roi>` placeholders replaced by image and object features."""
        embeds = self.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.config.image_token_id
        object_mask = input_ids == self.config.object_token_id
        boxes = list(boxes) if boxes is not None else [torch.zeros(0, 4)] * input_ids.shape[0]
        if len(boxes) != input_ids.shape[0]:
            raise ValueError(f"got {len(boxes)} box tensors for a batch of {input_ids.shape[0]}")
        per_row = object_mask.sum(dim=1).tolist()
        counts = [len(b) for b in boxes]
        if per_row != counts:
            raise ValueError(
                f"<roi> placeholders per row {per_row} do not match the boxes per image {counts}"
            )
        if not image_mask.any():
            if sum(counts):
                raise ValueError(
                    "boxes need the image: input_ids hold <roi> placeholders but no <image> ones"
                )
            return embeds
        if pixel_values_low is None or pixel_values_high is None:
            raise ValueError("input_ids hold <image> placeholders but pixel_values_low/high were not given")
        image_embeds, stage_maps = self.get_image_features(pixel_values_low, pixel_values_high)
        if int(image_mask.sum()) != image_embeds.shape[0] * image_embeds.shape[1]:
            raise ValueError(
                f"{int(image_mask.sum())} <image> placeholders for {image_embeds.shape[0]} images of "
                f"{image_embeds.shape[1]} tokens each"
            )
        embeds = embeds.masked_scatter(image_mask[..., None], image_embeds.to(embeds.dtype))
        if sum(counts):
            object_embeds = self.object_encoder(stage_maps, boxes, self.config.high_res_size)
            embeds = self.place_objects(embeds, input_ids, object_embeds)
        elif self.training and torch.is_grad_enabled():
            # A batch without boxes would leave the object encoder out of the graph, and DDP would then
            # wait forever for its gradients; a zero-weighted dummy box keeps every step's graph alike.
            dummy = self.object_encoder(
                stage_maps, [stage_maps[0].new_zeros(1, 4)], self.config.high_res_size
            )
            embeds = embeds + 0.0 * dummy.sum().to(embeds.dtype)
        return embeds

    def place_objects(
        self, embeds: torch.Tensor, input_ids: torch.Tensor, object_embeds: torch.Tensor
    ) -> torch.Tensor:
        """`embeds` with the `<roi>` positions replaced, in order, by `object_embeds` (n_boxes, hidden), and
        with `index_tagged_objects` each also given its index token's embedding (`index_tags`)."""
        object_mask = input_ids == self.config.object_token_id
        embeds = embeds.masked_scatter(object_mask[..., None], object_embeds.to(embeds.dtype))
        if self.config.index_tagged_objects:
            embeds = embeds + self.index_tags(input_ids, object_mask).to(embeds.dtype)
        return embeds

    def index_tags(self, input_ids: torch.Tensor, object_mask: torch.Tensor) -> torch.Tensor:
        """Per `<roi>` position the input embedding of the `<objN>` token before it, zeros elsewhere
        (`index_tagged_objects`: added to the object features so each object token says its own index)."""
        previous = torch.roll(input_ids, 1, dims=1)
        start = self.config.object_index_start_id
        named = previous[object_mask]
        if ((named < start) | (named >= start + self.config.num_object_tokens)).any():
            raise ValueError("index-tagged object tokens need each <roi> right after its <objN> index token")
        return self.get_input_embeddings()(previous) * object_mask[..., None]

    # ----------------------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values_low: torch.Tensor | None = None,
        pixel_values_high: torch.Tensor | None = None,
        boxes: Sequence[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        answer_logits_only: bool = False,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """LM loss over positions whose label is not -100 (the processor labels only the answer).

        `answer_logits_only=True` (training) applies the LM head only where a label is kept, and `logits`
        then holds just those rows (n_labelled, vocab): the same loss, without the (batch x sequence x vocab)
        logits of the prompt, which dominate a step's cost with a 150k vocabulary and a short answer.
        Other keywords (a KV cache as `cache`, attention options) go to the language model unchanged.
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds)")
            inputs_embeds = self.embed_inputs(input_ids, pixel_values_low, pixel_values_high, boxes)
        if use_cache is None and labels is not None:
            use_cache = False  # a training step has no use for a KV cache
        has_cache = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
        if position_ids is None and attention_mask is not None and not has_cache:
            # Positions count real tokens only, so left- and right-padded batches give the same logits.
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        if answer_logits_only and labels is not None:
            return self._answer_only_loss(inputs_embeds, attention_mask, position_ids, labels, **kwargs)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def _answer_only_loss(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        labels: torch.Tensor,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        return answer_only_loss(
            self.language_model, inputs_embeds, attention_mask, labels, position_ids=position_ids, **kwargs
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values_low: torch.Tensor | None = None,
        pixel_values_high: torch.Tensor | None = None,
        boxes: Sequence[torch.Tensor] | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Greedy answers for a left-padded batch: (B, new tokens), padded with pad_token_id after EOS.

        The multimodal prompt is embedded once and handed to the LLM's own `generate` as `inputs_embeds`
        (so the output holds only new tokens). Any `generate` keyword may be passed; the defaults are greedy.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate needs left padding (collate(..., padding_side='left'))")
        embeds = self.embed_inputs(input_ids, pixel_values_low, pixel_values_high, boxes)
        text = self.config.text_config
        defaults = {
            "do_sample": False,
            "num_beams": 1,
            "max_new_tokens": 64,
            "eos_token_id": text.eos_token_id,
            "pad_token_id": text.pad_token_id if text.pad_token_id is not None else text.eos_token_id,
        }
        return self.language_model.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, **{**defaults, **generate_kwargs}
        )

    # ---------------------------------------------------------------------------------------- training

    def set_trainable(self, stage: Stage, train_vision: bool | None = None) -> None:
        """Freeze for one of the paper's three training stages (§3.3).

        - "alignment": only the vision projector, the object encoder's projector and the embedding and
          LM-head rows of the new ChatRex tokens train. The rows are selected with gradient hooks that zero
          the gradient of every old row of those weight matrices, so the checkpoint keeps its usual layout.
          Consequence for optimizers: no weight decay on those two matrices (`optimizer_param_groups` does
          it); with zero gradients Adam(W) leaves the old rows exactly unchanged.
        - "perception" and "joint": everything trains, the vision encoders included (as in the paper).
        `train_vision` overrides whether the two vision encoders train (default: no in alignment, yes else).

        Call it before wrapping the model in DDP (Ray Train's `prepare_model`): the hooks live on the
        parameters, which DDP keeps. FSDP replaces parameters, so row hooks do not survive it.
        """
        for handle in self._row_mask_hooks:
            handle.remove()
        self._row_mask_hooks = []
        if stage == "alignment":
            self.requires_grad_(False)
            self.vision_projector.requires_grad_(True)
            self.object_encoder.requires_grad_(True)
            start, end = self.config.new_token_start_id, self.config.new_token_end_id
            for weight in self._token_row_weights():
                weight.requires_grad_(True)
                mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
                mask[start:end] = 1
                self._row_mask_hooks.append(
                    weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad))
                )
        elif stage in ("perception", "joint"):
            self.requires_grad_(True)
        else:
            raise ValueError(f"unknown training stage {stage!r}; use 'alignment', 'perception' or 'joint'")
        vision = stage != "alignment" if train_vision is None else train_vision
        self.vision_tower.requires_grad_(vision)
        self.high_res_encoder.requires_grad_(vision)

    def _token_row_weights(self) -> list[nn.Parameter]:
        """Input embedding and LM head weights, once each (they are one tensor when the LLM ties them)."""
        weights: list[nn.Parameter] = []
        for module in (self.get_input_embeddings(), self.get_output_embeddings()):
            if module is not None and all(module.weight is not w for w in weights):
                weights.append(module.weight)
        return weights

    def optimizer_param_groups(self, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Trainable parameters in two groups: decayed matrices, and the rest without decay.

        Biases, norms and the token embedding/LM-head matrices get no decay: decay would move the frozen
        rows in the alignment stage, and decaying embeddings is rarely wanted anyway.
        """
        no_decay_ids = {id(w) for w in self._token_row_weights()}
        decay, no_decay = [], []
        for param in self.parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or id(param) in no_decay_ids else decay).append(param)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]


def answer_only_loss(
    language_model: PreTrainedModel,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    **kwargs: Any,
) -> CausalLMOutputWithPast:
    """Mean next-token cross-entropy over kept labels (!= -100), the LM head applied only at those positions.

    Equal to the causal LM's own loss; `logits` holds the (n_kept, vocab) rows that were computed.
    """
    hidden = language_model.get_decoder()(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False, **kwargs
    ).last_hidden_state
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != -100
    logits = language_model.get_output_embeddings()(hidden[:, :-1][keep])
    loss = nn.functional.cross_entropy(logits.float(), targets[keep])
    return CausalLMOutputWithPast(loss=loss, logits=logits)


def describe_timm_stages(encoder: PreTrainedModel) -> None:
    """Give a timm ConvNeXt (transformers' `TimmWrapperModel`, e.g. the LAION CLIP ConvNeXt the paper uses)
    the two config fields ChatRex reads from HF ConvNeXt configs: `hidden_sizes` (channels per stage) and
    `patch_size` (the stem's stride), taken from timm's `feature_info`. Other encoders are left alone."""
    if getattr(encoder.config, "model_type", "") != "timm_wrapper":
        return
    info = encoder.timm_model.feature_info
    info = info.info if hasattr(info, "info") else info
    encoder.config.hidden_sizes = [int(f["num_chs"]) for f in info]
    encoder.config.patch_size = int(info[0]["reduction"])
    pretrained = getattr(encoder.timm_model, "pretrained_cfg", None) or {}
    if pretrained.get("mean") and getattr(encoder.config, "pretrained_cfg", None) is None:
        encoder.config.pretrained_cfg = {"mean": list(pretrained["mean"]), "std": list(pretrained["std"])}


def _extend_embeddings(language_model: PreTrainedModel, start: int, end: int) -> None:
    """Make room for token ids [start, end) and draw their rows around the old rows' mean.

    The spread per dimension is the old rows' own: the index tokens must be told apart from the first step
    (as inputs and as LM-head rows), which rows bunched at the mean would not allow. LLM checkpoints often
    carry spare rows beyond the tokenizer (Qwen2 does); those are reused instead of growing, and are
    re-initialised like new rows.
    """
    if end > language_model.get_input_embeddings().weight.shape[0]:
        language_model.resize_token_embeddings(end, mean_resizing=False)
    seen: list[torch.Tensor] = []
    with torch.no_grad():
        for module in (language_model.get_input_embeddings(), language_model.get_output_embeddings()):
            if module is None or any(module.weight is w for w in seen):
                continue
            weight = module.weight
            old = weight[:start].float()
            noise = torch.randn(end - start, weight.shape[1], device=weight.device) * old.std(dim=0)
            weight[start:end] = (old.mean(dim=0) + noise).to(weight.dtype)
            seen.append(weight)


# Lets `AutoModelForImageTextToText.from_pretrained(folder)` (e.g. engine.models.load_model) find the class
# once this module is imported; no remote code involved.
AutoModelForImageTextToText.register(ChatRexConfig, ChatRexForConditionalGeneration, exist_ok=True)
