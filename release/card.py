"""The dataset card: README.md with the YAML front matter the Hugging Face hub reads, then prose.

Everything in it comes from the release manifest and stats (models, prompts and thresholds from the input
manifests' configs), so the card can never disagree with the data it describes.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import yaml

from release.tiers import TIERS

TASK_CATEGORIES = [
    "object-detection",
    "image-to-text",
    "visual-question-answering",
    "zero-shot-object-detection",
]
TAGS = ["grounding", "referring-expression", "region-captioning", "dense-captioning", "rexverse", "chatrex"]
MAX_PROMPT_CHARS = 400


def hf_features(schema: pa.Schema) -> list[dict[str, Any]]:
    """The hub's YAML form of a parquet schema (what `datasets.Features._to_yaml_list` writes)."""
    return [{"name": f.name, **_feature(f.type)} for f in schema]


def _feature(t: pa.DataType) -> dict[str, Any]:
    if pa.types.is_struct(t):
        return {
            "struct": [{"name": t.field(i).name, **_feature(t.field(i).type)} for i in range(t.num_fields)]
        }
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = t.value_type
        body: dict[str, Any]
        if pa.types.is_struct(inner):
            body = {
                "list": [
                    {"name": inner.field(i).name, **_feature(inner.field(i).type)}
                    for i in range(inner.num_fields)
                ]
            }
        else:
            sub = _feature(inner)
            body = {"list": sub["dtype"]} if set(sub) == {"dtype"} else {"list": sub}
        if pa.types.is_fixed_size_list(t):
            body["length"] = t.list_size
        return body
    names = {
        pa.string(): "string",
        pa.large_string(): "large_string",
        pa.bool_(): "bool",
        pa.float16(): "float16",
        pa.float32(): "float32",
        pa.float64(): "float64",
    }
    return {"dtype": names.get(t, str(t))}


def size_category(n: int) -> str:
    for limit, label in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if n < limit:
            return label
    return "1M<n<10M" if n < 10_000_000 else "n>10M"


def front_matter(manifest: dict[str, Any], index_schema: pa.Schema, license_id: str) -> dict[str, Any]:
    splits = manifest["counts"]["splits"]
    return {
        "pretty_name": f"{manifest['name']} {manifest['version']}",
        "license": license_id,
        "task_categories": TASK_CATEGORIES,
        "tags": TAGS,
        "size_categories": [size_category(manifest["counts"]["records"])],
        # The hub uses one builder per repository; the parquet index is the table with a fixed schema (the
        # record JSON has nested, nullable fields whose inferred types vary), so it is the declared config.
        # The shards load with the webdataset builder and explicit data_files (see "How to load").
        "configs": [
            {
                "config_name": "default",
                "default": True,
                "data_files": [{"split": s, "path": f"index/{s}.parquet"} for s in splits],
            }
        ],
        "dataset_info": {"config_name": "default", "features": hf_features(index_schema)},
    }


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def _short(value: Any) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= MAX_PROMPT_CHARS else text[: MAX_PROMPT_CHARS - 1] + "…"


def how_made(config: dict[str, Any]) -> list[str]:
    """Per stage: model, prompts and thresholds, read generically from an engine config."""
    lines = []
    stages = dict(config.get("stages", {}))
    if "decode" in config:
        stages = {"decode": config["decode"], **stages}
    for stage, settings in stages.items():
        flat = {k: v for k, v in _flat(settings).items() if not k.startswith("resources")}
        if flat.get("enabled") is False:
            lines.append(f"- **{stage}**: off")
            continue
        model = flat.get("model.name")
        rules = {
            k: v
            for k, v in flat.items()
            if "prompt" not in k and not k.startswith("model") and not isinstance(v, str | list)
        }
        parts = [f"- **{stage}**" + (f" — model `{model}`" if model else "")]
        if rules:
            parts.append("  - settings: " + ", ".join(f"`{k}={v}`" for k, v in sorted(rules.items())))
        for key, value in sorted(flat.items()):
            if "prompt" in key and value:
                parts.append(f"  - {key}: “{_short(value)}”")
        lines.extend(parts)
    return lines


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
    ]


