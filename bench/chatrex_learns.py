"""Does ChatRex learn to detect by picking candidate boxes, and does that beat writing coordinates? CPU bench.

Generates synthetic scenes of simple shapes with known boxes (the fixture generator, other seeds: 1-6
objects of 8 categories), turns them into Rexverse shards whose proposals come from the documented synthetic
proposal model (`chatrex/proposals.py`: 1-2 jittered boxes per object with IoU 0.55-0.95 to it, background and
partial boxes shaped like real objects, uniform scores that carry no information). Evaluation candidates are
these proposals only: no ground-truth box is ever an input.

Two models with the same parts (a small random ViT + ConvNeXt + 4-layer Qwen2), data, stages and step budget.
The small LLM reads the question before the object tokens and index-tagged object tokens (`question_first`,
`index_tagged_objects`): with the paper's layout it learned to match categories far more slowly
(docs/chatrex.md, "The prompt layout").

- ChatRex (retrieval): answers with indices of candidate boxes. Trained with the real pipeline (Ray Train:
  the paper's `alignment`, `perception`, `joint` stages; candidates = proposals, each object answered by the
  proposals that cover it) and evaluated with the real eval stage (Ray Data), beside the baselines of
  `chatrex/scoring.py` on the same candidates.
- Coordinates (Shikra / Qwen2-VL style, `chatrex/coordinates.py`): no candidates; the answer writes each
  box as four integers 0-999. Trained by an in-process loop with the same stages, steps, batch, learning-rate
  schedule and frozen parts; evaluated on the same questions.

Both start from stand-ins for pretrained parts, made on training scenes only (measured per step, held out):

1. region pre-training of the ConvNeXt + object encoder (shared by both models): a throw-away linear head
   classifies each candidate box as the category of the object it covers (IoU >= 0.5) or background
   (partial boxes, background patches); its held-out per-candidate accuracy is printed by kind;
2. a text warm-up of each LLM on its own answer format in words (retrieval: each `<roi>` slot holds the
   embedding of its candidate's category name or "background"; coordinates: the objects listed with their
   quantised boxes);
3. retrieval only, object-token alignment (`align_object_tokens`): the object projector learns to output
   the name embedding the warm-up put in each candidate's slot, so the warmed-up LLM reads image features
   the way it read words (the coordinate model has no object tokens).

Detection answers name every candidate that covers an object (`chatrex.tasks.assign_proposals`), and
evaluation suppresses duplicate boxes in each answer (NMS at `--dedup-iou`, ranked by the model's own
`<objN>` probability; the coordinate model's boxes and every baseline's picks go through the same
suppression). No ground truth enters it.

The last line reads `R@0.5=<r> P@0.5=<p> baseline_R@0.5=<b> baseline_P@0.5=<bp> coords_R@0.5=<c> mAP=<m>`:
the retrieval model, the best-F1 category-blind baseline, the coordinate model's recall, and the retrieval
model's mAP ranked by its own <objN> probabilities. `--output DIR` keeps the retrieval model's evaluation
(metrics.json, predictions.jsonl) and the coordinate model's (coords_metrics.json). `--sweep` (not timed)
adds R/P of both at 1, 3, 6, 10 objects per image and the ablation without ConvNeXt object features.

    python bench/chatrex_learns.py [--perception-steps 1200] [--output DIR] [--sweep] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_small_chatrex(out: Path, seed: int = 0, object_features: str = "roi", **llm_overrides) -> Path:
    """A small random ChatRex: ViT 96 px / ConvNeXt 192 px (6x6 tokens each), a 4-layer 128-wide Qwen2.

    Its object encoder keeps the 4x4 RoIAlign grid of the two finest ConvNeXt stages (`roi_pooling:
    flatten`): an encoder trained from scratch must see a region's layout to tell a star from a hexagon
    (measured here: 94% vs 48% shape accuracy of a linear probe after 300 steps, against mean pooling).
    `object_features="box"` builds the ablation whose object tokens carry no ConvNeXt features.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
        ConvNextConfig,
        ConvNextModel,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from chatrex.modeling import ChatRexForConditionalGeneration
    from chatrex.processor import ChatRexProcessor
    from scaffold.tiny_models import ensure_tiny_model

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model("qwen2-lm"))
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=96,
            patch_size=16,
        )
    )
    convnext = ConvNextModel(
        ConvNextConfig(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1], image_size=192)
    )
    llm_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        # 3x the usual 0.02: the text warm-up learned faster from it (0.69 vs 0.58 index accuracy
        # after 600 steps, measured here once each)
        initializer_range=0.06,
        # Qwen2 checkpoints' own base; matching a category by content across tens of positions needs slow
        # rotary frequencies (text warm-up, 800 steps, held-out R/P 0.735/0.546 vs 0.708/0.503 at 1e4)
        rope_theta=1e6,
    )
    llm = Qwen2ForCausalLM(Qwen2Config(**(llm_config | llm_overrides)))
    model = ChatRexForConditionalGeneration.from_parts(
        vision,
        convnext,
        llm,
        tokenizer,
        num_object_tokens=32,
        low_res_size=96,
        high_res_size=192,
        roi_stages=[1, 2],
        roi_output_size=4,
        roi_pooling="flatten",
        box_embed_dim=64,
        object_features=object_features,
        # question before the object tokens, and each object token tagged with its index embedding: text
        # warm-up, 800 steps, held-out R/P with the true category words in the slots 0.735/0.546 (paper's
        # layout), 0.977/0.936 (question first), 1.000/0.998 (both); measured here once each, 1 thread
        question_first=True,
        index_tagged_objects=True,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    ChatRexProcessor.from_model_config(tokenizer, model.config).save_pretrained(out)
    return out


def training_rows(shards: Path) -> list[tuple[dict, bytes]]:
    """(record, JPEG bytes) of every row of the bench's training shards, in shard order."""
    import glob

    import webdataset as wds

    tars = sorted(glob.glob(str(shards / "shards" / "*.tar")))
    return [(json.loads(row["json"]), bytes(row["jpg"])) for row in wds.WebDataset(tars, shardshuffle=False)]


def _warmup_cosine(step: int, steps: int, warmup: int = 50) -> float:
    """Learning-rate factor of the stand-in trainings: linear warm-up, cosine decay to 10%."""
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, step / steps))))


