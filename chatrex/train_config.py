"""ChatRex training configuration (YAML, validated like the engine's: unknown keys are errors, `--set`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from engine.config import ConfigError, Strict, apply_overrides, read_yaml


class PartsConfig(Strict):
    """Pretrained parts to assemble a new ChatRex from (used when `model` is not a ChatRex checkpoint)."""

    vision: str  # e.g. openai/clip-vit-large-patch14-336
    convnext: str  # e.g. facebook/convnext-large-224-22k-1k
    llm: str  # e.g. Qwen/Qwen2.5-7B-Instruct
    num_object_tokens: int = Field(100, ge=1)
    low_res_size: int = 336
    high_res_size: int = 768
    # prompt layout and object-token tagging (`ChatRexConfig`); off: the paper's layout
    question_first: bool = False
    index_tagged_objects: bool = False


class StageConfig(Strict):
    """One training stage of the paper (§3.3, App. B.2).

    - `alignment`: image-caption pairs; the projectors and the new token rows train.
    - `perception`: detection, phrase/referring grounding, region understanding; vision encoders, projectors
      and LLM train.
    - `joint`: the perception mix plus grounded captioning; same parameters as `perception`.
    `task_weights` overrides the stage's default task mix (`chatrex.tasks.STAGE_WEIGHTS`); `train_vision`
    overrides whether the vision encoders train (default: not in alignment, yes in the other two).
    """

    name: Literal["alignment", "perception", "joint"]
    steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    warmup_steps: int = Field(0, ge=0)
    train_vision: bool | None = None
    task_weights: dict[str, float] | None = None
    lora: bool = False  # perception/joint only: LoRA adapters on the LLM instead of training all of it
    # ddp replicates the model per worker; fsdp shards it (needed for 7B LLMs, GPUs only, not in alignment:
    # the alignment stage trains single token rows through gradient hooks that FSDP's flat params lose)
    strategy: Literal["ddp", "fsdp"] = "ddp"

    @property
    def vision_trains(self) -> bool:
        return self.name != "alignment" if self.train_vision is None else self.train_vision

    @property
    def weights(self) -> dict[str, float]:
        from chatrex.tasks import STAGE_WEIGHTS

        return self.task_weights or STAGE_WEIGHTS[self.name]


class LoraConfig(Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, le=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class ScalingConfig(Strict):
    """Ray Train workers. On GPUs each worker gets one GPU; `strategy` is how the model is replicated."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    torch_threads: int = Field(1, ge=1)


class TrainConfig(Strict):
    name: str = "chatrex"
    model: str  # a ChatRex folder, `tiny:chatrex`, or "parts" to assemble from `parts`
    parts: PartsConfig | None = None
    stages: list[StageConfig]
    batch_size: int = Field(4, ge=1)  # per worker
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    max_boxes: int = Field(100, ge=1)
    # input boxes in training: "mixed" = regions + proposals (the paper); "proposals" = proposals only, each
    # region answered by its matched proposal (the evaluation's candidate distribution)
    candidates: Literal["mixed", "proposals"] = "mixed"
    seed: int = 0
    shuffle_buffer: int = Field(64, ge=0)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    lora: LoraConfig = LoraConfig()
    scaling: ScalingConfig = ScalingConfig()

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.model == "parts" and self.parts is None:
            raise ValueError("model: parts needs a `parts` section (vision, convnext, llm)")
        for stage in self.stages:
            if stage.lora and stage.name == "alignment":
                raise ValueError("lora applies to the perception and joint stages only")
            if stage.task_weights:
                from chatrex.tasks import TASKS

                unknown = set(stage.task_weights) - set(TASKS)
                if unknown:
                    raise ValueError(
                        f"stage {stage.name}: unknown tasks {sorted(unknown)}; choose from {TASKS}"
                    )
            if stage.strategy == "fsdp" and (stage.name == "alignment" or stage.lora):
                raise ValueError(
                    "fsdp is for the perception/joint stages without LoRA: the alignment stage (and LoRA's "
                    "token rows) train single embedding rows through gradient hooks that FSDP's flat "
                    "parameters lose"
                )
        return self


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    raw = apply_overrides(read_yaml(Path(path)), overrides or [])
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"invalid training config {path}:"]
        for err in exc.errors():
            lines.append(f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