def render(manifest: dict[str, Any], stats: dict[str, Any], index_schema: pa.Schema, license_id: str) -> str:
    counts = manifest["counts"]
    name, version = manifest["name"], manifest["version"]
    split_note = ", ".join(f"{s}: {n}" for s, n in counts["splits"].items())
    lines = [
        "---",
        yaml.safe_dump(
            front_matter(manifest, index_schema, license_id), sort_keys=False, allow_unicode=True
        ).rstrip(),
        "---",
        "",
        f"# {name} {version}",
        "",
        "Grounded, multi-granularity region annotations built by the Rexverse "
        "data engine (a reproduction of the "
        f"Rexverse-2M engine of ChatRex, arXiv 2411.18363): **{counts['records']} images** ({split_note}), "
        f"**{counts['regions']} regions**, each with a category and, where it "
        "passed that tier's checks, a short "
        "phrase, a one-sentence description and a referring expression; a "
        "caption per image whose noun phrases "
        "point at the regions; class-agnostic proposal boxes; SAM 2 masks where segmentation ran.",
        "",
        "## Files",
        "",
        *_table(
            ["path", "content"],
            [
                [
                    "`shards/" + ("{split}/" if manifest["build"]["split"] else "") + "NNNNNN.tar`",
                    f"webdataset, `{{key}}.jpg` + `{{key}}.json` (the record, docs/record.md), "
                    f"{manifest['build']['shard_size']} records per shard, sorted by key",
                ],
                [
                    "`index/{split}.parquet`",
                    "one row per record (the engine's index schema + `split`, `shard`)",
                ],
                [
                    "`rejects.parquet`",
                    "every input image that produced no record: `uri, key, stage, reason, input`",
                ],
                ["`duplicates.parquet`", "keys found in several inputs: `key, kept_from, dropped_from`"],
                [
                    "`manifest.json`",
                    "inputs, config hashes and configs, code versions, counts per stage and tier",
                ],
                ["`stats.json`, `plots/*.png`", "statistics and their figures"],
                ["`gallery/index.html`", "browsable sample with boxes, masks and texts (open in a browser)"],
                [
                    "`exports/coco.json`, `exports/coco_captions.json`",
                    "COCO instances (bbox, RLE masks) and captions",
                ],
                [
                    "`exports/odvg.jsonl`, `exports/odvg_detection.jsonl`, `exports/odvg_label_map.json`",
                    "Grounding DINO ODVG: grounding (caption + phrase boxes) and detection (category boxes)",
                ],
                [
                    "`exports/llava.json`",
                    "LLaVA-style conversations with ChatRex prompts, `<objN>` answers and the input boxes",
                ],
                ["`SHA256SUMS`", "checksums of every other file: `sha256sum -c SHA256SUMS`"],
            ],
        ),
        "",
        "## Counts",
        "",
        *_table(
            ["tier", "regions", "share of regions", "images with it"],
            [
                [
                    t,
                    stats["tiers"][t]["regions"],
                    f"{stats['tiers'][t]['fraction_of_regions']:.1%}",
                    stats["tiers"][t]["images"],
                ]
                for t in (*TIERS, "mask")
            ],
        ),
        "",
        f"Regions per image: mean {stats['regions_per_image']['mean']}; distinct categories: "
        f"{stats['categories']['distinct']}; rejected inputs: "
        f"{counts['rejects']}; keys present in more than one "
        f"input (kept once, first input wins): {counts['duplicates']}.",
        "",
        "Rejects by stage and reason:",
        "",
        *_table(
            ["stage", "reason", "images"],
            [[s, r, n] for s, reasons in stats["rejects"].items() for r, n in reasons.items()]
            or [["—", "—", 0]],
        ),
        "",
        "Per-stage counts over all inputs (images in/out; units are phrases or regions):",
        "",
        *_table(
            ["stage", "images in", "images out", "units in", "units out", "dropped (by reason)"],
            [
                [
                    s,
                    v.get("images_in", 0),
                    v.get("images_out", 0),
                    v.get("units_in", 0),
                    v.get("units_out", 0),
                    ", ".join(f"{k}={n}" for k, n in v.get("dropped", {}).items()) or "—",
                ]
                for s, v in manifest["stages"].items()
            ],
        ),
        "",
        "Figures: " + ", ".join(f"[{p}](plots/{p})" for p in manifest["plots"]) + ".",
        "",
        "## How the data was made",
        "",
    ]
    for entry in manifest["inputs"]:
        lines.append(
            f"Input `{entry['uri']}`: engine config `{entry['config_name']}` (hash "
            f"`{entry['config_hash'][:12]}`), "
            f"code `{entry['code_version']}`, schema {entry['schema_version']}, "
            f"{entry['records_used']} records used."
        )
    lines.append("")
    for config_name, config in manifest["configs"].items():
        lines += [
            f"Stages of config `{config_name}` (models, prompts, thresholds):",
            "",
            *how_made(config),
            "",
        ]
    lines += ["## Quality", ""]
    audits = [(e["uri"], e["audit"]) for e in manifest["inputs"] if e.get("audit")]
    if audits:
        for uri, audit in audits:
            lines.append(
                f"Audit of `{uri}`: " + ", ".join(f"`{k}={v}`" for k, v in sorted(_flat(audit).items()))
            )
    else:
        lines.append(
            "No audit.json was found in the inputs: this release has no measured box or text quality."
        )
    if manifest["gate"]:
        lines.append("")
        lines.append(
            "Release gate (`--require`), every requirement passed: "
            + ", ".join(
                f"`{g['requirement']}` ({g['value']:.4g} for `{g['input']}`)" for g in manifest["gate"]
            )
        )
    lines += ["", "## Known limitations", ""]
    models = sorted(
        {
            str(v)
            for c in manifest["configs"].values()
            for k, v in _flat(c).items()
            if k.endswith("model.name")
        }
    )
    if any(m.startswith("tiny:") for m in models):
        lines.append(
            "- Built with the project's **tiny random models** (fixture config): "
            "the texts are word salad and "
            "the boxes are not meaningful. Such a release tests the plumbing, not the data."
        )
    lines += [
        "- Every annotation is machine-made (VLM captions and descriptions, an "
        "open-vocabulary detector, an LLM "
        "verifier and rewriter, SAM 2 masks); no human checked it. Errors of "
        "those models remain: missed objects, "
        "loose boxes, descriptions that fit the phrase but not the pixels.",
        "- Categories are free text (1-3 words from an LLM), not a closed "
        "vocabulary: synonyms and plural forms "
        "appear as different categories; the long tail is long.",
        "- A region lacks a tier (null field) where that text failed its checks; counts above say how often.",
        "- Images keep the licence of their sources; check them before redistribution.",
    ]
    diff = manifest.get("diff")
    if diff:
        prev = diff["previous"]
        lines += [
            "",
            f"## Changes since {prev['name']} {prev['version']}",
            "",
            f"Records: {diff['records']['previous']} → {diff['records']['now']}; "
            f"keys added: {diff['added']}, "
            f"removed: {diff['removed']}.",
            "",
            *_table(
                ["tier", "previous", "now", "delta"],
                [[t, v["previous"], v["now"], f"{v['delta']:+d}"] for t, v in diff["tiers"].items()],
            ),
            "",
        ]
        if diff["added_keys"]:
            lines.append("Added (first keys): " + ", ".join(f"`{k[:12]}`" for k in diff["added_keys"]))
        if diff["removed_keys"]:
            lines.append("Removed (first keys): " + ", ".join(f"`{k[:12]}`" for k in diff["removed_keys"]))
        changes = diff["config_changes"]
        lines.append("")
        lines.append("Config differences: " + ("none" if not changes else ""))
        for c in changes[:50]:
            lines.append(f"- `{c['path']}`: `{_short(c['previous'])}` → `{_short(c['now'])}`")
    first_split = next(iter(counts["splits"]))
    shard_glob = f"shards/{first_split}/*.tar" if manifest["build"]["split"] else "shards/*.tar"
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "# webdataset",
        "import glob, webdataset as wds",
        f"ds = wds.WebDataset(sorted(glob.glob('{shard_glob}')), shardshuffle=False).decode('pil')  "
        "# sample['jpg'], sample['json']",
        "",
        "# Ray Data",
        "import ray",
        f"ray_ds = ray.data.read_webdataset('{shard_glob.rsplit('/', 1)[0]}')",
        "",
        "# Hugging Face datasets (from this folder or the hub)",
        "from datasets import load_dataset",
        "hf = load_dataset('webdataset', "
        f"data_files={{'{first_split}': '{shard_glob}'}}, split='{first_split}')",
        "index = load_dataset('.')  # run in this folder: the parquet index, features as in the header",
        "",
        "# pandas / duckdb",
        "import pandas as pd, duckdb",
        "index = pd.read_parquet('index')",
        "duckdb.sql(\"select split, count(*) from 'index/*.parquet' group by split\").fetchall()",
        "",
        "# COCO (pycocotools); images are the shard members: extract the tars into one folder first",
        "from pycocotools.coco import COCO",
        "coco = COCO('exports/coco.json')",
        "```",
        "",
        'Images for the exports: `mkdir images && for t in shards/*.tar shards/*/*.tar; do [ -f "$t" ] && '
        'tar -xf "$t" -C images; done` (file names are `{key}.jpg`, as in the exports).',
        "",
        "Verify the download: `sha256sum -c SHA256SUMS` in this folder.",
        "",
        "## Citation",
        "",
        "The engine reproduces the data engine of: Qing Jiang et al., *ChatRex: "
        "Taming Multimodal LLM for Joint "
        "Perception and Understanding*, arXiv 2411.18363.",
        "",
    ]
    return "\n".join(lines)