def slot_words_of(record: dict, boxes) -> list[str]:
    """Per input box, the word a perfect region encoder would say: its object's category or "background".

    Every box that covers an object (`InputBoxes.covers`, IoU >= 0.5) names it, as the detection answers do.
    """
    words = ["background"] * len(boxes.boxes)
    for region in record["regions"]:
        rid = region["id"]
        if rid in boxes.region_index:
            for i in boxes.covers[rid] if boxes.covers is not None else [boxes.region_index[rid]]:
                words[i] = region["category"]
    return words


def warm_up_llm_on_text(
    model_dir: Path,
    shards: Path,
    steps: int,
    weights: dict[str, float],
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    candidates: str = "proposals",
) -> float:
    """Teach the small LLM the task mix in words before it sees any pixels; returns the last 100 steps' loss.

    A real ChatRex starts from a pretrained LLM that already retrieves from its context; a random 4-layer
    LLM does not, and measured here it stayed at chance for 1500 multimodal steps. So the LLM first trains
    alone on a text rendering of the training scenes: the same prompts and answers, each `<roi>` slot holding
    the mean input embedding of its region's category name ("background" for a distractor), no image
    tokens; with `index_tagged_objects` each slot also carries its index embedding, as object tokens do. The
    multimodal stages then have to learn the vision side: map pixels in a box to what the LLM
    reads as that category. Only training scenes are used; held-out scenes stay unseen.
    """
    import random

    import torch

    from chatrex.modeling import ChatRexForConditionalGeneration, answer_only_loss
    from chatrex.processor import ChatRexProcessor
    from chatrex.tasks import sample_task

    model = ChatRexForConditionalGeneration.from_pretrained(model_dir)
    processor = ChatRexProcessor.from_pretrained(model_dir)
    processor.num_image_tokens = 0  # words only: the prompt keeps its layout minus the image placeholders
    tokenizer, llm = processor.tokenizer, model.language_model
    embed = llm.get_input_embeddings()
    records = [record for record, _ in training_rows(shards)]
    word_ids: dict[str, list[int]] = {}
    rng = random.Random(seed)
    llm.train()
    optimizer = torch.optim.AdamW(llm.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _warmup_cosine(s, steps))
    losses: list[float] = []
    for step in range(steps):
        rows, slot_words = [], []
        while len(rows) < batch_size:
            record = rng.choice(records)
            drawn = sample_task(record, rng, 32, weights, candidates)
            if drawn is None:
                continue
            boxes, task = drawn
            words = slot_words_of(record, boxes)
            rows.append(processor.tokenize(len(words), task.question, task.answer))
            slot_words.extend(words)
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros(batch_size, width, dtype=torch.long)
        for i, (ids, row_labels) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(ids)] = torch.tensor(row_labels)
            mask[i, : len(ids)] = 1
        for word in slot_words:
            word_ids.setdefault(word, tokenizer(" " + word, add_special_tokens=False).input_ids)
        slots = torch.stack([embed(torch.tensor(word_ids[w])).mean(0) for w in slot_words])
        inputs = model.place_objects(embed(input_ids), input_ids, slots)  # as it places object tokens
        loss = answer_only_loss(llm, inputs, mask, labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"text warm-up step {step + 1}/{steps}: loss {sum(losses[-100:]) / 100:.3f}", flush=True)
    model.save_pretrained(model_dir)
    return sum(losses[-100:]) / len(losses[-100:])


def _region_classes(rows: list[tuple[dict, bytes]]) -> list[str]:
    return ["background", *sorted({r["category"] for record, _ in rows for r in record["regions"]})]


