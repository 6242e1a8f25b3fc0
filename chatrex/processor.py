"""ChatRex processor: one code path that turns (image, boxes, question[, answer]) into model inputs.

Training and inference must build the prompt identically, or the model sees at test time a layout it never
trained on; so both go through `ChatRexProcessor.encode` (one sample, numpy, cheap to ship between Ray
workers) and `ChatRexProcessor.collate` (a padded batch of torch tensors).

Tokens added to the LLM tokenizer, in this order, with contiguous ids (`add_chatrex_tokens`):

    <obj0> <obj1> ... <obj{N-1}>    index tokens (N = num_object_tokens, default 100). In the prompt
                                    `<obj{i}>` names input box i; in answers it points at box i. Box i is
                                    the i-th box the caller passed (after truncation to the first N).
    <ground> </ground>              wrap a phrase in an answer
    <objects> </objects>            wrap the index tokens of the boxes that phrase refers to
    <image>                         image placeholder: the prompt holds T of them (T = image grid squared,
                                    e.g. 24*24 = 576); the model replaces each with one projected image token
    <roi>                           object placeholder: one after each index token; the model replaces it with
                                    that box's object feature (RoIAlign + box position embedding, projected)

The index and grammar tokens are ordinary added tokens, so `decode(..., skip_special_tokens=True)` keeps them
for `parse_answer`; `<image>` and `<roi>` are special tokens and disappear from decoded text.

Layout of the user message (n = number of boxes after truncation, may be 0):

    <image><image>...<image>            T placeholders
    \\n
    <obj0><roi><obj1><roi>...<obj{n-1}><roi>     (empty when n == 0)
    \\n
    {question}

With `question_first` (a processor and model config setting, off by default) the question comes before the
object tokens instead (`<image>...\\n{question}\\n<obj0><roi>...`): with causal attention each object token
can then attend to the question, which a small LLM trained from scratch learns far faster from (measured in
docs/chatrex.md).

The message is rendered with the LLM tokenizer's chat template (an optional system prompt first). With the
Qwen ChatML template a training sample reads (one string, broken here for width):

    <|im_start|>user\\n<image>x T\\n<obj0><roi>...\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

and an inference prompt ends after `<|im_start|>assistant\\n` (`add_generation_prompt=True`). The prompt and
the completion are tokenised separately and concatenated, so the prompt ids are identical in both cases.
`labels` are -100 everywhere except the answer tokens and the end-of-turn token that closes the answer
(`<|im_end|>` for ChatML), so the model learns to stop; what the template puts after it (a newline) is masked.

Answers that ground phrases use `<ground>PHRASE</ground><objects><obj3><obj7></objects>`; several groups may
follow each other or sit inside running text (grounded captions). See `chatrex/parsing.py`.

Images are resized to squares (no crop, so every box stays visible) at two resolutions and normalised with
the mean/std stored in the processor config. Boxes come in absolute pixels (x0, y0, x1, y1) of the image as
given, and leave normalised to 0-1 of that image, clipped into it, with corners sorted; the first N are kept,
in the given order, so index i always means the caller's box i. Boxes are never dropped or reordered
otherwise (a box that clips to zero area keeps its index).

Padding: `collate` pads right when every sample has labels (training) and left otherwise (generation); pass
`padding_side` to override. The model derives position ids from the attention mask, so both give the same
result.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image

from chatrex.configuration import ChatRexConfig
from chatrex.parsing import Grounding, parse_answer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "GROUNDING_TOKENS",
    "GROUND_END",
    "GROUND_START",
    "IMAGE_TOKEN",
    "OBJECTS_END",
    "OBJECTS_START",
    "OBJECT_TOKEN",
    "ChatRexProcessor",
    "add_chatrex_tokens",
    "chatrex_tokens",
    "object_index_token",
]

IMAGE_TOKEN = "<image>"
OBJECT_TOKEN = "<roi>"
GROUND_START, GROUND_END = "<ground>", "</ground>"
OBJECTS_START, OBJECTS_END = "<objects>", "</objects>"
GROUNDING_TOKENS = (GROUND_START, GROUND_END, OBJECTS_START, OBJECTS_END)
IGNORE_INDEX = -100

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def encoder_statistics(encoder_config: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The pixel mean/std an encoder was trained with, from its config type (no image processor needed).

    Each encoder must see pixels normalised as in its own pre-training: HF ConvNeXt checkpoints are ImageNet
    models, CLIP towers (OpenAI and LAION, incl. the LAION CLIP ConvNeXt as a timm model) use the CLIP
    statistics, SigLIP 0.5/0.5. A timm config's own `pretrained_cfg` mean/std wins when present.
    """
    model_type = getattr(encoder_config, "model_type", "")
    if model_type == "timm_wrapper":
        pretrained = getattr(encoder_config, "pretrained_cfg", None) or {}
        if pretrained.get("mean") and pretrained.get("std"):
            return tuple(pretrained["mean"]), tuple(pretrained["std"])
        return CLIP_MEAN, CLIP_STD
    if model_type == "convnext":
        return IMAGENET_MEAN, IMAGENET_STD
    if model_type.startswith("siglip"):
        return SIGLIP_MEAN, SIGLIP_STD
    return CLIP_MEAN, CLIP_STD


