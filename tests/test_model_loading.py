"""engine.models: weights go straight to their device (no full host copy first), pixels follow the dtype."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine import models
from engine.config import ModelRef


class RecordingAutoClass:
    """Stands in for a transformers auto class; remembers how it was asked to load."""

    calls: list[dict] = []

    @classmethod
    def from_pretrained(cls, name: str, **kwargs):
        cls.calls.append({"name": name, **kwargs})
        return torch.nn.Linear(2, 2).to(kwargs["dtype"])


def test_models_load_straight_onto_their_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_LOADED", {})
    model, device = models.load_model(RecordingAutoClass, ModelRef(name="some/model", dtype="bfloat16"))
    call = RecordingAutoClass.calls[-1]
    assert call["device_map"] == device == torch.device("cpu")  # CPU here; a GPU actor gets its cuda device
    assert call["dtype"] == torch.bfloat16 and model.weight.dtype == torch.bfloat16
    again, _ = models.load_model(RecordingAutoClass, ModelRef(name="some/model", dtype="bfloat16"))
    assert again is model and len(RecordingAutoClass.calls) == 1  # once per process


def test_a_real_tiny_model_loads_in_bfloat16_on_its_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(models, "_LOADED", {})
    model, device = models.load_model(AutoModelForCausalLM, ModelRef(name="tiny:qwen2-lm", dtype="bfloat16"))
    assert model.dtype == torch.bfloat16 and model.device == device and not model.training


def test_pixels_take_the_model_dtype_and_nothing_else_does() -> None:
    model = SimpleNamespace(dtype=torch.bfloat16)  # transformers models expose their dtype
    inputs = {
        "pixel_values": torch.rand(1, 3, 4, 4),
        "pixel_mask": torch.ones(1, 4, 4, dtype=torch.long),
        "input_ids": torch.tensor([[101, 7, 102]]),
        "input_boxes": torch.tensor([[[10.25, 20.5, 1000.75, 900.0]]]),
        "text": "kept as is",
    }
    moved = models.model_inputs(inputs, model, torch.device("cpu"))
    assert moved["pixel_values"].dtype == torch.bfloat16
    assert moved["pixel_mask"].dtype == torch.long and moved["input_ids"].dtype == torch.long
    assert torch.equal(moved["input_boxes"], inputs["input_boxes"])  # coordinates stay float32
    assert moved["text"] == "kept as is"
