"""What region captioning costs per image, both ways (issue #18): every region's full prompt on its own
(`shared_prefix: false`, what `mark_box: true` costs too) against one image encoding and one prefilled
prefix per image (`shared_prefix: true`, the default).

    python bench/region_caption_cost.py

1. From the real config (configs/rexverse2m.yaml) and the real models' published sizes: prompt tokens
   prefilled and approximate TFLOPs per image of caption, region caption and refine, both ways.
2. Measured here: the region-caption stage both ways on the same fixture images and regions, with a random
   Qwen2-VL built below in the real run's proportions: >= 256 image tokens per image, the real config's
   prompts and answer length (max_new_tokens 48), and a width at which encoding + prefill take over half of
   the unshared run's time, as for Qwen2-VL-7B on a GPU (issue #18's estimate: ~25 ms vision + ~70 ms
   prefill against ~45 ms of decoding per region at batch 16). For 1, 5 and 16 regions per image it prints
   `regions_per_image=N prefill_share=.. vision_passes_ratio=.. prefill_tokens_ratio=.. wall_ratio=..
   identical=1|0`, 5 last. prefill_share: vision + prefill forwards over the unshared run's wall time;
   vision_passes: images through the vision tower; prefill_tokens: prompt tokens run (no padding);
   wall: the stage's wall time (best of `--repeats` alternating runs, 2 more at 1 region); identical:
   every raw answer of every run equal. Detail lines add `alone_same_loop`: every region's full prompt
   through the shared path's own decoding loop, so `shared_over_same_loop` is what sharing alone saves.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "fixture100"

# ------------------------------------------------------------------------------ real sizes (published)
# Qwen2-VL-7B-Instruct config.json on the hub: text hidden 3584, intermediate 18944, 28 layers, 28 heads,
# 4 KV heads, vocab 152064; vision depth 32, embed_dim 1280, mlp_ratio 4, patch 14, temporal patch 2,
# spatial merge 2 (the Qwen2-VL paper: a 675M-parameter ViT); its preprocessor allows up to 12845056 pixels.
# Qwen2.5-7B-Instruct (refine) has the same text dimensions. Each image token is a 2x2 merge of 14 px
# patches (28 x 28 px); the ViT attends over all patches of an image.


@dataclass(frozen=True)
class TextModel:
    hidden: int = 3584
    intermediate: int = 18944
    layers: int = 28
    heads: int = 28
    kv_heads: int = 4
    vocab: int = 152064

    @property
    def layer_params(self) -> int:
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        return attention + 3 * self.hidden * self.intermediate

    def prefill_flops(self, tokens: int, context: int = 0) -> float:
        """2 x weights x tokens, causal attention scores and values over the cached context + itself."""
        linear = 2 * self.layers * self.layer_params * tokens
        attention = 4 * self.layers * self.hidden * tokens * (context + tokens / 2)
        return linear + attention + 2 * self.hidden * self.vocab  # logits of the last token

    def decode_flops(self, new_tokens: int, context: int) -> float:
        per_token = 2 * (self.layers * self.layer_params + self.hidden * self.vocab)
        return new_tokens * (per_token + 4 * self.layers * self.hidden * (context + new_tokens / 2))


@dataclass(frozen=True)
class VisionTower:
    embed: int = 1280
    depth: int = 32
    mlp_ratio: int = 4
    out: int = 3584
    patch: int = 14
    merge: int = 2

    @property
    def params(self) -> int:
        block = 4 * self.embed**2 + 2 * self.mlp_ratio * self.embed**2
        merged = self.embed * self.merge**2
        return self.depth * block + merged * merged + merged * self.out + 3 * 2 * self.patch**2 * self.embed

    def flops(self, patches: int) -> float:
        return 2 * self.params * patches + 4 * self.depth * self.embed * patches**2


def image_tokens(width: int, height: int, max_side: int, factor: int = 28) -> tuple[int, tuple[int, int]]:
    """Merged-patch tokens of a width x height photo shrunk to `max_side` and rounded to 28 px (Qwen2-VL
    smart_resize, well inside its pixel bounds)."""
    scale = min(1.0, max_side / max(width, height))
    w, h = round(width * scale / factor) * factor, round(height * scale / factor) * factor
    return (w // factor) * (h // factor), (w, h)


def approx_tokens(text: str) -> int:
    """Qwen2 BPE token count, approximately: special tokens and single digits are one token each (Qwen's
    tokenizer splits numbers into digits), other English text about 4 characters per token."""
    specials = re.findall(r"<\|[a-z_]+\|>", text)
    rest = re.sub(r"<\|[a-z_]+\|>", "", text)
    digits = sum(ch.isdigit() for ch in rest)
    other = re.sub(r"\d", "", rest)
    return len(specials) + digits + max(1, round(len(other) / 4))


def real_costs(config: Path, regions: float, width: int, height: int) -> list[str]:
    """Per-image prompt tokens and TFLOPs of caption, region caption and refine, both ways."""
    from pipelines.rexverse2m import load_job_config

    stages = load_job_config(config).stages
    rc, cap, ref = stages.region_caption, stages.caption, stages.refine
    text, vision = TextModel(), VisionTower()
    n_image, shown = image_tokens(width, height, rc.max_image_side)
    patches = n_image * 4
    # Qwen2-VL's chat template: a default system turn, the image in the user turn, the assistant's opening
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
    tail = "<|im_end|>\n<|im_start|>assistant\n"
    head = approx_tokens(system) + n_image + approx_tokens("<|vision_end|>")
    box = "<|box_start|>(231,318),(517,804)<|box_end|>"  # a typical box in Qwen2-VL's 0-1000 grid
    region = rc.region_prompt.format(phrase="a large yellow ring", box=box)
    shared_text = head + approx_tokens(rc.prompt)
    own = approx_tokens(" " + region + tail)
    caption_prompt = head + approx_tokens(cap.prompt + tail)
    rows = []

    def line(stage: str, way: str, vision_passes: float, prefill: float, flops: float) -> str:
        return (
            f"real stage={stage} way={way} vision_passes={vision_passes:.2f} "
            f"prefill_tokens={prefill:.0f} tflops={flops / 1e12:.1f}"
        )

    caption_flops = (
        vision.flops(patches)
        + text.prefill_flops(caption_prompt)
        + text.decode_flops(cap.generation.max_new_tokens, caption_prompt)
    )
    rows.append(line("caption", "both", 1, caption_prompt, caption_flops))
    full = shared_text + own
    decode = regions * text.decode_flops(rc.generation.max_new_tokens, full)
    unshared = regions * (vision.flops(patches) + text.prefill_flops(full)) + decode
    shared = (
        vision.flops(patches)
        + text.prefill_flops(shared_text)
        + regions * text.prefill_flops(own, context=shared_text)
        + decode
    )
    rows.append(line("region_caption", "unshared", regions, regions * full, unshared))
    rows.append(line("region_caption", "shared", 1, shared_text + regions * own, shared))
    # refine, per region: one verify question and one referring rewrite (no retry), after the system turn
    lm_system = approx_tokens(f"<|im_start|>system\n{ref.system_prompt}<|im_end|>\n<|im_start|>user\n")
    description = "A large yellow ring lies on the table near the left edge of the picture."
    words = {"phrase": "a large yellow ring", "description": description, "category": "ring"}
    verify = approx_tokens(ref.verify_prompt.format(**words) + tail)
    referring = approx_tokens(ref.referring_prompt.format(**words) + tail)
    answer = ref.generation.max_new_tokens
    refine_decode = regions * text.decode_flops(answer, lm_system + referring)
    refine_unshared = regions * (
        text.prefill_flops(lm_system + verify) + text.prefill_flops(lm_system + referring)
    )
    refine_shared = regions * (
        text.prefill_flops(verify, lm_system) + text.prefill_flops(referring, lm_system)
    )  # the system turn: once per actor, nothing per image
    rows.append(
        line(
            "refine",
            "unshared",
            0,
            regions * (2 * lm_system + verify + referring),
            refine_unshared + refine_decode,
        )
    )
    rows.append(line("refine", "shared", 0, regions * (verify + referring), refine_shared + refine_decode))
    total_u = caption_flops + unshared + refine_unshared + refine_decode
    total_s = caption_flops + shared + refine_shared + refine_decode
    head_line = (
        f"real image={width}x{height} shown={shown[0]}x{shown[1]} image_tokens={n_image} "
        f"regions_per_image={regions} vision_params={vision.params / 1e9:.3f}B "
        f"text_params={text.layers * text.layer_params / 1e9:.2f}B"
    )
    total = (
        f"real total_tflops unshared={total_u / 1e12:.1f} shared={total_s / 1e12:.1f} "
        f"ratio={total_s / total_u:.3f}"
    )
    return [head_line, *rows, total]


# ------------------------------------------------------------------------------ measured (tiny model)


def build_vlm(
    folder: Path, hidden: int, layers: int, vision_embed: int, vision_depth: int, min_tokens: int
) -> None:
    """A random Qwen2-VL with the tiny one's tokenizer and chat template, `hidden` wide, and a processor
    that resizes every image to at least `min_tokens` image tokens."""
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from engine.models import resolve_model

    processor = AutoProcessor.from_pretrained(resolve_model("tiny:qwen2-vl"))
    processor.image_processor.size = {
        "shortest_edge": min_tokens * 28 * 28,
        "longest_edge": 2 * min_tokens * 28 * 28,
    }
    tokenizer = processor.tokenizer
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    special = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    heads = hidden // 64
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": hidden * 3,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 4),
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0},
            **special,
        },
        vision_config={
            "depth": vision_depth,
            "embed_dim": vision_embed,
            "hidden_size": hidden,
            "num_heads": vision_embed // 64,
            "mlp_ratio": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        **{
            k: tokenizer.convert_tokens_to_ids(t)
            for k, t in [
                ("image_token_id", "<|image_pad|>"),
                ("video_token_id", "<|video_pad|>"),
                ("vision_start_token_id", "<|vision_start|>"),
                ("vision_end_token_id", "<|vision_end|>"),
            ]
        },
        tie_word_embeddings=False,
        **special,
    )
    import torch

    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.update(**special, do_sample=False)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def bench_items(n_images: int, regions: int) -> list[Any]:
    """Fixture scenes with `regions` seeded boxes each, named by phrases from the fixture's categories."""
    from engine.items import Item

    coco = json.loads((FIXTURE / "annotations.json").read_text())
    names = [c["name"] for c in coco["categories"]]
    colours = ["red", "green", "blue", "yellow", "gray", "orange", "purple", "white"]
    scenes = [i for i in coco["images"] if i["file_name"].startswith("scene_")][:n_images]
    rng = random.Random(regions)
    items = []
    for image in scenes:
        w, h = image["width"], image["height"]
        phrases, boxes = [], []
        for k in range(regions):
            x0, y0 = rng.uniform(0, w * 0.7), rng.uniform(0, h * 0.7)
            x1, y1 = x0 + rng.uniform(0.1, 0.3) * w, y0 + rng.uniform(0.1, 0.3) * h
            phrases.append({"text": f"a {rng.choice(colours)} {rng.choice(names)}", "start": 0, "end": 0})
            boxes.append(
                {"id": k, "box": [x0, y0, min(x1, w), min(y1, h)], "score": 0.5, "phrase": k, "scores": {}}
            )
        record = {"width": w, "height": h, "phrases": phrases, "regions": boxes}
        items.append(
            Item(
                key=str(image["id"]),
                uri=image["file_name"],
                image=(FIXTURE / image["file_name"]).read_bytes(),
                record=record,
            )
        )
    return items