PROCESSOR_CONFIG_NAME = "chatrex_processor.json"

ImageLike = Image.Image | np.ndarray


def object_index_token(index: int) -> str:
    return f"<obj{index}>"


def chatrex_tokens(num_object_tokens: int) -> list[str]:
    """Every token ChatRex adds, in id order: index tokens, grammar tokens, then the two placeholders."""
    return [object_index_token(i) for i in range(num_object_tokens)] + [
        *GROUNDING_TOKENS,
        IMAGE_TOKEN,
        OBJECT_TOKEN,
    ]


def add_chatrex_tokens(tokenizer: PreTrainedTokenizerBase, num_object_tokens: int) -> dict[str, int]:
    """Extend `tokenizer` in place with the ChatRex tokens; return the config fields holding their ids.

    The ids must be new and contiguous: the model addresses `<obj{i}>` as `start + i` and the alignment stage
    trains exactly the new rows. A tokenizer that already knows one of the spellings is refused.
    """
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    clash = [t for t in chatrex_tokens(num_object_tokens) if t in vocab]
    if clash:
        raise ValueError(
            f"the tokenizer already has ChatRex tokens {clash[:5]}; start from the plain LLM tokenizer"
        )
    start = len(tokenizer)
    words = [object_index_token(i) for i in range(num_object_tokens)] + list(GROUNDING_TOKENS)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in words])
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (IMAGE_TOKEN, OBJECT_TOKEN)],
        special_tokens=True,
    )
    ids = tokenizer.convert_tokens_to_ids(chatrex_tokens(num_object_tokens))
    if ids != list(range(start, start + len(ids))):
        raise ValueError("the tokenizer did not give the ChatRex tokens contiguous new ids")
    n = num_object_tokens
    return {
        "object_index_start_id": start,
        "ground_start_id": start + n,
        "ground_end_id": start + n + 1,
        "objects_start_id": start + n + 2,
        "objects_end_id": start + n + 3,
        "image_token_id": start + n + 4,
        "object_token_id": start + n + 5,
        "new_token_start_id": start,
        "new_token_end_id": start + n + 6,
    }


