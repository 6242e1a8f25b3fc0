"""ChatRex training's precision policy: float32 master weights, bfloat16 compute (autocast, FSDP's
MixedPrecision), checkpoints in the configured dtype that resume the float32 masters exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402

from chatrex.processor import ChatRexProcessor  # noqa: E402
from chatrex.train_config import TrainConfig  # noqa: E402
from pipelines.train_chatrex import (  # noqa: E402
    MASTER_FILE,
    compute_dtype,
    fsdp_kwargs,
    gathered_state,
    load_moments,
    load_training_model,
    save_model,
    train_step,
)
from scaffold.tiny_chatrex import ensure_tiny_chatrex  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return Path(ensure_tiny_chatrex(tmp_path_factory.mktemp("rexverse-cache") / "tiny-models"))


@pytest.fixture(scope="module")
def batch(folder: Path) -> dict:
    return make_batch(folder)


def make_batch(folder: Path) -> dict:
    """Three random images with two boxes each and a grounding answer: one fixed training batch."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    answer = "<ground>it</ground><objects><obj1></objects>"
    return ChatRexProcessor.from_pretrained(folder)(
        images, [[[0, 0, 30, 30], [10, 10, 60, 60]]] * 3, ["find it"] * 3, [answer] * 3
    )


def config(folder: Path, dtype: str, lr: float, grad_clip: float = 1.0, **stage) -> TrainConfig:
    stage = {"name": "perception", "steps": 10, "lr": lr, **stage}
    return TrainConfig.model_validate(
        {"model": str(folder), "stages": [stage], "scaling": {"dtype": dtype}, "grad_clip": grad_clip}
    )


def llm_matrices(model) -> dict[str, torch.Tensor]:
    """The LLM's weight matrices in float32, the input embedding left out (only the batch's rows move)."""
    embedding = model.get_input_embeddings().weight
    return {
        n: p.detach().float().clone()
        for n, p in model.language_model.named_parameters()
        if p.ndim >= 2 and p is not embedding
    }


def train(model, cfg: TrainConfig, batch: dict, steps: int, optimizer=None):
    optimizer = optimizer or torch.optim.AdamW(model.optimizer_param_groups(), lr=cfg.stages[0].lr)
    for _ in range(steps):
        train_step(model, optimizer, batch, cfg.grad_clip, compute_dtype(cfg))
    return optimizer


def first_mlp_projection(model) -> torch.nn.Module:
    return next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp.down_proj"))


def compute_dtypes(model) -> list[torch.dtype]:
    """Records the output dtype of the LLM's first MLP projection in each forward."""
    seen: list[torch.dtype] = []
    layer = first_mlp_projection(model)
    layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    return seen


def update_error(start_a, end_a, start_b, end_b) -> float:
    """||dW_a - dW_b|| / ||dW_b|| over the named tensors."""
    num = sum(float(((end_a[n] - start_a[n]) - (end_b[n] - start_b[n])).square().sum()) for n in start_b)
    den = sum(float((end_b[n] - start_b[n]).square().sum()) for n in start_b)
    return (num / den) ** 0.5


def fraction_changed(start, end) -> float:
    moved = sum(int((start[n] != end[n]).sum()) for n in start)
    return moved / sum(t.numel() for t in start.values())


