"""Config loading: extends, overrides (dicts and lists), unknown keys, readable errors, content hash."""

import pytest

from engine.config import ConfigError, apply_overrides
from engine.config import load_config as load_any
from pipelines.rexverse2m import JobConfig


def load_config(path, overrides=None):
    return load_any(path, JobConfig, overrides)


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
    with pytest.raises(ConfigError, match="stages.segment: .*enabled but names no model"):
        load_config(FIXTURE, ["stages.segment.model=null", "stages.segment.enabled=true"])


def test_each_stage_owns_its_config_and_the_engine_imports_no_stage():
    """The job file composes: engine modules import no stage and no scaffolding (in a fresh process)."""
    import subprocess
    import sys

    code = (
        "import sys, engine.pipeline, engine.sink, engine.config, engine.stage, engine.models;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('stages', 'scaffold', 'chatrex'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    from stages.grounding import Grounding, GroundingConfig

    assert Grounding.config_class is GroundingConfig
    assert JobConfig.model_fields["stages"].annotation.model_fields["grounding"].annotation is GroundingConfig


def test_the_jobs_driver_imports_no_model_library():
    """The driver imports every stage module (for its config) but runs no model: torch and transformers
    would cost it ~0.45 GB of memory on every run; only the stage actors import them."""
    import subprocess
    import sys

    code = (
        "import sys, pipelines.rexverse2m as job;"
        "job.load_job_config('configs/fixture.yaml', []);"
        "bad = sorted(m for m in ('torch', 'torchvision', 'transformers', 'spacy') if m in sys.modules);"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_fused_groups_must_be_consecutive_known_stages_and_take_the_largest_resources():
    from engine.pipeline import group_resources, stage_groups
    from pipelines.rexverse2m import STAGES

    cfg = load_config(FIXTURE, ["ray.fuse=[[caption, phrases], [refine, filter]]"])
    groups = [[stage.name for stage, _ in group] for group in stage_groups(STAGES, cfg)]
    assert groups[:4] == [["decode"], ["collect"], ["caption", "phrases"], ["grounding"]]
    assert ["refine", "filter"] in groups and sum(len(g) for g in groups) == len(STAGES)
    real = load_config("configs/rexverse2m.yaml")
    first = stage_groups(STAGES, real)[1]
    assert [s.name for s, _ in first] == ["caption", "phrases", "grounding", "box_rules", "region_caption"]
    assert group_resources(first).num_gpus == 1 and group_resources(first).num_cpus == 4
    with pytest.raises(ConfigError, match="consecutive"):
        load_config(FIXTURE, ["ray.fuse=[[caption, grounding]]"])
    with pytest.raises(ConfigError, match="unknown stages"):
        load_config(FIXTURE, ["ray.fuse=[[caption, captions]]"])
