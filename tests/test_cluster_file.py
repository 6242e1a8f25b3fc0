"""ray_cluster.yaml tells the truth about the real config: it pre-fetches every model the config names and
starts with the preflight."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _model_names(node: object) -> set[str]:
    """Every `model.name` in a config tree."""
    found: set[str] = set()
    if isinstance(node, dict):
        model = node.get("model")
        if isinstance(model, dict) and isinstance(model.get("name"), str):
            found.add(model["name"])
        for value in node.values():
            found |= _model_names(value)
    return found


def test_every_model_of_the_real_config_is_prefetched_and_the_preflight_comes_first() -> None:
    from pipelines.rexverse2m import load_job_config

    cfg = load_job_config(ROOT / "configs" / "rexverse2m.yaml")
    enabled = {
        name: section
        for name, section in cfg.stages.model_dump(mode="json").items()
        if section.get("enabled", True)
    }
    names = _model_names(enabled)
    assert len(names) >= 6, names
    text = (ROOT / "ray_cluster.yaml").read_text()
    setup = " ".join(yaml.safe_load(text)["setup_commands"])
    missing = sorted(name for name in names if f"'{name}'" not in setup)
    assert not missing, f"ray_cluster.yaml does not pre-fetch {missing}"
    comments = text.split("cluster_name:")[0]
    assert comments.index("--preflight") < comments.index("--output")
    assert "written by the job's driver" not in text  # engine v1's layout
