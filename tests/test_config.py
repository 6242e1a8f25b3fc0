"""Config loading: extends, overrides (dicts and lists), unknown keys, readable errors, content hash."""

import pytest

from engine.config import ConfigError, apply_overrides, load_config

FIXTURE = "configs/fixture.yaml"


def test_fixture_extends_the_real_config_and_overrides_apply():
    cfg = load_config(FIXTURE, ["stages.grounding.nms_iou=0.6", "sink.shard_size=7"])
    assert cfg.stages.grounding.nms_iou == 0.6 and cfg.sink.shard_size == 7
    assert cfg.stages.caption.model.name == "tiny:qwen2-vl"
    real = load_config("configs/rexverse2m.yaml")
    assert cfg.stages.refine.verify_prompt == real.stages.refine.verify_prompt  # prompts come from the base


def test_unknown_keys_and_bad_values_are_errors_that_name_the_key():
    with pytest.raises(ConfigError, match="stages.grounding.box_treshold"):
        load_config(FIXTURE, ["stages.grounding.box_treshold=0.3"])
    with pytest.raises(ConfigError, match="stages.grounding.box_threshold"):
        load_config(FIXTURE, ["stages.grounding.box_threshold=2"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(FIXTURE, ["oops"])


def test_list_indices_in_overrides():
    data = apply_overrides({"stages": [{"steps": 1}, {"steps": 2}]}, ["stages.1.steps=40"])
    assert data["stages"][1]["steps"] == 40
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides({"stages": [{}]}, ["stages.3.steps=1"])


def test_content_hash_ignores_resources_but_not_thresholds():
    base = load_config(FIXTURE).content_hash()
    assert load_config(FIXTURE, ["stages.caption.resources.batch_size=3"]).content_hash() == base
    assert load_config(FIXTURE, ["stages.filter.score_threshold=0.1"]).content_hash() != base


def test_enabled_stage_needs_a_model():
    with pytest.raises(ConfigError, match="stages.segment is enabled but names no model"):
        load_config(FIXTURE, ["stages.segment.model=null", "stages.segment.enabled=true"])
