"""Does a bfloat16-configured ChatRex training step move the LLM's weights as a float32 one does?

    python bench/bf16_updates.py [--steps 10] [--lr 2e-5]

Loads the tiny random ChatRex (LLM weights of std 0.02) twice through the training pipeline's own helpers
(`pipelines.train_chatrex.load_training_model` / `train_step`, perception stage: everything trains), once with
`scaling.dtype: float32` and once with `scaling.dtype: bfloat16`, and runs the same N AdamW steps at a
constant learning rate on the same fixed batch of random images. Figures, over the LLM's weight matrices
(the input embedding left out: only the rows of the batch's tokens get a gradient, in either precision):

- `fp32_changed`, `bf16_changed`: fraction of weight elements whose value differs from the start, in the
  weights the run trains (what the optimizer steps);
- `bf16_saved_changed`: the same for the bfloat16 model a checkpoint would hold (`save_model`'s dtype);
- `update_rel_err`: ||dW_bf16 - dW_fp32|| / ||dW_fp32||, each run's weights minus its own start
  (1.0 = the bf16 run's update is as far from the fp32 one as no update at all).

The baseline is the fp32 run (the update a bf16 run should reproduce); the figures print last on one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fixed_batch(processor, n: int = 4) -> dict:
    """`n` random images with two boxes each and a grounding answer: one deterministic training batch."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]
    boxes = [[[0, 0, 30, 30], [10, 10, 60, 60]]] * n
    answer = "<ground>it</ground><objects><obj1></objects>"
    return processor(images, boxes, ["find it"] * n, [answer] * n)


def run(folder: Path, dtype: str, steps: int, lr: float) -> tuple[dict, dict]:
    """(start, end) LLM weights in float32 after `steps` steps with the pipeline configured for `dtype`."""
    import torch

    from chatrex.processor import ChatRexProcessor
    from chatrex.train_config import TrainConfig
    from pipelines.train_chatrex import compute_dtype, load_training_model, train_step

    cfg = TrainConfig.model_validate(
        {
            "model": str(folder),
            "stages": [{"name": "perception", "steps": steps, "lr": lr}],
            "scaling": {"dtype": dtype},
        }
    )
    torch.manual_seed(0)
    model = load_training_model(folder, cfg, cfg.stages[0]).train()
    batch = fixed_batch(ChatRexProcessor.from_pretrained(folder))
    llm = model.language_model

    embedding = llm.get_input_embeddings().weight  # only the batch's token rows get a gradient: left out

    def weights() -> dict:
        return {
            n: p.detach().clone() for n, p in llm.named_parameters() if p.ndim >= 2 and p is not embedding
        }

    start = weights()
    optimizer = torch.optim.AdamW(model.optimizer_param_groups(cfg.weight_decay), lr=lr)
    for _ in range(steps):
        train_step(model, optimizer, batch, cfg.grad_clip, compute_dtype(cfg))
    return start, weights()


def changed(start: dict, end: dict, dtype=None) -> float:
    """Fraction of elements that differ (after casting both to `dtype`, when given)."""
    total = moved = 0
    for name, before in start.items():
        after = end[name]
        if dtype is not None:
            before, after = before.to(dtype), after.to(dtype)
        moved += int((before != after).sum())
        total += before.numel()
    return moved / total


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=2e-5)
    args = parser.parse_args()
    import torch

    from scaffold.tiny_chatrex import ensure_tiny_chatrex

    torch.set_num_threads(1)
    folder = Path(ensure_tiny_chatrex())
    fp32_start, fp32_end = run(folder, "float32", args.steps, args.lr)
    bf16_start, bf16_end = run(folder, "bfloat16", args.steps, args.lr)
    num = den = 0.0
    for name in fp32_start:
        d32 = fp32_end[name].float() - fp32_start[name].float()
        d16 = bf16_end[name].float() - bf16_start[name].float()
        num += float(((d16 - d32) ** 2).sum())
        den += float((d32**2).sum())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in bf16_end.values()})
    print(
        f"steps={args.steps} lr={args.lr:g} bf16_trained_dtype={'+'.join(dtypes)} "
        f"fp32_changed={changed(fp32_start, fp32_end):.3f} bf16_changed={changed(bf16_start, bf16_end):.3f} "
        f"bf16_saved_changed={changed(bf16_start, bf16_end, torch.bfloat16):.3f} "
        f"update_rel_err={(num / den) ** 0.5:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
