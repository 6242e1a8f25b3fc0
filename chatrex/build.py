"""Get a ChatRex to train: a checkpoint folder, `tiny:chatrex`, or a new one assembled from parts."""

from __future__ import annotations

from pathlib import Path

from chatrex.train_config import PartsConfig
from engine.models import resolve_model


def assemble_from_parts(parts: PartsConfig, out_dir: Path) -> Path:
    """Build a new ChatRex from pretrained parts (paper: CLIP-L/14-336, ConvNeXt-L, an LLM) and save it."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from chatrex.modeling import ChatRexForConditionalGeneration
    from chatrex.processor import ChatRexProcessor

    vision = _vision_tower(parts.vision)
    # an HF ConvNeXt (ImageNet) or a timm one through transformers' TimmWrapperModel (the paper's LAION CLIP
    # ConvNeXt); each is normalised with its own image processor's statistics
    convnext = AutoModel.from_pretrained(parts.convnext)
    tokenizer = AutoTokenizer.from_pretrained(parts.llm)
    llm = AutoModelForCausalLM.from_pretrained(parts.llm)
    model = ChatRexForConditionalGeneration.from_parts(
        vision,
        convnext,
        llm,
        tokenizer,
        num_object_tokens=parts.num_object_tokens,
        low_res_size=parts.low_res_size,
        high_res_size=parts.high_res_size,
        question_first=parts.question_first,
        index_tagged_objects=parts.index_tagged_objects,
    )
    processor = ChatRexProcessor.from_model_config(
        tokenizer,
        model.config,
        **_pixel_statistics(parts.vision, "low_res"),
        **_pixel_statistics(parts.convnext, "high_res"),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _pixel_statistics(name: str, prefix: str) -> dict[str, list[float]]:
    """The part's own image-processor mean/std (each encoder normalises as it was trained); {} if none."""
    from transformers import AutoImageProcessor

    try:
        image_processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        return {}
    data_config = getattr(image_processor, "data_config", None) or {}  # timm's processor keeps them here
    mean = getattr(image_processor, "image_mean", None) or data_config.get("mean")
    std = getattr(image_processor, "image_std", None) or data_config.get("std")
    return {f"{prefix}_mean": list(mean), f"{prefix}_std": list(std)} if mean and std else {}


def _vision_tower(name: str) -> object:
    """The vision half of a CLIP/SigLIP checkpoint (a full CLIP folder holds a text tower too)."""
    from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

    model_type = AutoConfig.from_pretrained(name).model_type
    cls = SiglipVisionModel if model_type.startswith("siglip") else CLIPVisionModel
    return cls.from_pretrained(name)


def initial_model_dir(model: str, parts: PartsConfig | None, work_dir: Path) -> Path:
    """The folder training starts from (assembling it once into `work_dir/init` for `model: parts`)."""
    if model == "parts":
        target = work_dir / "init"
        if not (target / "config.json").exists():
            assert parts is not None
            assemble_from_parts(parts, target)
        return target
    return Path(resolve_model(model))