def _region_batch(processor, rows: list[tuple[dict, bytes]], rng, classes: list[str]):
    """(high-res pixels, boxes 0-1, labels, kinds) of the training candidates of `rows` (rng: task draw).

    Training labels: `slot_words_of` (a box covering an object at IoU >= 0.5 is that object's category).
    Without `rng` (measuring): the evaluation's candidates (`eval_chatrex.candidates`), labelled the same
    way from the annotations, with the kind of each box: whole object, partial (IoU 0.2-0.5), background.
    """
    import io

    import torch
    from PIL import Image

    from chatrex.proposals import iou_matrix
    from chatrex.tasks import mix_boxes
    from pipelines.eval_chatrex import candidates

    pixels, boxes, labels, kinds = [], [], [], []
    for record, jpg in rows:
        image = Image.open(io.BytesIO(jpg)).convert("RGB")
        if rng is not None:
            mixed = mix_boxes(record, processor.num_object_tokens, rng, candidates="proposals")
            shown, names = mixed.boxes, slot_words_of(record, mixed)
        else:
            shown = candidates(record, processor.num_object_tokens)[0]
            gt = [r["box"] for r in record["regions"]]
            ious = iou_matrix(shown, gt)
            names = []
            for row in ious:
                best = float(row.max()) if gt else 0.0
                names.append(
                    record["regions"][int(row.argmax())]["category"] if best >= 0.5 else "background"
                )
                kinds.append("whole" if best >= 0.5 else "partial" if best >= 0.2 else "background")
        pixels.append(torch.from_numpy(processor.preprocess_image(image)[1]))
        boxes.append(torch.from_numpy(processor.normalize_boxes(shown, *image.size)))
        labels.extend(classes.index(n) for n in names)
    return torch.stack(pixels), boxes, torch.tensor(labels), kinds


def _object_tokens(model, pixels, boxes):
    stages = model.high_res_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states
    return model.object_encoder(
        [stages[s] for s in model.config.roi_stages], boxes, model.config.high_res_size
    )


def region_accuracy(model, processor, rows, classes, classify, batch_size: int = 32) -> dict[str, float]:
    """Held-out per-candidate accuracy of `classify(object tokens) -> class ids`, overall and by kind."""
    import torch

    hits: dict[str, list[bool]] = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            pixels, boxes, labels, kinds = _region_batch(
                processor, rows[start : start + batch_size], None, classes
            )
            if not kinds:
                continue
            predicted = classify(_object_tokens(model, pixels, boxes))
            for kind, ok in zip(kinds, (predicted == labels).tolist(), strict=True):
                hits.setdefault(kind, []).append(ok)
    model.train(was_training)
    result = {kind: round(sum(v) / len(v), 3) for kind, v in sorted(hits.items())}
    result["all"] = round(sum(sum(v) for v in hits.values()) / max(1, sum(map(len, hits.values()))), 3)
    return result


def pretrain_region_encoder(
    model_dir: Path,
    shards: Path,
    steps: int,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    held_out: Path | None = None,
) -> dict[str, float]:
    """Train the ConvNeXt and the object encoder to classify boxes; returns held-out accuracy by kind.

    The stand-in for a pretrained vision tower: a real ChatRex pools RoI features from a pretrained ConvNeXt,
    where boxes of different categories already look different; this random one must first learn the shapes.
    A linear head (thrown away afterwards) on the object encoder's output predicts each candidate's label:
    the category of the object it covers at IoU >= 0.5 (every such box, as detection answers name them), or
    "background" (partial boxes and background patches). Trained on training scenes; `held_out` shards
    (never trained on) measure per-candidate accuracy on the evaluation's candidates.
    """
    import math
    import random

    import torch

    from chatrex.modeling import ChatRexForConditionalGeneration
    from chatrex.processor import ChatRexProcessor

    model = ChatRexForConditionalGeneration.from_pretrained(model_dir)
    processor = ChatRexProcessor.from_pretrained(model_dir)
    rows = training_rows(shards)
    classes = _region_classes(rows)
    head = torch.nn.Linear(model.config.text_config.hidden_size, len(classes))
    encoder, objects = model.high_res_encoder, model.object_encoder
    # The output norm keeps the scale of the LLM's embeddings (`match_embedding_scale`); it stays as built.
    scale = {id(p) for p in objects.projector.out_norm.parameters()}
    params = [
        *encoder.parameters(),
        *(p for p in objects.parameters() if id(p) not in scale),
        *head.parameters(),
    ]
    optimizer = torch.optim.AdamW(params, lr=lr)
    # linear warm-up, cosine decay to 10% (measured here: 2e-3 with decay beat a constant 1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps)))),
    )
    rng = random.Random(seed)
    model.train()
    correct: list[float] = []
    for step in range(steps):
        pixels, boxes, labels, _ = _region_batch(processor, rng.sample(rows, batch_size), rng, classes)
        logits = head(_object_tokens(model, pixels, boxes))
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        correct.append((logits.argmax(-1) == labels).float().mean().item())
        if (step + 1) % 100 == 0:
            print(
                f"region pre-training step {step + 1}/{steps}: accuracy {sum(correct[-100:]) / 100:.3f}",
                flush=True,
            )
    model.save_pretrained(model_dir)
    if held_out is None:
        return {"train_last_100": round(sum(correct[-100:]) / len(correct[-100:]), 3)}
    return region_accuracy(model, processor, training_rows(held_out), classes, lambda t: head(t).argmax(-1))


def name_embeddings(model, processor, classes: list[str]):
    """(classes, hidden): the mean input embedding of each class name's tokens, as the text warm-up fills
    `<roi>` slots with them."""
    import torch

    embed = model.language_model.get_input_embeddings()
    tokenizer = processor.tokenizer
    with torch.no_grad():
        return torch.stack(
            [
                embed(torch.tensor(tokenizer(" " + c, add_special_tokens=False).input_ids)).mean(0)
                for c in classes
            ]
        )


