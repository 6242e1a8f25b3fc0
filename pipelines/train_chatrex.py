"""Train ChatRex on Rexverse shards with Ray Train (TorchTrainer), stage by stage, resumable.

Local (CPU workers on an embedded Ray):
    python pipelines/train_chatrex.py --config configs/chatrex_fixture.yaml --shards out/fixture/shards \\
        --output out/chatrex
Cluster: ray job submit --working-dir . -- python pipelines/train_chatrex.py --config configs/chatrex_7b.yaml

Each stage of the config (the paper's three: `alignment` on image-caption pairs, `perception` on detection,
grounding and region understanding, `joint` adding grounded captions; `chatrex.tasks.STAGE_WEIGHTS`) is one
Ray Train run named
`<i>-<stage>` under `<output>/runs`; its final model lands in `<output>/<i>-<stage>/final` and the next stage
starts from it. Rerunning the same command resumes: finished stages are skipped and an interrupted stage
restarts from its latest checkpoint (Ray Train restores a run with the same storage path and name).
The trained model ends in `<output>/model`, the loss curve in `<output>/train_summary.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatrex.train_config import StageConfig, TrainConfig, load_train_config  # noqa: E402
from engine.config import ConfigError, RayConfig  # noqa: E402
from engine.training import (  # noqa: E402
    OPTIMIZER_FILE,
    STATE_FILE,
    fit_to_folder,
    report_checkpoint,
    restored_checkpoint,
    saved_optimizer_state,
    shard_paths,
    warmup_cosine,
)

log = logging.getLogger("rexverse.train")


# --- on the workers --------------------------------------------------------------------------------------


def apply_lora(model: Any, cfg: TrainConfig) -> Any:
    """LoRA adapters on the LLM's attention projections; the base LLM freezes except the new token rows."""
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules
    )
    model.language_model = get_peft_model(model.language_model, config)
    # peft freezes every base weight of the LLM, the embedding and LM-head matrices included; the new token
    # rows (<objN>, grounding tokens) must keep training, through the row hooks `set_trainable` put on them.
    for weight in model._token_row_weights():
        weight.requires_grad_(True)
    return model


def plain_model(model: Any) -> Any:
    """The model to save: unwrapped from DDP, with LoRA adapters merged into a copy (plain ChatRex layout)."""
    import copy

    model = getattr(model, "module", model)
    if hasattr(model.language_model, "merge_and_unload"):
        model = copy.deepcopy(model)
        model.language_model = model.language_model.merge_and_unload()
    return model


def lr_factor(step: int, stage: StageConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the stage's learning rate."""
    return warmup_cosine(step, stage.steps, stage.warmup_steps)


# --- precision -------------------------------------------------------------------------------------------
# `scaling.dtype` is the compute dtype, the dtype of frozen weights and the dtype checkpoints are saved in.
# What the optimizer steps is always float32 ("master weights"): AdamW on bfloat16 weights rounds most small
# updates away (bench/bf16_updates.py: at lr 2e-5 on weights of std 0.02, 10 steps changed ~half the bf16
# weights, every fp32 one). The forward runs under autocast in the compute dtype; FSDP casts its flat
# parameters with its own MixedPrecision. Checkpoints hold the model in `scaling.dtype` (what users load)
# plus MASTER_FILE, the float32 values of the trained parameters, which a resume or the next stage reads back.

MASTER_FILE = "master_weights.safetensors"


def compute_dtype(cfg: TrainConfig) -> Any:
    import torch

    return torch.bfloat16 if cfg.scaling.dtype == "bfloat16" else torch.float32


def autocast(device_type: str, dtype: Any) -> Any:
    """Autocast to `dtype` on `device_type` (cuda or cpu; both run bfloat16), a no-op for float32."""
    import torch

    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)


def keep_fp32_masters(model: Any, dtype: Any, everything: bool = False) -> None:
    """Trainable parameters in float32, frozen ones in `dtype` (no optimizer touches them, so they keep the
    checkpoint's precision at half the memory); `everything`: all in float32 (FSDP: a flat parameter holds
    one dtype, and MixedPrecision casts it for the compute). In place: DDP hooks and row hooks stay."""
    import torch

    for param in model.parameters():
        if param.is_floating_point():
            wanted = torch.float32 if everything or param.requires_grad else dtype
            if param.dtype != wanted:
                param.data = param.data.to(wanted)