class Meter:
    """Hooks on the model: seconds spent encoding images and running prompts (forwards with more than one
    new token per row, or with pixels; `generate` runs the vision tower before its first forward), images
    through the vision tower, and every raw answer the VLM returns."""

    def __init__(self, vlm: Any) -> None:
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self.images = 0
        self.answers: list[str] = []
        self._start: dict[str, float] = {}
        self._inside = False  # in a forward of the whole model (which then times the vision tower too)
        self._recording_depth = 0
        model = vlm.model

        def pre(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            self._inside = True
            self._start["model"] = time.perf_counter()

        def post(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
            self._inside = False
            ids = kwargs.get("input_ids")
            seconds = time.perf_counter() - self._start["model"]
            if (ids is not None and ids.shape[1] > 1) or kwargs.get("pixel_values") is not None:
                self.prefill_s += seconds
            else:
                self.decode_s += seconds

        def vision_pre(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            self._start["vision"] = time.perf_counter()

        def vision_post(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            self.images += int(grid.shape[0])
            if not self._inside:
                self.prefill_s += time.perf_counter() - self._start["vision"]

        model.register_forward_pre_hook(pre, with_kwargs=True)
        model.register_forward_hook(post, with_kwargs=True)
        model.model.visual.register_forward_pre_hook(vision_pre, with_kwargs=True)
        model.model.visual.register_forward_hook(vision_post, with_kwargs=True)
        for name in ("_generate_full", "generate_shared"):
            original = getattr(vlm, name)
            setattr(vlm, name, self._recording(original, name == "generate_shared"))

    def _recording(self, fn: Callable[..., Any], nested: bool) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self._recording_depth += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                self._recording_depth -= 1
            if not self._recording_depth:  # the outermost call: a fallback inside is not counted twice
                self.answers += [a for group in out for a in group] if nested else out
            return out

        return wrapped

    def reset(self) -> None:
        self.prefill_s, self.decode_s, self.images, self.answers = 0.0, 0.0, 0, []


def alone_same_loop(stage: Any, items: list[Any]) -> None:
    """Every region's full prompt on its own, through the shared path's decoding loop (each region a group
    of one: its own image encoding and whole-prompt prefill): separates what sharing saves from what the
    loop saves against `generate`."""
    from engine.images import load_rgb

    groups = []
    for item in items:
        image = load_rgb(item.image, stage.cfg.max_image_side)
        groups += [(image, [prompt]) for prompt in stage.prompts(item, image)]
    stage.vlm.generate_shared(groups, stage.cfg.regions_per_call)


def run_way(stage: Any, meter: Meter, items: list[Any], way: str, batch: int) -> dict[str, Any]:
    """The stage over `items` in calls of `batch` images, one way (unshared, shared, or alone through the
    shared path's loop); its wall time and what ran."""
    import copy

    stage.cfg = stage.cfg.model_copy(update={"shared_prefix": way == "shared"})
    items = copy.deepcopy(items)
    meter.reset()
    tokens_before = stage.vlm.counts["prefill_tokens"]
    start = time.perf_counter()
    for i in range(0, len(items), batch):
        if way == "same_loop":
            alone_same_loop(stage, items[i : i + batch])
        else:
            stage.process(items[i : i + batch])
    wall = time.perf_counter() - start
    return {
        "wall": wall,
        "prefill_s": meter.prefill_s,
        "decode_s": meter.decode_s,
        "images": meter.images,
        "tokens": stage.vlm.counts["prefill_tokens"] - tokens_before,
        "answers": list(meter.answers),
    }


WAYS = ("unshared", "shared", "same_loop")


def compare(
    stage: Any, meter: Meter, items: list[Any], batch: int, repeats: int
) -> tuple[str, dict[str, dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {way: [] for way in WAYS}
    for _ in range(repeats):  # alternating, so every way sees the same machine load
        for way in WAYS:
            runs[way].append(run_way(stage, meter, items, way, batch))
    best = {way: min(runs[way], key=lambda r: r["wall"]) for way in WAYS}
    u, s = best["unshared"], best["shared"]
    reference = runs["unshared"][0]["answers"]
    identical = all(r["answers"] == reference for way in WAYS for r in runs[way])
    regions = len(items[0].record["regions"])
    line = (
        f"regions_per_image={regions} prefill_share={u['prefill_s'] / u['wall']:.3f} "
        f"vision_passes_ratio={s['images'] / u['images']:.3f} "
        f"prefill_tokens_ratio={s['tokens'] / u['tokens']:.3f} "
        f"wall_ratio={s['wall'] / u['wall']:.3f} identical={int(identical)}"
    )
    return line, best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "rexverse2m.yaml")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vision-embed", type=int, default=192)
    parser.add_argument("--vision-depth", type=int, default=4)
    parser.add_argument("--min-image-tokens", type=int, default=256)
    parser.add_argument("--images", type=int, default=4, help="images per setting (half at 16 regions)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from engine.config import ModelRef
    from pipelines.rexverse2m import load_job_config
    from stages.region_caption import RegionCaption

    torch.set_num_threads(args.threads)
    regions_real = round(10.2 / 2.1, 2)  # paper: 10.2M regions over 2.1M images
    for row in real_costs(args.config, regions_real, 1600, 1200):
        print(row, flush=True)
    real = load_job_config(args.config).stages.region_caption
    with tempfile.TemporaryDirectory() as folder:
        build_vlm(
            Path(folder),
            args.hidden,
            args.layers,
            args.vision_embed,
            args.vision_depth,
            args.min_image_tokens,
        )
        cfg = real.model_copy(update={"model": ModelRef(name=folder, dtype="float32")})
        stage = RegionCaption(cfg)
        meter = Meter(stage.vlm)
        batch = real.resources.batch_size
        compare(stage, meter, bench_items(2, 2), batch, 1)  # warm-up
        print(
            f"tiny hidden={args.hidden} layers={args.layers} vision={args.vision_embed}x{args.vision_depth} "
            f"images_per_call={batch} regions_per_call={real.regions_per_call} "
            f"max_new_tokens={real.generation.max_new_tokens} threads={args.threads}",
            flush=True,
        )
        lines = {}
        for regions in (1, 16, 5):
            n = args.images // 2 if regions == 16 else args.images
            repeats = args.repeats + 2 if regions == 1 else args.repeats  # cheap, and the closest call
            line, best = compare(stage, meter, bench_items(n, regions), batch, repeats)
            u, s, loop = best["unshared"], best["shared"], best["same_loop"]
            print(
                f"detail regions_per_image={regions} images={n} "
                f"prompt_tokens={u['tokens'] / n / regions:.0f} unshared wall={u['wall']:.2f}s "
                f"vision+prefill={u['prefill_s']:.2f}s decode={u['decode_s']:.2f}s tokens={u['tokens']} "
                f"vision={u['images']} | shared wall={s['wall']:.2f}s prefill={s['prefill_s']:.2f}s "
                f"decode={s['decode_s']:.2f}s tokens={s['tokens']} vision={s['images']} "
                f"| alone_same_loop wall={loop['wall']:.2f}s "
                f"shared_over_same_loop={s['wall'] / loop['wall']:.3f}",
                flush=True,
            )
            lines[regions] = line
        for regions in (1, 16, 5):
            print(lines[regions])
    return 0


if __name__ == "__main__":
    sys.exit(main())