def align_object_tokens(
    model_dir: Path,
    shards: Path,
    steps: int,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    held_out: Path | None = None,
    train_vision: bool = False,
) -> dict[str, float]:
    """Bridge region features to the warmed-up LLM: the object projector learns to output, for each
    candidate, the embedding of the word the text warm-up put in its `<roi>` slot (its object's category or
    "background"). Returns held-out accuracy of the nearest name embedding by kind.

    The paper's alignment stage trains the projectors so that visual features land in the LLM's embedding
    space; this is that step for the object tokens, with the target spelled out: the LLM learned to
    retrieve from slots holding category-name embeddings, so object tokens that land there are read the same
    way. The object encoder's projector trains, and with `train_vision` the ConvNeXt under it too (measured
    here: no better, 0.73 vs 0.75 held-out accuracy on whole objects); the LLM is frozen. Training scenes
    only; the loss is MSE to the target embedding plus a cross-entropy over cosine similarities to every
    name (which separates the classes).
    """
    import math
    import random

    import torch

    from chatrex.modeling import ChatRexForConditionalGeneration
    from chatrex.processor import ChatRexProcessor

    model = ChatRexForConditionalGeneration.from_pretrained(model_dir)
    processor = ChatRexProcessor.from_pretrained(model_dir)
    rows = training_rows(shards)
    classes = _region_classes(rows)
    targets = name_embeddings(model, processor, classes)
    unit = torch.nn.functional.normalize(targets, dim=-1)
    params = [*model.object_encoder.parameters()]
    params += [*model.high_res_encoder.parameters()] if train_vision else []
    optimizer = torch.optim.AdamW(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    rng = random.Random(seed)
    model.eval()  # no dropout or batch norm in these parts: eval mode changes nothing but the intent

    def nearest(tokens):
        return (torch.nn.functional.normalize(tokens, dim=-1) @ unit.T).argmax(-1)

    correct: list[float] = []
    for step in range(steps):
        pixels, boxes, labels, _ = _region_batch(processor, rng.sample(rows, batch_size), rng, classes)
        with torch.set_grad_enabled(train_vision):
            stages = model.high_res_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states
            maps = [stages[s] for s in model.config.roi_stages]
        tokens = model.object_encoder(maps, boxes, model.config.high_res_size)
        cosine = torch.nn.functional.normalize(tokens, dim=-1) @ unit.T
        loss = torch.nn.functional.mse_loss(tokens, targets[labels]) / targets.pow(2).mean()
        loss = loss + torch.nn.functional.cross_entropy(cosine / 0.1, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        correct.append((cosine.argmax(-1) == labels).float().mean().item())
        if (step + 1) % 100 == 0:
            print(
                f"object-token alignment step {step + 1}/{steps}: nearest-name accuracy "
                f"{sum(correct[-100:]) / 100:.3f}",
                flush=True,
            )
    model.save_pretrained(model_dir)
    if held_out is None:
        return {"train_last_100": round(sum(correct[-100:]) / len(correct[-100:]), 3)}
    return region_accuracy(model, processor, training_rows(held_out), classes, nearest)


# --- the coordinate model --------------------------------------------------------------------------------


def _records_and_images(shards: Path) -> list[tuple[dict, bytes]]:
    return training_rows(shards)


def _pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (ids, row_labels) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(row_labels)
        mask[i, : len(ids)] = 1
    return input_ids, labels, mask


def warm_up_coordinates_on_text(
    model_dir: Path,
    shards: Path,
    steps: int,
    weights: dict[str, float],
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> float:
    """The coordinate model's stand-in for a pretrained LLM: its answer format, learned in words.

    Mirror of `warm_up_llm_on_text`: no image tokens; the prompt lists the scene's objects in words with
    their quantised coordinates ("circle [102,340,251,512]; ..."), and the answer must copy the right ones.
    The multimodal stages then have to learn the vision side: write the coordinates from pixels.
    """
    import random

    import torch

    from chatrex.coordinates import box_text, coordinate_task
    from chatrex.modeling import ChatRexForConditionalGeneration, answer_only_loss
    from chatrex.processor import ChatRexProcessor

    model = ChatRexForConditionalGeneration.from_pretrained(model_dir)
    processor = ChatRexProcessor.from_pretrained(model_dir)
    processor.num_image_tokens = 0
    llm = model.language_model
    records = [record for record, _ in training_rows(shards)]
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(llm.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _warmup_cosine(s, steps))
    llm.train()
    losses: list[float] = []
    for step in range(steps):
        rows = []
        while len(rows) < batch_size:
            record = rng.choice(records)
            task = coordinate_task(record, rng, weights)
            if task is None:
                continue
            listed = "; ".join(
                f"{r['category']} {box_text(r['box'], record['width'], record['height'])}"
                for r in rng.sample(record["regions"], k=len(record["regions"]))
            )
            # the same order as the retrieval model's prompt: question and object list
            prompt = (
                f"{task.question}\nObjects: {listed}."
                if processor.question_first
                else f"Objects: {listed}.\n{task.question}"
            )
            rows.append(processor.tokenize(0, prompt, task.answer))
        input_ids, labels, mask = _pad_batch(rows, processor.pad_token_id)
        loss = answer_only_loss(llm, llm.get_input_embeddings()(input_ids), mask, labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(
                f"coords text warm-up step {step + 1}/{steps}: loss {sum(losses[-100:]) / 100:.3f}",
                flush=True,
            )
    model.save_pretrained(model_dir)
    return sum(losses[-100:]) / len(losses[-100:])


def train_coordinate_model(
    model_dir: Path, shards: Path, stages: list[dict], batch_size: int, threads: int, seed: int = 0
) -> Path:
    """Train the coordinate model through `stages` (the ChatRex pipeline's stage dicts), in this process.

    Same per stage as the pipeline: `set_trainable`, AdamW over `optimizer_param_groups`, warm-up + cosine
    schedule (`lr_factor`), gradient clipping at 1.0, the stage's task weights; only the answer format and
    the empty candidate list differ.
    """
    import io
    import random

    import torch
    from PIL import Image

    from chatrex.coordinates import coordinate_task
    from chatrex.modeling import ChatRexForConditionalGeneration
    from chatrex.processor import ChatRexProcessor
    from chatrex.train_config import StageConfig
    from pipelines.train_chatrex import lr_factor

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rows = training_rows(shards)
    rng = random.Random(seed)
    model = ChatRexForConditionalGeneration.from_pretrained(model_dir)
    processor = ChatRexProcessor.from_pretrained(model_dir)
    for spec in stages:
        stage = StageConfig.model_validate(spec)
        model.set_trainable(stage.name, train_vision=stage.vision_trains)
        model.train()
        optimizer = torch.optim.AdamW(model.optimizer_param_groups(0.0), lr=stage.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s, st=stage: lr_factor(s, st))
        window: list[float] = []
        started = time.time()
        for step in range(stage.steps):
            samples = []
            while len(samples) < batch_size:
                record, jpg = rng.choice(rows)
                task = coordinate_task(record, rng, stage.weights)
                if task is None:
                    continue
                image = Image.open(io.BytesIO(jpg)).convert("RGB")
                samples.append(processor.encode(image, [], task.question, task.answer))
            loss = model(**processor.collate(samples), answer_logits_only=True).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            scheduler.step()
            window.append(loss.item())
            if (step + 1) % 50 == 0 or step + 1 == stage.steps:
                print(
                    f"[coords {stage.name}] step {step + 1}/{stage.steps} "
                    f"loss {sum(window) / len(window):.4f} "
                    f"({time.time() - started:.0f}s)",
                    flush=True,
                )
                window = []
        model.set_trainable("perception")  # drop the alignment stage's row hooks before the next stage
    out = model_dir.parent / "coords-model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def detection_questions(rows: list[tuple[dict, bytes]]) -> list[tuple[dict, bytes, str, list]]:
    """(record, JPEG bytes, category, its ground-truth boxes): one question per category of each image."""
    questions = []
    for record, jpg in rows:
        by_category: dict[str, list] = {}
        for region in record["regions"]:
            by_category.setdefault(region["category"], []).append(region["box"])
        questions += [(record, jpg, category, by_category[category]) for category in sorted(by_category)]
    return questions


def evaluate_coordinates(
    model_dir: Path,
    shards: Path,
    threads: int,
    dedup_iou: float | None,
    batch_size: int = 16,
    max_new_tokens: int = 160,
) -> dict:
    """Detection P/R@0.5 of the coordinate model on ChatRex's eval questions (all and per bucket).

    `dedup_iou`: the same duplicate suppression as the retrieval model's (NMS, ranked by answer order).
    """
    import io
    from collections import defaultdict

    import torch
    from PIL import Image

    from chatrex.coordinates import parse_coordinates
    from chatrex.metrics import DetectionCounts
    from chatrex.modeling import ChatRexForConditionalGeneration
    from chatrex.processor import ChatRexProcessor
    from chatrex.scoring import bucket_of, suppress_duplicates
    from chatrex.tasks import DETECT_QUESTION

    torch.set_num_threads(threads)
    model = ChatRexForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = ChatRexProcessor.from_pretrained(model_dir)
    questions = detection_questions(training_rows(shards))
    total, buckets = DetectionCounts(), defaultdict(DetectionCounts)
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        samples = [
            processor.encode(
                Image.open(io.BytesIO(jpg)).convert("RGB"), [], DETECT_QUESTION.format(category=c)
            )
            for _, jpg, c, _ in chunk
        ]
        with torch.inference_mode():
            generated = model.generate(**processor.collate(samples), max_new_tokens=max_new_tokens)
        for (record, _, _, gt), answer in zip(chunk, processor.batch_decode(generated), strict=True):
            boxes = parse_coordinates(answer, record["width"], record["height"])
            boxes = [boxes[i] for i in suppress_duplicates(boxes, list(range(len(boxes))), None, dedup_iou)]
            total.add(boxes, gt)
            buckets[bucket_of(len(record["regions"]))].add(boxes, gt)
    return total.to_dict() | {"by_objects": {k: v.to_dict() for k, v in sorted(buckets.items())}}


def coordinate_prior(train_shards: Path, test_shards: Path) -> dict:
    """What a box writer that ignores the image scores on the coordinate model's questions: each answer is
    one box, the mean of the training boxes (each normalised to its image, then scaled to the asked one)."""
    from chatrex.metrics import DetectionCounts

    boxes = [
        [v / (record["width"], record["height"])[i % 2] for i, v in enumerate(region["box"])]
        for record, _ in training_rows(train_shards)
        for region in record["regions"]
    ]
    mean = [sum(column) / len(column) for column in zip(*boxes, strict=True)]
    counts = DetectionCounts()
    for record, _, _, gt in detection_questions(training_rows(test_shards)):
        size = (record["width"], record["height"])
        counts.add([[v * size[i % 2] for i, v in enumerate(mean)]], gt)
    return counts.to_dict() | {"box": [round(v, 3) for v in mean]}


# --- data ------------------------------------------------------------------------------------------------


def fixed_count_scenes(out: Path, n_scenes: int, n_objects: int, seed: int) -> Path:
    """Fixture-generator scenes with `n_objects` shapes each (placement may fit fewer in the image)."""
    import numpy as np

    from scaffold import make_fixture as fx

    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_scenes):
        rng = np.random.default_rng([seed, n_objects, i])
        width, height = int(rng.integers(384, 513)), int(rng.integers(384, 513))
        bg = fx.Background(list(fx.BACKGROUNDS)[int(rng.integers(0, len(fx.BACKGROUNDS)))], "plain")
        # overlap allowed (as in a third of the fixture scenes) so that crowded scenes fit their objects
        scene = fx.render_scene(rng, width, height, bg, n_objects=n_objects, allow_overlap=True)
        record = fx.ImageRecord(f"scene_{i:04d}.jpg", width, height, "scene", scene)
        fx._save_jpeg(scene.image, out / record.file_name)
        records.append(record)
    (out / "annotations.json").write_text(json.dumps(fx._coco(records, seed)))
    return out / "annotations.json"


def make_shards(annotations: Path, out: Path, distractors: int, seed: int) -> Path:
    from pipelines.coco_to_shards import convert

    convert(annotations, out, synthetic_distractors=distractors, seed=seed, shard_size=500)
    return out


# --- the run ---------------------------------------------------------------------------------------------


def stage_specs(args: argparse.Namespace) -> list[dict]:
    """The paper's three stages at bench scale (vision trains throughout: the encoders start untrained)."""
    perception = {"detect": 4.0, "detect_many": 1.0, "region": 1.0, "count": 0.5}
    common = {"lr": args.lr, "train_vision": True}
    return [
        {
            "name": "alignment",
            "steps": args.align_steps,
            "warmup_steps": 10,
            "task_weights": {"image_caption": 1.0},
        }
        | common,
        {"name": "perception", "steps": args.perception_steps, "warmup_steps": 20, "task_weights": perception}
        | common,
        {
            "name": "joint",
            "steps": args.joint_steps,
            "warmup_steps": 10,
            "task_weights": perception | {"caption": 1.0},
        }
        | common,
    ]


def train_retrieval(model: Path, train_shards: Path, out: Path, args: argparse.Namespace) -> Path:
    from pipelines import train_chatrex

    stages = stage_specs(args)
    config = {
        "name": "chatrex-bench",
        "model": str(model),
        "stages": stages,
        "batch_size": args.batch_size,
        "max_boxes": 32,
        "candidates": "proposals",
        "shuffle_buffer": 256,
        "log_every": 50,
        "seed": args.seed,
        "checkpoint_every": 500,
        # one reserved CPU: the other one reads shards for Ray Data; torch may still use both
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "torch_threads": args.threads},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.yaml").write_text(json.dumps(config))
    argv = ["--config", str(out / "train.yaml"), "--shards", str(train_shards), "--output", str(out / "run")]
    if train_chatrex.main(argv) != 0:
        raise SystemExit("training failed")
    return out / "run" / "model"


def evaluate_retrieval(
    model: Path, shards: Path, out: Path, dedup_iou: float | None, tasks: str = "detection,naming"
) -> dict:
    from pipelines import eval_chatrex

    argv = ["--model", str(model), "--shards", str(shards), "--output", str(out), "--tasks", tasks]
    argv += ["--max-boxes", "32", "--batch-size", "16", "--cpus-per-actor", "1", "--quiet"]
    if dedup_iou is not None:
        argv += ["--dedup-iou", str(dedup_iou)]
    return eval_chatrex.evaluate(eval_chatrex.parse_args(argv))


def prepare(
    model: Path, train_shards: Path, args: argparse.Namespace, weights: dict, coordinates: bool
) -> None:
    """The two stand-ins for pretrained parts (region pre-training happens once, before the copy)."""
    t = time.time()
    if coordinates:
        loss = warm_up_coordinates_on_text(
            model, train_shards, args.text_steps, weights, lr=args.text_lr, seed=args.seed
        )
    else:
        loss = warm_up_llm_on_text(
            model, train_shards, args.text_steps, weights, lr=args.text_lr, seed=args.seed
        )
    kind = "coordinates" if coordinates else "indices"
    print(
        f"text warm-up ({kind}): {args.text_steps} steps, loss {loss:.3f}, {(time.time() - t) / 60:.1f} min"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/chatrex-bench"))
    parser.add_argument("--output", type=Path, default=None, help="keep the final evaluations here")
    parser.add_argument("--train-scenes", type=int, default=3000)
    parser.add_argument("--test-scenes", type=int, default=200)
    parser.add_argument("--distractors", type=int, default=6, help="synthetic proposal model's distractors")
    parser.add_argument("--region-steps", type=int, default=1500, help="vision pre-training steps (shared)")
    parser.add_argument(
        "--bridge-steps", type=int, default=300, help="object-token alignment to the LLM's name embeddings"
    )
    parser.add_argument(
        "--dedup-iou",
        type=float,
        default=0.3,
        help="NMS of each answer's boxes (both models) and of the baselines' picks; negative: off",
    )
    parser.add_argument("--text-steps", type=int, default=1000, help="LLM warm-up steps in words (each)")
    parser.add_argument("--text-lr", type=float, default=3e-3, help="peak learning rate of the text warm-up")
    parser.add_argument("--align-steps", type=int, default=50)
    parser.add_argument("--perception-steps", type=int, default=1200)
    parser.add_argument("--joint-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of the three stages")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--seed", type=int, default=0, help="scenes, initial weights and sampling (0: the documented runs)"
    )
    parser.add_argument(
        "--reuse-pretrained",
        type=Path,
        default=None,
        help="work dir of an earlier run: reuse its shards and region-init (same data/region settings)",
    )
    parser.add_argument(
        "--part",
        choices=("all", "retrieval", "coords", "summary"),
        default="all",
        help="one model only (e.g. both in parallel with the same --output), or only the summary line",
    )
    parser.add_argument("--sweep", action="store_true", help="objects-per-image sweep + no-ConvNeXt ablation")
    parser.add_argument("--sweep-scenes", type=int, default=100)
    args = parser.parse_args()

    if args.part == "summary":
        return summary(args.output or args.work / "eval")
    import torch

    torch.set_num_threads(args.threads)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    t0 = time.time()
    from scaffold.make_fixture import generate_fixture

    shards = {}
    text_weights = {"detect": 4.0, "detect_many": 1.0, "region": 1.0, "count": 0.5}
    dedup = args.dedup_iou if args.dedup_iou >= 0 else None
    init = args.work / "init"
    if args.reuse_pretrained:  # data and region pre-training of an earlier run with the same settings
        for split in ("train", "test"):
            shutil.copytree(args.reuse_pretrained / f"{split}-shards", args.work / f"{split}-shards")
            shards[split] = args.work / f"{split}-shards"
        shutil.copytree(args.reuse_pretrained / "region-init", init)
        print(f"data and region pre-training reused from {args.reuse_pretrained}", flush=True)
    else:
        seeds = (101 + 1000 * args.seed, 202 + 1000 * args.seed)  # --seed 0: the documented runs' scenes
        for split, n, seed in (("train", args.train_scenes, seeds[0]), ("test", args.test_scenes, seeds[1])):
            scenes = args.work / f"{split}-scenes"
            generate_fixture(scenes, n=n, seed=seed)
            shards[split] = make_shards(
                scenes / "annotations.json", args.work / f"{split}-shards", args.distractors, seed
            )
        print(
            f"data: {args.train_scenes} train / {args.test_scenes} test scenes ({time.time() - t0:.0f}s)",
            flush=True,
        )
        build_small_chatrex(init, seed=args.seed)
        t1 = time.time()
        accuracy = pretrain_region_encoder(
            init, shards["train"], args.region_steps, held_out=shards["test"], seed=args.seed
        )
        print(
            f"region pre-training: {args.region_steps} steps, held-out per-candidate accuracy {accuracy}, "
            f"{(time.time() - t1) / 60:.1f} min",
            flush=True,
        )
        shutil.copytree(init, args.work / "region-init")  # reusable with --reuse-pretrained
    coords_init = args.work / "coords-init"
    shutil.copytree(init, coords_init)
    eval_dir = args.output or args.work / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    model = coords_model = None
    if args.part in ("all", "retrieval"):
        t2 = time.time()
        prepare(init, shards["train"], args, text_weights, coordinates=False)
        bridge(init, shards, args)
        model = train_retrieval(init, shards["train"], args.work / "retrieval", args)
        evaluate_retrieval(model, shards["test"], eval_dir, dedup)
        print(f"retrieval: warm-up + training + eval {(time.time() - t2) / 60:.1f} min", flush=True)
    if args.part in ("all", "coords"):
        t3 = time.time()
        prepare(coords_init, shards["train"], args, text_weights, coordinates=True)
        coords_model = train_coordinate_model(
            coords_init, shards["train"], stage_specs(args), args.batch_size, args.threads, seed=args.seed
        )
        coords = evaluate_coordinates(coords_model, shards["test"], args.threads, dedup)
        coords["image_blind_prior"] = coordinate_prior(shards["train"], shards["test"])
        print(
            f"coordinates: R@0.5 {coords['R@0.5']} P@0.5 {coords['P@0.5']}; a box writer that ignores the "
            f"image (the training boxes' mean): R@0.5 {coords['image_blind_prior']['R@0.5']} "
            f"P@0.5 {coords['image_blind_prior']['P@0.5']}",
            flush=True,
        )
        (eval_dir / "coords_metrics.json").write_text(json.dumps(coords, indent=2))
        print(f"coordinates: warm-up + training + eval {(time.time() - t3) / 60:.1f} min", flush=True)
    steps = (
        f"region {args.region_steps}, text {args.text_steps}, bridge {args.bridge_steps}, "
        f"alignment/perception/joint {args.align_steps}/{args.perception_steps}/{args.joint_steps}"
    )
    print(
        f"steps: {steps} (batch {args.batch_size}); total {(time.time() - t0) / 60:.1f} min "
        f"on {args.threads} CPU threads",
        flush=True,
    )
    if args.sweep and model is not None and coords_model is not None:
        sweep(args, model, coords_model, shards, init, dedup)
    return summary(eval_dir)


def bridge(model: Path, shards: dict, args: argparse.Namespace) -> None:
    """The retrieval model's object-token alignment (`align_object_tokens`), with its held-out accuracy."""
    t = time.time()
    accuracy = align_object_tokens(
        model, shards["train"], args.bridge_steps, held_out=shards["test"], seed=args.seed
    )
    print(
        f"object-token alignment: {args.bridge_steps} steps, held-out nearest-name accuracy {accuracy}, "
        f"{(time.time() - t) / 60:.1f} min",
        flush=True,
    )


def summary(eval_dir: Path) -> int:
    """The closing line from the retrieval (metrics.json) and coordinate (coords_metrics.json) evaluations."""
    if not (eval_dir / "metrics.json").exists() or not (eval_dir / "coords_metrics.json").exists():
        print(f"summary: {eval_dir} lacks metrics.json or coords_metrics.json (run the other --part)")
        return 0
    report = json.loads((eval_dir / "metrics.json").read_text())
    coords = json.loads((eval_dir / "coords_metrics.json").read_text())
    d = report["metrics"]["all"]["detection"]
    print(
        f"baselines: {json.dumps(d['baselines'])}; best category-blind: {d['baseline']['strategy']}; "
        f"recall ceiling (all overlapping) {d['recall_ceiling_R@0.5']}; oracle R {d['oracle_R@0.5']}; "
        f"coordinates P@0.5 {coords['P@0.5']}; naming {report['metrics']['all'].get('naming')}",
        flush=True,
    )
    print(
        f"R@0.5={d['R@0.5']:.3f} P@0.5={d['P@0.5']:.3f} baseline_R@0.5={d['baseline']['R@0.5']:.3f} "
        f"baseline_P@0.5={d['baseline']['P@0.5']:.3f} coords_R@0.5={coords['R@0.5']:.3f} mAP={d['mAP']:.3f}",
        flush=True,
    )
    return 0


def sweep(
    args: argparse.Namespace, model: Path, coords_model: Path, shards: dict, init: Path, dedup: float | None
) -> None:
    """R/P of both models as objects per image grow, and the ablation without ConvNeXt object features."""
    rows = []
    for n_objects in (1, 3, 6, 10):
        folder = args.work / f"sweep-{n_objects}"
        annotations = fixed_count_scenes(
            folder / "scenes", args.sweep_scenes, n_objects, seed=300 + n_objects
        )
        test = make_shards(annotations, folder / "shards", args.distractors, seed=300 + n_objects)
        d = evaluate_retrieval(model, test, folder / "eval", dedup, tasks="detection")["metrics"]["all"]
        d = d["detection"]
        c = evaluate_coordinates(coords_model, test, args.threads, dedup)
        objects = json.loads(annotations.read_text())
        mean = len(objects["annotations"]) / max(1, len(objects["images"]))
        rows.append((n_objects, mean, d, c))
        print(
            f"sweep {n_objects} objects (mean {mean:.2f} placed): retrieval R {d['R@0.5']} P {d['P@0.5']} | "
            f"coordinates R {c['R@0.5']} P {c['P@0.5']} | baseline R {d['baseline']['R@0.5']} "
            f"P {d['baseline']['P@0.5']} | oracle R {d['oracle_R@0.5']}",
            flush=True,
        )
    ablation = build_small_chatrex(args.work / "ablation-init", seed=args.seed, object_features="box")
    pretrain_region_encoder(ablation, shards["train"], args.region_steps, seed=args.seed)
    prepare(
        ablation,
        shards["train"],
        args,
        {"detect": 4.0, "detect_many": 1.0, "region": 1.0, "count": 0.5},
        False,
    )
    bridge(ablation, shards, args)
    ablated = train_retrieval(ablation, shards["train"], args.work / "ablation", args)
    a = evaluate_retrieval(ablated, shards["test"], args.work / "ablation-eval", dedup)["metrics"]["all"][
        "detection"
    ]
    print(
        f"ablation without ConvNeXt object features (box embedding only): R {a['R@0.5']} P {a['P@0.5']} "
        f"mAP {a['mAP']}",
        flush=True,
    )
    (args.work / "sweep.json").write_text(
        json.dumps({"by_objects": [list(r) for r in rows], "ablation_box_only": a}, indent=2, default=str)
    )


if __name__ == "__main__":
    sys.exit(main())