def fsdp_kwargs(dtype: Any) -> dict[str, Any]:
    """FSDP's arguments: float32 sharded master parameters, compute and buffers in `dtype`, gradients
    reduced in float32 (a bfloat16 reduce-scatter over 8+ ranks rounds the small per-rank contributions that
    this policy exists to keep). `use_orig_params` keeps the model's own parameters visible, so the
    optimizer groups (`optimizer_param_groups`) and frozen vision towers work under FSDP."""
    import torch
    from torch.distributed.fsdp import MixedPrecision

    policy = MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32, buffer_dtype=dtype)
    return {"mixed_precision": policy, "use_orig_params": True}


class _Saved:
    """Stands for the optimizer in `report_checkpoint`, which saves its `state_dict()`: here, the state that
    `gathered_state` collected from every rank."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def gathered_state(model: Any, optimizer: Any, fsdp: bool) -> tuple[dict[str, Any] | None, Any]:
    """(full model state dict, optimizer stand-in) for a checkpoint. Under FSDP each rank holds a shard, so
    every rank must call this (a collective); rank 0 receives the full float32 state on the CPU (parameter
    names as keys), the others empty dicts. Otherwise (None, the optimizer itself): nothing to gather."""
    if not fsdp:
        return None, optimizer
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # Offload to the host on GPUs (a whole 7B state on every GPU would not fit). Not on CPU: FSDP then skips
    # its copy of each gathered tensor, relying on `.cpu()` to make one, which returns the same tensor on the
    # CPU, and the reused gather buffer overwrites exp_avg with exp_avg_sq (seen with torch 2.14, gloo).
    on_gpu = next(model.parameters()).device.type != "cpu"
    options = StateDictOptions(full_state_dict=True, cpu_offload=on_gpu)
    weights, moments = get_state_dict(model, optimizer, options=options)
    return weights, _Saved(moments)


def load_moments(model: Any, optimizer: Any, moments: dict[str, Any] | None, fsdp: bool) -> None:
    """Resume the optimizer from a checkpoint's state. Under FSDP the state is the full one that
    `gathered_state` saved; rank 0 reads it and it is scattered to the ranks' shards (the others pass None:
    each rank reading the whole state would hold all of it in host memory at once)."""
    if not fsdp:
        optimizer.load_state_dict(moments)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(model, optimizer, moments or {}, options=options)


def restore_masters(model: Any, folder: Path) -> None:
    """Put the float32 master values a checkpoint saved (MASTER_FILE) back into `model`'s parameters, one
    tensor at a time straight onto each parameter's device."""
    from safetensors import safe_open

    path = folder / MASTER_FILE
    if not path.exists():
        return
    params = dict(model.named_parameters())
    with safe_open(str(path), framework="pt") as masters:
        for name in masters.keys():
            if name not in params:
                raise RuntimeError(f"{path} holds {name}, which the model in {folder} does not have")
            params[name].data = masters.get_tensor(name).to(params[name].device)


def load_training_model(
    model_dir: Path, cfg: TrainConfig, stage: StageConfig, device: Any = "cpu", fsdp: bool = False
) -> Any:
    """The model of one stage from `model_dir` on `device`, frozen for the stage (LoRA applied), its trainable
    parameters (`fsdp`: all parameters) as float32 masters, restored from the checkpoint's MASTER_FILE if it
    has one; not yet wrapped. Loaded in `scaling.dtype` and cast to float32 on the device: the host never
    holds a float32 copy."""
    from chatrex.modeling import ChatRexForConditionalGeneration

    dtype = compute_dtype(cfg)
    model = ChatRexForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(device)
    restore_masters(model, model_dir)
    model.set_trainable(stage.name, train_vision=stage.vision_trains)
    if stage.lora:
        # projectors + new token rows; the LLM body trains through LoRA
        model.set_trainable("alignment", train_vision=stage.vision_trains)
        model = apply_lora(model, cfg)
    keep_fp32_masters(model, dtype, everything=fsdp)
    return model


def train_step(model: Any, optimizer: Any, inputs: dict[str, Any], grad_clip: float, dtype: Any) -> Any:
    """One optimizer step on one batch, the forward under autocast to `dtype`; returns the detached loss."""
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel

    device_type = next(model.parameters()).device.type
    with autocast(device_type, dtype):
        loss = model(**inputs, answer_logits_only=True).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if isinstance(model, FullyShardedDataParallel):  # the norm over every rank's shard, not the local one
        model.clip_grad_norm_(grad_clip)
    else:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    return loss.detach()


