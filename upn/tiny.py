"""`tiny:upn`: a small random UPN for tests and the fixture config, built locally and deterministically.

Self-contained (the tiny-model registry only calls `build_tiny_upn(folder)`), so it moves with the
registry. Sizes: ConvNeXt 16-32-64-128 (strides 8-32 used), 32-wide encoder/decoder with one layer each,
4 feature levels, 50 queries, 128 px input: about 0.3 M parameters. Weights are random: boxes and scores
mean nothing, only shapes and code paths do.
"""

from __future__ import annotations

from pathlib import Path

TINY_UPN_KWARGS = {
    "backbone_config": {
        "model_type": "convnext",
        "hidden_sizes": [16, 32, 64, 128],
        "depths": [1, 1, 1, 1],
        "out_features": ["stage2", "stage3", "stage4"],
    },
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 2,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "num_feature_levels": 4,
    "num_queries": 50,
    "image_size": 128,
}


def build_tiny_upn(out: Path, seed: int = 0) -> None:
    """Save a random tiny UPN into `out` (seeded without disturbing the caller's RNG)."""
    import torch

    from upn import UPNConfig, UPNModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UPNModel(UPNConfig(**TINY_UPN_KWARGS)).eval()
    model.save_pretrained(out)