def test_a_bf16_step_moves_the_llm_as_an_fp32_step_does(folder, batch):
    """10 AdamW steps at lr 2e-5 on weights of std 0.02: bf16 weights stepped directly keep ~half of them
    unchanged (the update rounds away); float32 masters with bf16 compute move all of them."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = config(folder, dtype, lr=2e-5)
        torch.manual_seed(0)
        model = load_training_model(folder, cfg, cfg.stages[0]).train()
        seen = compute_dtypes(model)
        start = llm_matrices(model)
        train(model, cfg, batch, steps=10)
        runs[dtype] = (start, llm_matrices(model), seen, model)
    fp32_start, fp32_end, fp32_seen, _ = runs["float32"]
    bf16_start, bf16_end, bf16_seen, bf16_model = runs["bfloat16"]
    assert fraction_changed(fp32_start, fp32_end) == 1.0
    assert fraction_changed(bf16_start, bf16_end) > 0.99
    assert update_error(bf16_start, bf16_end, fp32_start, fp32_end) < 0.15  # bf16 rounding of the compute
    assert set(fp32_seen) == {torch.float32} and set(bf16_seen) == {torch.bfloat16}  # bf16 compute
    assert {p.dtype for p in bf16_model.parameters() if p.requires_grad} == {torch.float32}


def test_lora_and_alignment_keep_frozen_weights_in_bf16_and_train_fp32_masters(folder, batch):
    lora = config(folder, "bfloat16", lr=1e-3, lora=True)
    model = load_training_model(folder, lora, lora.stages[0]).train()
    adapters = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert adapters and {p.dtype for p in adapters.values()} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if ".base_layer." in n} == {torch.bfloat16}
    lora_b = {n: p.detach().clone() for n, p in adapters.items() if "lora_B" in n}
    train(model, lora, batch, steps=2)
    assert all(not torch.equal(lora_b[n], adapters[n]) for n in lora_b)

    align = TrainConfig.model_validate(
        {"model": str(folder), "stages": [{"name": "alignment", "steps": 3, "lr": 1e-3}]}
        | {"scaling": {"dtype": "bfloat16"}}
    )
    model = load_training_model(folder, align, align.stages[0]).train()
    embed = model.get_input_embeddings().weight
    start, end = model.config.new_token_start_id, model.config.new_token_end_id
    assert embed.dtype == torch.float32 and model.vision_projector.linear_1.weight.dtype == torch.float32
    assert first_mlp_projection(model).weight.dtype == torch.bfloat16  # frozen: kept in bf16
    before = embed.detach().clone()
    train(model, align, batch, steps=3)
    assert torch.equal(embed[:start], before[:start])  # the row hooks still hold old rows still
    assert not torch.equal(embed[start:end], before[start:end])


def test_checkpoints_are_bf16_and_resume_the_fp32_masters_exactly(folder, batch, tmp_path):
    cfg = config(folder, "bfloat16", lr=2e-5)
    stage = cfg.stages[0]
    model = load_training_model(folder, cfg, stage).train()
    optimizer = train(model, cfg, batch, steps=2)
    checkpoint = tmp_path / "checkpoint"
    save_model(model, ChatRexProcessor.from_pretrained(folder), checkpoint, compute_dtype(cfg))
    torch.save(optimizer.state_dict(), checkpoint / "optimizer.pt")

    # the model users load is bfloat16 throughout, and says so
    assert json.loads((checkpoint / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
    with safe_open(str(checkpoint / MASTER_FILE), "pt") as masters:
        params = dict(model.named_parameters())
        assert set(masters.keys()) == {n for n, p in params.items() if p.requires_grad}
        assert all(torch.equal(masters.get_tensor(n), params[n]) for n in masters.keys())

    train(model, cfg, batch, steps=2, optimizer=optimizer)  # the run that was never interrupted
    resumed = load_training_model(checkpoint, cfg, stage).train()
    moments = torch.optim.AdamW(resumed.optimizer_param_groups(), lr=stage.lr)
    moments.load_state_dict(torch.load(checkpoint / "optimizer.pt"))
    assert all(s["exp_avg"].dtype == torch.float32 for s in moments.state.values())
    train(resumed, cfg, batch, steps=2, optimizer=moments)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_fsdp_keeps_fp32_sharded_masters_and_computes_in_bf16(folder, batch, tmp_path):
    """FSDP on one CPU rank (gloo) with the pipeline's MixedPrecision: the same update as a plain fp32 run."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    fp32 = config(folder, "float32", lr=2e-5)
    plain = load_training_model(folder, fp32, fp32.stages[0]).train()
    fp32_start = llm_matrices(plain)
    train(plain, fp32, batch, steps=3)
    fp32_end = llm_matrices(plain)

    cfg = config(folder, "bfloat16", lr=2e-5)
    model = load_training_model(folder, cfg, cfg.stages[0], fsdp=True).train()
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # one dtype per flat parameter
    start = llm_matrices(model)
    seen = compute_dtypes(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = FullyShardedDataParallel(
            model, device_id=torch.device("cpu"), **fsdp_kwargs(torch.bfloat16)
        )
        assert {p.dtype for p in wrapped.parameters()} == {torch.float32}  # the sharded masters
        optimizer = torch.optim.AdamW(wrapped.module.optimizer_param_groups(), lr=2e-5)
        for _ in range(3):
            train_step(wrapped, optimizer, batch, cfg.grad_clip, torch.bfloat16)
        end = llm_matrices(wrapped.module)
    finally:
        dist.destroy_process_group()
    assert set(seen) == {torch.bfloat16}
    assert fraction_changed(start, end) > 0.99
    assert update_error(start, end, fp32_start, fp32_end) < 0.15


CLIP = 0.1


def _fsdp_rank(rank: int, world: int, folder: Path, work: Path) -> None:
    """One of two CPU ranks: train, checkpoint, train on; then resume from the checkpoint and train the
    same steps again. Rank 0 saves the two final full states for the test to compare."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{work / 'pg'}", rank=rank, world_size=world)
    cfg = config(folder, "bfloat16", lr=2e-5, grad_clip=CLIP)  # the gradient's norm is ~3: always clipped
    stage, batch = cfg.stages[0], make_batch(folder)

    def wrapped(model_dir: Path):  # as train_loop does it
        model = load_training_model(model_dir, cfg, stage, fsdp=True).train()
        groups = model.optimizer_param_groups(cfg.weight_decay)
        model = FullyShardedDataParallel(model, device_id=torch.device("cpu"), **fsdp_kwargs(torch.bfloat16))
        return model, torch.optim.AdamW(groups, lr=stage.lr)

    def steps(model, optimizer, n: int) -> None:
        for _ in range(n):
            train_step(model, optimizer, batch, cfg.grad_clip, torch.bfloat16)

    checkpoint = work / "checkpoint"
    model, optimizer = wrapped(folder)
    # the model alone: gathering an optimizer without state first initialises it with a zero-gradient step
    start = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    steps(model, optimizer, 2)
    local = sum(float(p.grad.square().sum()) for p in model.parameters() if p.grad is not None)
    clipped = torch.tensor(local)
    dist.all_reduce(clipped)  # the norm of the clipped gradient over both shards
    weights, moments = gathered_state(model, optimizer, fsdp=True)  # every rank takes part
    if rank == 0:
        save_model(model, ChatRexProcessor.from_pretrained(folder), checkpoint, torch.bfloat16, weights)
        torch.save(moments.state_dict(), checkpoint / "optimizer.pt")
    dist.barrier()
    steps(model, optimizer, 2)
    uninterrupted = gathered_state(model, optimizer, fsdp=True)[0]

    model, optimizer = wrapped(checkpoint)
    load_moments(model, optimizer, torch.load(checkpoint / "optimizer.pt") if rank == 0 else None, True)
    steps(model, optimizer, 2)
    resumed = gathered_state(model, optimizer, fsdp=True)[0]
    if rank == 0:
        states = {"start": start, "checkpoint": weights, "uninterrupted": uninterrupted, "resumed": resumed}
        states["clipped_norm"] = float(clipped.sqrt())
        torch.save(states, work / "states.pt")
    dist.destroy_process_group()


def test_fsdp_checkpoints_are_whole_bf16_models_and_resume_exactly(folder, tmp_path):
    """Two FSDP ranks (gloo, CPU), each holding half of every flat parameter: a checkpoint is gathered into
    the whole model in bf16 (plus fp32 masters), and a run resumed from it repeats the uninterrupted run."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    mp.spawn(_fsdp_rank, args=(2, folder, tmp_path), nprocs=2, join=True)
    full = {n: p.shape for n, p in load_file(str(next(folder.glob("*.safetensors")))).items()}
    saved = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    assert {n: t.shape for n, t in saved.items()} == full  # whole tensors, not one rank's shard
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    masters = load_file(str(tmp_path / "checkpoint" / MASTER_FILE))
    assert {t.dtype for t in masters.values()} == {torch.float32} and set(masters) <= set(full)
    states = torch.load(tmp_path / "states.pt")
    # two shards step as one model: the update matches a single process's
    assert states["clipped_norm"] == pytest.approx(CLIP, rel=1e-3)  # clipped by the norm over both shards
    cfg = config(folder, "bfloat16", lr=2e-5, grad_clip=CLIP)
    single = load_training_model(folder, cfg, cfg.stages[0]).train()
    start = {n: p.detach().clone() for n, p in single.named_parameters()}
    assert all(torch.equal(start[n], states["start"][n]) for n in start)
    train(single, cfg, make_batch(folder), steps=2)
    end = {n: p.detach().clone() for n, p in single.named_parameters()}
    assert update_error({n: states["start"][n] for n in start}, states["checkpoint"], start, end) < 0.15
    assert states["uninterrupted"].keys() == states["resumed"].keys()
    for name, value in states["uninterrupted"].items():
        assert torch.equal(value, states["resumed"][name]), name


BF16_RUN = """
model: "tiny:chatrex"
stages:
  - {name: perception, steps: 8, lr: 2.0e-3}
batch_size: 4
shuffle_buffer: 8
log_every: 2
checkpoint_every: 4
scaling: {num_workers: 1, use_gpu: false, cpus_per_worker: 1, torch_threads: 1, dtype: bfloat16}
"""


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_a_bf16_training_run_resumes_and_leaves_a_bf16_model(gt_shards, engine_env, tmp_path):
    """Through Ray Train: killed after a checkpoint, rerun, it resumes from the checkpoint's fp32 masters;
    the stage's final folder keeps them (the next stage starts from it); the user's model is bf16 only."""
    import subprocess
    import sys

    from conftest import ROOT, kill_when

    config_file = tmp_path / "bf16.yaml"
    config_file.write_text(BF16_RUN)
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "pipelines" / "train_chatrex.py"), "--config", str(config_file)]
    command += ["--shards", str(gt_shards), "--output", str(out)]
    snapshot = out / "runs" / "0-perception" / "checkpoint_manager_snapshot.json"
    kill_when(command, engine_env, snapshot.exists, "a perception-stage checkpoint")
    done = subprocess.run(command, env=engine_env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "resumed from the checkpoint of step 4" in done.stdout + done.stderr
    with safe_open(str(out / "0-perception" / "final" / MASTER_FILE), "pt") as masters:
        assert {masters.get_tensor(k).dtype for k in masters.keys()} == {torch.float32}
    model = out / "model"
    assert not (model / MASTER_FILE).exists() and not (model / "optimizer.pt").exists()
    assert json.loads((model / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(model / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