def rows_of(batch: dict[str, Any]) -> list[dict[str, Any]]:
    n = len(batch["__key__"])
    return [{name: column[i] for name, column in batch.items()} for i in range(n)]


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: load (or restore), train one stage, report loss and checkpoints."""
    import ray.train
    import ray.train.torch
    import torch

    from chatrex.data import training_sample
    from chatrex.processor import ChatRexProcessor

    cfg = TrainConfig.model_validate(config["cfg"])
    stage = cfg.stages[config["stage_index"]]
    torch.set_num_threads(cfg.scaling.torch_threads)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(cfg.seed + rank)
    fsdp = stage.strategy == "fsdp" and context.get_world_size() > 1  # Ray wraps one worker in neither
    device = ray.train.torch.get_device()
    dtype = compute_dtype(cfg)
    with restored_checkpoint() as (state, restored):  # an interrupted run of this stage, or its start
        model_dir = restored or Path(config["start_dir"])
        model = load_training_model(model_dir, cfg, stage, device, fsdp)
        processor = ChatRexProcessor.from_pretrained(model_dir)
        # LoRA's adapters are merged into the saved model: its optimizer state no longer fits
        resume = not stage.lora and restored is not None and (restored / OPTIMIZER_FILE).exists()
        # under FSDP rank 0 reads the full state and scatters it (`load_moments`)
        moments = saved_optimizer_state(restored) if resume and (rank == 0 or not fsdp) else None
    if restored is not None and rank == 0:
        print(f"[{stage.name}] resumed from the checkpoint of step {state['step']}", flush=True)
    # groups before wrapping: FSDP keeps the parameter objects but flattens them to 1-D shards, which
    # `optimizer_param_groups` would take for biases (no weight decay)
    groups = model.optimizer_param_groups(cfg.weight_decay)
    model = ray.train.torch.prepare_model(
        model, parallel_strategy=stage.strategy, parallel_strategy_kwargs=fsdp_kwargs(dtype) if fsdp else None
    )
    optimizer = torch.optim.AdamW(groups, lr=stage.lr)
    if resume:
        load_moments(model, optimizer, moments, fsdp)
    del moments
    resumed_at = state["step"]  # the scheduler counts from 0 in this process
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s + resumed_at, stage))
    shard = ray.train.get_dataset_shard("train")
    model.train()
    window: list[float] = []
    started = time.time() - state["seconds"]
    while state["step"] < stage.steps:
        produced = False
        batches = shard.iter_batches(
            batch_size=cfg.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed + state["epoch"] if cfg.shuffle_buffer else None,
        )
        for batch in batches:
            samples = [
                training_sample(
                    row, processor, cfg.seed, state["epoch"], cfg.max_boxes, stage.weights, cfg.candidates
                )
                for row in rows_of(batch)
            ]
            samples = [s for s in samples if s is not None]
            if not samples:
                continue
            produced = True
            inputs = processor.collate(samples)
            inputs = {
                k: [b.to(device) for b in v] if k == "boxes" else v.to(device) for k, v in inputs.items()
            }
            loss = train_step(model, optimizer, inputs, cfg.grad_clip, dtype)
            scheduler.step()
            state["step"] += 1
            window.append(float(loss.detach()))
            done = state["step"] >= stage.steps
            if state["step"] % cfg.log_every == 0 or done:
                mean = sum(window) / len(window)
                state["losses"].append([state["step"], round(mean, 5)])
                state["seconds"] = time.time() - started
                window = []
                metrics = {
                    "step": state["step"],
                    "loss": mean,
                    "lr": scheduler.get_last_lr()[0],
                    "epoch": state["epoch"],
                }
                if rank == 0:
                    print(
                        f"[{stage.name}] step {state['step']}/{stage.steps} loss {mean:.4f} "
                        f"lr {metrics['lr']:.2e} ({state['seconds']:.0f}s)",
                        flush=True,
                    )
                if state["step"] % cfg.checkpoint_every == 0 or done:
                    weights, moments = gathered_state(model, optimizer, fsdp)  # FSDP: every rank gathers
                    report_checkpoint(
                        lambda folder, weights=weights: save_model(model, processor, folder, dtype, weights),
                        moments,
                        state,
                        metrics,
                        rank,
                    )
                    del weights, moments
                else:
                    ray.train.report(metrics)
            if done:
                break
        if not produced:
            raise RuntimeError("the training shards gave no usable sample (records without regions?)")
        state["epoch"] += 1


def save_model(
    model: Any, processor: Any, folder: Path, dtype: Any = None, weights: dict[str, Any] | None = None
) -> None:
    """A checkpoint's model: the plain ChatRex weights in `dtype` (default: as they are), the processor
    beside them, and MASTER_FILE with the float32 values of parameters that `dtype` would round.
    `weights`: the full state dict when the model's own is sharded (FSDP, `gathered_state`)."""
    import torch
    from safetensors.torch import save_file

    plain = plain_model(model)
    dtype = plain.dtype if dtype is None else dtype
    weights = plain.state_dict() if weights is None else weights
    state: dict[str, Any] = {}
    cast: dict[tuple, Any] = {}  # one copy per storage: tied weights stay one tensor
    for name, tensor in weights.items():
        if tensor.is_floating_point() and tensor.dtype != dtype:
            key = (tensor.data_ptr(), tuple(tensor.shape))
            if key not in cast:
                cast[key] = tensor.detach().to("cpu", dtype)
            tensor = cast[key]
        state[name] = tensor
    plain.save_pretrained(folder, state_dict=state)
    if plain.dtype != dtype:  # save_pretrained writes the in-memory dtype (float32 masters) into config.json
        plain.config.dtype = str(dtype).removeprefix("torch.")
        plain.config.save_pretrained(folder)
    params = [n for n, _ in plain.named_parameters()]  # tied weights once
    masters = {
        n: weights[n].detach().to("cpu").contiguous()
        for n in params
        if weights[n].dtype == torch.float32 and dtype != torch.float32
    }
    if masters:
        save_file(masters, str(folder / MASTER_FILE))
    processor.save_pretrained(folder)