class ChatRexProcessor:
    """Images at two resolutions + boxes + chat text -> ChatRex inputs; saved next to the model."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        num_object_tokens: int = 100,
        num_image_tokens: int = 576,
        low_res_size: int = 336,
        high_res_size: int = 768,
        low_res_mean: Sequence[float] = CLIP_MEAN,
        low_res_std: Sequence[float] = CLIP_STD,
        high_res_mean: Sequence[float] = CLIP_MEAN,
        high_res_std: Sequence[float] = CLIP_STD,
        system_prompt: str | None = None,
        question_first: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.num_object_tokens = num_object_tokens
        self.num_image_tokens = num_image_tokens
        self.low_res_size = low_res_size
        self.high_res_size = high_res_size
        self.low_res_mean = tuple(float(v) for v in low_res_mean)
        self.low_res_std = tuple(float(v) for v in low_res_std)
        self.high_res_mean = tuple(float(v) for v in high_res_mean)
        self.high_res_std = tuple(float(v) for v in high_res_std)
        self.system_prompt = system_prompt
        self.question_first = bool(question_first)
        missing = [t for t in chatrex_tokens(num_object_tokens) if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(
                f"tokenizer lacks ChatRex tokens {missing[:5]}; extend it with add_chatrex_tokens"
            )
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )

    # ------------------------------------------------------------------------------------ construction

    @classmethod
    def from_model_config(
        cls, tokenizer: PreTrainedTokenizerBase, config: ChatRexConfig, **kwargs: Any
    ) -> ChatRexProcessor:
        """A processor whose sizes and token counts match `config` (what `from_parts` builders use).

        Each encoder's pixel statistics default to those of its type (`encoder_statistics`); pass
        `low_res_mean`/`low_res_std`/`high_res_mean`/`high_res_std` from the parts' own image processors
        when they are at hand (`chatrex.build` does).
        """
        low_mean, low_std = encoder_statistics(config.vision_config)
        high_mean, high_std = encoder_statistics(config.convnext_config)
        stats = {
            "low_res_mean": low_mean,
            "low_res_std": low_std,
            "high_res_mean": high_mean,
            "high_res_std": high_std,
        }
        return cls(
            tokenizer,
            num_object_tokens=config.num_object_tokens,
            num_image_tokens=config.num_image_tokens,
            low_res_size=config.low_res_size,
            high_res_size=config.high_res_size,
            question_first=config.question_first,
            **(stats | kwargs),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "processor_class": type(self).__name__,
            "num_object_tokens": self.num_object_tokens,
            "num_image_tokens": self.num_image_tokens,
            "low_res_size": self.low_res_size,
            "high_res_size": self.high_res_size,
            "low_res_mean": list(self.low_res_mean),
            "low_res_std": list(self.low_res_std),
            "high_res_mean": list(self.high_res_mean),
            "high_res_std": list(self.high_res_std),
            "system_prompt": self.system_prompt,
            "question_first": self.question_first,
        }

    def save_pretrained(self, save_directory: str | Path) -> None:
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        (folder / PROCESSOR_CONFIG_NAME).write_text(
            json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8"
        )

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **tokenizer_kwargs: Any) -> ChatRexProcessor:
        from transformers import AutoTokenizer

        folder = Path(name_or_path)
        config_file = folder / PROCESSOR_CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: is {folder} a ChatRex model folder?")
        settings = json.loads(config_file.read_text(encoding="utf-8"))
        settings.pop("processor_class", None)
        tokenizer = AutoTokenizer.from_pretrained(folder, **tokenizer_kwargs)
        return cls(tokenizer, **settings)

    # ---------------------------------------------------------------------------------------- pieces

    def build_user_content(self, num_boxes: int, question: str) -> str:
        """The user message with image and object placeholders (layout in the module docstring)."""
        objects = "".join(object_index_token(i) + OBJECT_TOKEN for i in range(num_boxes))
        images = IMAGE_TOKEN * self.num_image_tokens
        if self.question_first:
            return f"{images}\n{question}\n{objects}" if objects else f"{images}\n{question}"
        return f"{images}\n{objects}\n{question}"

    def _messages(self, content: str) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*messages, {"role": "user", "content": content}]

    def preprocess_image(self, image: ImageLike) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """(low-res CHW float32, high-res CHW float32, (width, height) of the input image)."""
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        pil = pil.convert("RGB")
        low = _resize_normalize(pil, self.low_res_size, self.low_res_mean, self.low_res_std)
        high = _resize_normalize(pil, self.high_res_size, self.high_res_mean, self.high_res_std)
        return low, high, pil.size

    def normalize_boxes(self, boxes: Any, width: int, height: int) -> np.ndarray:
        """Absolute xyxy pixels -> (n, 4) float32 in 0-1, clipped, corners sorted, first N kept in order."""
        if boxes is None:
            return np.zeros((0, 4), dtype=np.float32)
        array = np.asarray(boxes, dtype=np.float64)
        if array.size == 0:
            return np.zeros((0, 4), dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != 4:
            raise ValueError(f"boxes must have shape (n, 4) as [x0, y0, x1, y1] pixels, got {array.shape}")
        array = np.nan_to_num(array[: self.num_object_tokens], nan=0.0, posinf=0.0, neginf=0.0)
        array = array / np.array([width, height, width, height], dtype=np.float64)
        array = np.clip(array, 0.0, 1.0)
        x0, x1 = np.minimum(array[:, 0], array[:, 2]), np.maximum(array[:, 0], array[:, 2])
        y0, y1 = np.minimum(array[:, 1], array[:, 3]), np.maximum(array[:, 1], array[:, 3])
        return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)

    def tokenize(
        self, num_boxes: int, question: str, answer: str | None = None
    ) -> tuple[list[int], list[int] | None]:
        """Prompt (+ answer) ids and, with an answer, labels that keep only the answer and its end-of-turn."""
        tok = self.tokenizer
        messages = self._messages(self.build_user_content(num_boxes, question))
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tok(prompt, add_special_tokens=False).input_ids
        if answer is None:
            return prompt_ids, None
        full = tok.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(
                "the chat template renders the answer turn without the generation prompt as prefix"
            )
        completion_ids = tok(full[len(prompt) :], add_special_tokens=False).input_ids
        keep = len(completion_ids)
        if tok.eos_token_id in completion_ids:  # mask what the template adds after the closing end-of-turn
            keep = len(completion_ids) - completion_ids[::-1].index(tok.eos_token_id)
        labels = (
            [IGNORE_INDEX] * len(prompt_ids)
            + completion_ids[:keep]
            + [IGNORE_INDEX] * (len(completion_ids) - keep)
        )
        return prompt_ids + completion_ids, labels

    # ------------------------------------------------------------------------------------- main API

    def encode(
        self, image: ImageLike, boxes: Any = None, question: str = "", answer: str | None = None
    ) -> dict[str, np.ndarray]:
        """One sample as numpy arrays (`labels` only with an answer); collate batches of these."""
        low, high, (width, height) = self.preprocess_image(image)
        norm_boxes = self.normalize_boxes(boxes, width, height)
        input_ids, labels = self.tokenize(len(norm_boxes), question, answer)
        sample = {
            "input_ids": np.asarray(input_ids, dtype=np.int64),
            "pixel_values_low": low,
            "pixel_values_high": high,
            "boxes": norm_boxes,
        }
        if labels is not None:
            sample["labels"] = np.asarray(labels, dtype=np.int64)
        return sample

    def collate(
        self, samples: Sequence[dict[str, Any]], padding_side: Literal["left", "right"] | None = None
    ) -> dict[str, Any]:
        """Pad a list of `encode` outputs into tensors; `boxes` stays a list of (n_i, 4) tensors."""
        if not samples:
            raise ValueError("collate needs at least one sample")
        with_labels = ["labels" in s for s in samples]
        if any(with_labels) and not all(with_labels):
            raise ValueError("a batch mixes samples with and without answers")
        if padding_side is None:
            padding_side = "right" if all(with_labels) else "left"
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        width = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
        labels = (
            torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long) if all(with_labels) else None
        )
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            span = slice(width - n, width) if padding_side == "left" else slice(0, n)
            input_ids[row, span] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
            attention_mask[row, span] = 1
            if labels is not None:
                labels[row, span] = torch.as_tensor(sample["labels"], dtype=torch.long)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values_low": torch.stack([torch.as_tensor(s["pixel_values_low"]) for s in samples]),
            "pixel_values_high": torch.stack([torch.as_tensor(s["pixel_values_high"]) for s in samples]),
            "boxes": [torch.as_tensor(s["boxes"], dtype=torch.float32).reshape(-1, 4) for s in samples],
        }
        if labels is not None:
            batch["labels"] = labels
        return batch

    def __call__(
        self,
        images: ImageLike | Sequence[ImageLike],
        boxes: Any = None,
        questions: str | Sequence[str] = "",
        answers: str | Sequence[str] | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ) -> dict[str, Any]:
        """Encode and collate a batch. A single image takes a single (n, 4) box array and strings."""
        single = isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3)
        if single:
            images, boxes = [images], [boxes]
            questions = [questions] if isinstance(questions, str) else questions
            answers = [answers] if isinstance(answers, str) else answers
        images = list(images)
        boxes = [None] * len(images) if boxes is None else list(boxes)
        questions = [questions] * len(images) if isinstance(questions, str) else list(questions)
        answer_list: list[str | None] = [None] * len(images) if answers is None else list(answers)
        if not len(images) == len(boxes) == len(questions) == len(answer_list):
            raise ValueError(
                f"got {len(images)} images, {len(boxes)} box lists, {len(questions)} questions and "
                f"{len(answer_list)} answers; pass one of each per image"
            )
        samples = [self.encode(*args) for args in zip(images, boxes, questions, answer_list, strict=True)]
        return self.collate(samples, padding_side)

    def batch_decode(self, token_ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Generated ids -> text with index and grammar tokens kept and placeholders/EOS/padding dropped."""
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)

    def post_process_generation(
        self, token_ids: torch.Tensor | Sequence[Sequence[int]], num_boxes: Sequence[int]
    ) -> list[list[Grounding]]:
        """Generated ids -> groundings per sample (indices checked against that sample's box count)."""
        return [
            parse_answer(text, n) for text, n in zip(self.batch_decode(token_ids), num_boxes, strict=True)
        ]


def _resize_normalize(
    image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    resized = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(resized, dtype=np.float32) / 255.0
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))