# --- on the driver ---------------------------------------------------------------------------------------


def run_stage(cfg: TrainConfig, index: int, start_dir: Path, output: Path, dataset: Any) -> Path:
    """One stage as one Ray Train run; returns the folder of its final model."""
    stage = cfg.stages[index]
    name = f"{index}-{stage.name}"
    final = output / name / "final"
    if (final / "config.json").exists():
        log.info("stage %s already finished: %s", name, final)
        return final
    return fit_to_folder(
        train_loop,
        {"cfg": cfg.model_dump(mode="json"), "stage_index": index, "start_dir": str(start_dir)},
        dataset,
        name=name,
        storage=output / "runs",
        final=final,
        num_workers=cfg.scaling.num_workers,
        cpus_per_worker=cfg.scaling.cpus_per_worker,
        use_gpu=cfg.scaling.use_gpu,
        keep_checkpoints=cfg.keep_checkpoints,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument(
        "--shards", required=True, action="append", help="shard folder, .tar files/glob, or URIs"
    )
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = load_train_config(args.config, args.overrides)
        paths = shard_paths(args.shards)
    except ConfigError as exc:
        print(f"train_chatrex: error: {exc}", file=sys.stderr)
        return 2
    import ray

    from chatrex.build import initial_model_dir
    from engine.runtime import init_ray

    output = args.output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    started_local = init_ray(RayConfig(show_progress=False), namespace="chatrex-train", train=True)
    try:
        dataset = ray.data.read_webdataset(paths, decoder=None)
        start_dir = initial_model_dir(cfg.model, cfg.parts, output)
        summary = {"config": cfg.model_dump(mode="json"), "shards": paths, "stages": []}
        for index, stage in enumerate(cfg.stages):
            start = time.time()
            start_dir = run_stage(cfg, index, start_dir, output, dataset)
            state = json.loads((start_dir / STATE_FILE).read_text())
            losses = state["losses"]
            summary["stages"].append(
                {
                    "name": stage.name,
                    "steps": state["step"],
                    "seconds": round(state["seconds"], 1),
                    "first_loss": losses[0][1],
                    "last_loss": losses[-1][1],
                    "losses": losses,
                }
            )
            print(
                f"stage {index}-{stage.name}: loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f} "
                f"in {state['step']} steps ({time.time() - start:.0f}s)",
                flush=True,
            )
        model_dir = output / "model"
        shutil.rmtree(model_dir, ignore_errors=True)
        # the user's model: weights in scaling.dtype, without the optimizer and float32 masters of a resume
        shutil.copytree(start_dir, model_dir, ignore=shutil.ignore_patterns(OPTIMIZER_FILE, MASTER_FILE))
        (output / "train_summary.json").write_text(json.dumps(summary, indent=2))
        print(f"trained model: {model_dir}", flush=True)
    except ConfigError as exc:
        print(f"train_chatrex: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if started_local:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
