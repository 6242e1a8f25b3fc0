"""Tiny random checkpoints for every model backend, built locally and deterministically.

Tests and the fixture config must never download weights, yet the stages should run the very code paths
they run with real checkpoints (`from_pretrained(folder)`, processors, `generate`, post-processing). So each
builder here makes a 0.5-2 MB model with random weights plus a tokenizer trained on
`tiny_corpus.txt`, saves both with `save_pretrained`, and the stages load the folder like any other.

Names are used as `tiny:<name>` wherever a config takes a model id; `resolve_model` turns them into folders.
What callers can rely on (the tests check each):

Each is saved in the format of the real checkpoint it stands in for (docs/models.md lists the fields):
- qwen2-vl, qwen2-lm: `Qwen2Tokenizer` with Qwen's 14 special tokens in the real order (ChatML, object-ref,
  box, quad and vision tokens), `<|im_end|>` = EOS, `<|endoftext|>` = pad, left padding, a chat template;
  qwen2-vl's processor has the real min/max pixels, patch 14, merge 2, temporal patch 2. "yes", "no",
  " yes", " no", "Yes", "No" are single tokens. Only whole-word tokens have non-zero LM-head rows, so greedy
  output is corpus words and never stops early: always pass `max_new_tokens`.
- grounding-dino: 30 queries, `max_text_len` 256, lowercase WordPiece in bert-base-uncased's id layout
  ([CLS] 101, [SEP] 102, `.` 1012, `?` 1029: the ids transformers splits phrases at) + the corpus words.
- siglip: `SiglipTokenizer` (sentencepiece), `</s>` = EOS = pad (id 1), model_max_length 64; call with
  `padding="max_length", truncation=True`.
- clip, owlv2: call processors with `padding="max_length", truncation=True`; EOS is the top id.
- sam2: `model_type: sam2_video` (`Sam2VideoModel`, `Sam2VideoProcessor`) as the hub's SAM 2 / 2.1; load
  with `AutoModelForMaskGeneration`; 128 px input, box prompts, 32x32 low-res masks.
- sam2-official (the `sam2` package): `checkpoint.pt` ({"model": state_dict}) + `build.json` with the hydra
  config name and overrides that rebuild it; 128 px input.
- groundingdino-official (`groundingdino-py`): SLConfig `GroundingDINO_tiny.py`, `groundingdino_tiny.pth`
  (float16 weights under "model") and the text encoder in `bert/`; 30 queries. Load it with
  `stages.backends.groundingdino_py`, which knows the config's `rexverse_swin` sizes.
- upn: ChatRex's proposal network (`upn/tiny.py`), 128 px input, 50 queries, fine and coarse prompts.
Weights are random: scores and boxes mean nothing, only shapes, dtypes and code paths do.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = ["TINY_PREFIX", "available", "cache_root", "ensure_tiny_model", "main", "resolve_model"]

TINY_PREFIX = "tiny:"

_CORPUS_PATH = Path(__file__).with_name("tiny_corpus.txt")
_REPO = Path(__file__).resolve().parents[1]
# Builders that also depend on other packages and repository files: a change there means a new folder.
_EXTRA_DEPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sam2-official": (("sam2",), ()),
    "groundingdino-official": (("groundingdino-py",), ("stages/backends/groundingdino_py.py",)),
    "upn": ((), ("upn/tiny.py", "upn/configuration_upn.py", "upn/modeling_upn.py")),
}
_SEED = 0
# Model init draws from torch's global RNG: two threads building at once would interleave their draws.
# Re-entrant so that nothing breaks if a builder ever resolves another tiny model.
_BUILD_LOCK = threading.RLock()
# Target BPE size; the corpus saturates below it (~1240 merges), so every corpus word is one token.
_BPE_VOCAB = 2048

# Qwen2 / Qwen2-VL's special tokens in the real vocabulary's order (ids 151643-151656 there; here they
# follow the trained BPE in the same order, at the top of the vocabulary as in the real one).
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# The real Qwen2-VL processor's settings (preprocessor_config.json of Qwen/Qwen2-VL-7B-Instruct)
QWEN2_VL_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384}
QWEN2_VL_PATCHES = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}

# Written for these models (not copied): the Qwen ChatML layout; string content or a list of typed parts.
_QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_QWEN_LM_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --------------------------------------------------------------------------------------------- public API


def cache_root() -> Path:
    """Where tiny models live: `$REXVERSE_CACHE/tiny-models`, else `~/.cache/rexverse/tiny-models`."""
    base = os.environ.get("REXVERSE_CACHE") or Path.home() / ".cache" / "rexverse"
    return Path(base) / "tiny-models"


def available() -> list[str]:
    """Names accepted by `ensure_tiny_model` (and as `tiny:<name>`)."""
    return sorted(_BUILDERS)


def ensure_tiny_model(name: str, cache_dir: Path | None = None) -> Path:
    """Return the folder of tiny model `name`, building it first if it is not cached yet.

    The folder name carries a hash of this module, the corpus and the library versions, so editing a
    builder (or upgrading transformers) gives a fresh folder instead of a stale one.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown tiny model {name!r}; available: {', '.join(available())}")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return build_atomically(root / f"{name}-{_spec_hash(name)}", _BUILDERS[name])


def build_atomically(final: Path, build: Callable[[Path], object]) -> Path:
    """`final`, built by `build(tmp)` into a temporary folder beside it and renamed into place.

    Concurrent callers (Ray actors on one node) may all build: one rename wins and the others drop their
    copy and use the winner's. Threads of one process build once.
    """
    if final.is_dir():
        return final
    with _BUILD_LOCK:
        if final.is_dir():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        try:
            build(tmp)
            _make_shareable(tmp)
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # a real failure, not a lost rename race
                raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model(name_or_path: str) -> str:
    """Map `tiny:<name>` to its built folder; return any other model id or path unchanged.

    `tiny:chatrex` is built from these parts by `scaffold.tiny_chatrex`; `scaffold.names` resolves both."""
    if name_or_path.startswith(TINY_PREFIX):
        return str(ensure_tiny_model(name_or_path[len(TINY_PREFIX) :]))
    return name_or_path


# ------------------------------------------------------------------------------------------------ helpers


def _spec_hash(name: str) -> str:
    """Short hash of everything a build depends on, so a changed recipe never reuses an old folder."""
    h = hashlib.sha256()
    h.update(name.encode())
    h.update(Path(__file__).read_bytes())
    h.update(_CORPUS_PATH.read_bytes())
    for dist in ("torch", "transformers", "tokenizers", "safetensors", "sentencepiece"):
        h.update(f"{dist}={importlib.metadata.version(dist)}".encode())
    dists, files = _EXTRA_DEPS.get(name, ((), ()))
    for dist in dists:
        h.update(f"{dist}={importlib.metadata.version(dist)}".encode())
    for rel in files:
        h.update((_REPO / rel).read_bytes())
    return h.hexdigest()[:10]


def _make_shareable(folder: Path) -> None:
    """mkdtemp makes 0700 folders; a cache shared by several users or services needs read access."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _corpus_lines() -> list[str]:
    return [line.strip() for line in _CORPUS_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]


def _corpus_words() -> list[str]:
    """Sorted lowercase corpus words: the WordPiece vocabulary and the 'looks like a word' test."""
    return sorted(set(re.findall(r"[a-z]+", " ".join(_corpus_lines()).lower())))


@contextmanager
def _seeded() -> Iterator[None]:
    """Seed torch for one model init without disturbing the caller's RNG state (builds run inside actors)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        yield


def _train_bpe(special_tokens: list[str]) -> Tokenizer:
    """Byte-level BPE trained on the corpus; specials get ids 0..n-1 in the given order.

    The corpus is small enough that training saturates: every corpus word becomes a single token, so text
    sampled from a random model decodes to real words (the next stage noun-chunks captions with spaCy).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB,
        min_frequency=1,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    return tok


def _qwen_tokenizer(chat_template: str) -> PreTrainedTokenizerBase:
    """Qwen's own tokenizer class (`Qwen2Tokenizer`: byte-level BPE, Qwen's pre-tokenizer that splits
    digits one by one) over a BPE trained on the corpus, the real special tokens at the top ids,
    `<|im_end|>` as EOS, `<|endoftext|>` as pad, left padding for batched generation."""
    import json

    from transformers import Qwen2Tokenizer

    model = json.loads(_train_bpe([]).to_str())["model"]
    vocab = dict(model["vocab"])
    for token in QWEN_SPECIALS:
        vocab[token] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=32768,
        errors="replace",
        split_special_tokens=False,
        chat_template=chat_template,
    )
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS)})
    for token in QWEN_SPECIALS:
        assert tok.convert_tokens_to_ids(token) == vocab[token], f"{token} moved"
    for word in ("yes", "no", " yes", " no", "Yes", "No"):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, f"{word!r} must be one token"
    return tok


def _word_only_lm_head(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> None:
    """Zero the output rows of every token that is not a whole corpus word.

    A random LM head picks byte fragments and special tokens as often as words, which decodes to mojibake
    and `<|image_pad|>`. With those rows at zero their logit is exactly 0 while the ~430 word rows keep
    random logits, so greedy decoding emits " red ball table ..." and never EOS: callers bound the length
    with max_new_tokens. "yes"/"no"/"Yes"/"No" keep their rows so answer probabilities stay random.
    """
    import torch

    words = set(_corpus_words())
    keep = torch.zeros(len(tokenizer), dtype=torch.bool)
    for token, idx in tokenizer.get_vocab().items():
        text = tokenizer.convert_tokens_to_string([token])
        if (text.startswith(" ") and text[1:].lower() in words) or text in ("yes", "no", "Yes", "No"):
            keep[idx] = True
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight[~keep[: head.weight.shape[0]]] = 0.0


def _qwen_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}


def _wordpiece_vocab() -> list[str]:
    """bert-base-uncased's layout where ids matter: [PAD] 0, [unused*] fillers, [UNK] 100, [CLS] 101,
    [SEP] 102, [MASK] 103, then from 999 the printable ASCII characters in order, so `.` is 1012 and `?`
    1029 (Grounding DINO separates phrases at exactly these ids); then ##letters (an unseen word splits
    instead of becoming [UNK]) and the corpus words."""
    vocab = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"[unused{i}]" for i in range(99, 99 + 999 - len(vocab))]
    ascii_chars = [chr(c) for c in range(ord("!"), ord("~") + 1) if not chr(c).isupper()]
    vocab += ascii_chars + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    ids = [vocab.index(token) for token in ("[CLS]", "[SEP]", ".", "?")]
    assert ids == [101, 102, 1012, 1029], ids
    return vocab + [w for w in _corpus_words() if w not in vocab]


def _wordpiece_tokenizer(vocab: list[str]) -> PreTrainedTokenizerBase:
    """Lowercase WordPiece over `vocab`, right padding (token positions match the unpadded prompt)."""
    from transformers import BertTokenizer

    # BertTokenizer(vocab=dict) is honoured; BertTokenizerFast(vocab_file=...) was silently ignored here.
    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, padding_side="right")


# ----------------------------------------------------------------------------------------------- builders


def _build_qwen2_vl(out: Path) -> None:
    """Qwen2-VL captioner: 2-layer ViT (patch 14, merge 2) + 2-layer text model, ~81 tokens per image."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _qwen_tokenizer(_QWEN_VL_CHAT_TEMPLATE)
    ids = _qwen_token_ids(tokenizer)
    settings = {**QWEN2_VL_PIXELS, **QWEN2_VL_PATCHES}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**settings),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**settings),  # the processor refuses None
        chat_template=_QWEN_VL_CHAT_TEMPLATE,
    )
    special = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            # mrope_section must sum to head_dim / 2 = 64 / 4 / 2
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            **special,
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": QWEN2_VL_PATCHES["patch_size"],
            "spatial_merge_size": QWEN2_VL_PATCHES["merge_size"],
            "temporal_patch_size": QWEN2_VL_PATCHES["temporal_patch_size"],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        **special,
    )
    with _seeded():
        model = Qwen2VLForConditionalGeneration(config).eval()
    _word_only_lm_head(model, tokenizer)
    model.generation_config.update(**special, do_sample=False)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _build_qwen2_lm(out: Path) -> None:
    """Qwen2 chat LLM for verification/rewriting; "yes", "no", " yes", " no" are single tokens."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = _qwen_tokenizer(_QWEN_LM_CHAT_TEMPLATE)
    ids = _qwen_token_ids(tokenizer)
    special = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        **special,
    )
    with _seeded():
        model = Qwen2ForCausalLM(config).eval()
    _word_only_lm_head(model, tokenizer)
    model.generation_config.update(**special, do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_grounding_dino(out: Path) -> None:
    """Grounding DINO with a tiny Swin backbone and a tiny BERT over a corpus-word WordPiece vocabulary."""
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    vocab = _wordpiece_vocab()
    tokenizer = _wordpiece_tokenizer(vocab)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 192}),
        tokenizer=tokenizer,
    )
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            image_size=128,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2],
            window_size=4,
            out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            pad_token_id=0,
        ),
        num_queries=30,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,  # 1 breaks weight tying of the shared box heads
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=256,
        pad_token_id=0,
    )
    with _seeded():
        model = GroundingDinoForObjectDetection(config).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _clip_style_tokenizer(bos: str | None, eos: str, max_length: int) -> PreTrainedTokenizerFast:
    """BPE for contrastive text towers, with BOS/EOS added after training so they get the top ids.

    CLIP/OWL pool the text at the argmax id, so EOS must be the highest; OWLv2 also treats a query whose
    first id is 0 as padding, so BOS must not be id 0.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bpe = _train_bpe([])
    bpe.add_special_tokens([t for t in (bos, eos) if t])  # ids n, n+1 in this order
    single = f"{bos + ' ' if bos else ''}$A {eos}"
    specials = [(t, bpe.token_to_id(t)) for t in (bos, eos) if t]
    bpe.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=bos,
        eos_token=eos,
        pad_token=eos,
        padding_side="right",
        model_max_length=max_length,
    )


def _sentencepiece_model() -> bytes:
    """A unigram sentencepiece model of the corpus with SigLIP's ids: `<pad>` 0, `</s>` 1, `<unk>` 2.

    One thread and no sampling: the same corpus gives the same bytes every time (checked by a test).
    """
    import io

    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines()),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=600,
        hard_vocab_limit=False,  # the corpus saturates below it
        pad_id=0,
        pad_piece="<pad>",
        eos_id=1,
        eos_piece="</s>",
        unk_id=2,
        unk_piece="<unk>",
        bos_id=-1,
        character_coverage=1.0,
        normalization_rule_name="identity",
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    return buffer.getvalue()


def _build_siglip(out: Path) -> None:
    """SigLIP image-text scorer in google/siglip-*'s format: `SiglipTokenizer` (sentencepiece), `</s>` as
    EOS and pad (id 1), `model_max_length` 64; text is pooled at the last position, so callers pad to
    max_length."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor, SiglipTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        model_file = Path(scratch) / "spiece.model"
        model_file.write_bytes(_sentencepiece_model())
        tokenizer = SiglipTokenizer(vocab_file=str(model_file), model_max_length=64)
        processor = SiglipProcessor(
            image_processor=SiglipImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer
        )
        eos = tokenizer.eos_token_id
        config = SiglipConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "max_position_embeddings": 64,
                "pad_token_id": eos,
                "bos_token_id": eos,
                "eos_token_id": eos,
            },
            vision_config={
                "image_size": 64,
                "patch_size": 16,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
            },
        )
        with _seeded():
            model = SiglipModel(config).eval()
        model.save_pretrained(out)
        processor.save_pretrained(out)


def _build_clip(out: Path) -> None:
    """CLIP image-text scorer; EOS is the highest token id and the configured eos_token_id."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = _clip_style_tokenizer("<|startoftext|>", "<|endoftext|>", max_length=77)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
        tokenizer=tokenizer,
    )
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "projection_dim": 32,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "image_size": 64,
            "patch_size": 16,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "projection_dim": 32,
        },
        projection_dim=32,
    )
    with _seeded():
        model = CLIPModel(config).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _build_owlv2(out: Path) -> None:
    """OWLv2 detector; stages use its class-agnostic `objectness_logits` + `pred_boxes` (6x6 = 36 boxes)."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tokenizer = _clip_style_tokenizer("<|startoftext|>", "<|endoftext|>", max_length=16)
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 96, "width": 96}), tokenizer=tokenizer
    )
    config = Owlv2Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "image_size": 96,
            "patch_size": 16,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        projection_dim=32,
    )
    with _seeded():
        model = Owlv2ForObjectDetection(config).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _build_sam2(out: Path) -> None:
    """SAM 2 in the hub checkpoints' format (`model_type: sam2_video`, `Sam2VideoModel`,
    `Sam2VideoProcessor`) for box prompts at 128 px: Hiera strides 4/8/16/32, 8x8 image embedding, 32x32
    mask logits, a 1-layer memory path. Load it with `AutoModelForMaskGeneration` (-> `Sam2Model`)."""
    from transformers import (
        Sam2HieraDetConfig,
        Sam2ImageProcessor,
        Sam2VideoConfig,
        Sam2VideoMaskDecoderConfig,
        Sam2VideoModel,
        Sam2VideoProcessor,
        Sam2VideoPromptEncoderConfig,
        Sam2VideoVideoProcessor,
        Sam2VisionConfig,
    )

    size = 128
    backbone = Sam2HieraDetConfig(  # must be a config object: a dict is not turned into one
        hidden_size=16,
        num_attention_heads=1,
        image_size=[size, size],
        blocks_per_stage=[1, 2, 2, 1],
        embed_dim_per_stage=[16, 32, 64, 128],
        num_attention_heads_per_stage=[1, 1, 2, 2],
        window_size_per_stage=[4, 4, 4, 4],
        global_attention_blocks=[4],  # second block of stage 3: a stage's first block may not be global
        window_positional_embedding_background_size=[4, 4],
    )
    config = Sam2VideoConfig(
        vision_config=Sam2VisionConfig(
            backbone_config=backbone,
            backbone_channel_list=[128, 64, 32, 16],
            backbone_feature_sizes=[[size // 4] * 2, [size // 8] * 2, [size // 16] * 2],
            fpn_hidden_size=32,
        ),
        prompt_encoder_config=Sam2VideoPromptEncoderConfig(
            hidden_size=32, image_size=size, patch_size=16, mask_input_channels=4
        ),
        mask_decoder_config=Sam2VideoMaskDecoderConfig(
            hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=32
        ),
        image_size=size,
        num_maskmem=2,
        memory_attention_hidden_size=32,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64,
        memory_attention_rope_feat_sizes=[size // 16] * 2,
        memory_encoder_hidden_size=32,
        memory_encoder_output_channels=16,
        mask_downsampler_embed_dim=32,
        memory_fuser_embed_dim=32,
        memory_fuser_intermediate_dim=64,
        memory_fuser_num_layers=1,
    )
    processor = Sam2VideoProcessor(
        image_processor=Sam2ImageProcessor(
            size={"height": size, "width": size}, mask_size={"height": size // 4, "width": size // 4}
        ),
        video_processor=Sam2VideoVideoProcessor(size={"height": size, "width": size}),
    )
    with _seeded():
        model = Sam2VideoModel(config).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)


_SAM2_OFFICIAL_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
_SAM2_OFFICIAL_SIZE = 128
# Hydra overrides on the package's Hiera-T config: 128 px input, a 4-stage Hiera of widths 8-64 with one
# global-attention block, 32-d prompt/mask/memory features. The SAM mask decoder's own sizes (MLP 2048,
# 8 heads) are fixed in the package; at 32-d they stay small.
_SAM2_OFFICIAL_OVERRIDES = [
    f"++model.image_size={_SAM2_OFFICIAL_SIZE}",
    "++model.image_encoder.trunk.embed_dim=8",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_spec=[4,4,4,4]",
    "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
    "++model.image_encoder.neck.d_model=32",
    "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=32",
    "++model.memory_attention.d_model=32",
    "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.d_model=32",
    "++model.memory_attention.layer.dim_feedforward=64",
    "++model.memory_attention.layer.self_attention.embedding_dim=32",
    "++model.memory_attention.layer.self_attention.feat_sizes=[8,8]",
    "++model.memory_attention.layer.cross_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[8,8]",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=16",
    "++model.memory_encoder.out_dim=16",
    "++model.memory_encoder.in_dim=32",
    "++model.memory_encoder.mask_downsampler.embed_dim=32",
    "++model.memory_encoder.position_encoding.num_pos_feats=16",
    "++model.memory_encoder.fuser.layer.dim=32",
    "++model.memory_encoder.fuser.num_layers=1",
    "++model.num_maskmem=2",
]


def _build_sam2_official(out: Path) -> None:
    """Official-package SAM 2 (`sam2.build_sam.build_sam2`) at 128 px: 8x8 image embedding, 32x32 masks."""
    import json

    import torch
    from sam2.build_sam import build_sam2

    with _seeded():
        model = build_sam2(
            _SAM2_OFFICIAL_CONFIG,
            ckpt_path=None,
            device="cpu",
            hydra_overrides_extra=list(_SAM2_OFFICIAL_OVERRIDES),
        )
    torch.save({"model": model.state_dict()}, out / "checkpoint.pt")
    spec = {
        "config": _SAM2_OFFICIAL_CONFIG,
        "checkpoint": "checkpoint.pt",
        "hydra_overrides": _SAM2_OFFICIAL_OVERRIDES,
        "image_size": _SAM2_OFFICIAL_SIZE,
    }
    (out / "build.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")


# The package's SwinT_OGC config made small. hidden_dim stays 256: the package hard-codes 256-d sine
# embeddings of text positions and query boxes. `rexverse_swin` is not a package key: the loader in
# stages.backends.groundingdino_py builds the Swin backbone with these sizes instead of the swin_T preset.
_GROUNDINGDINO_TINY_CONFIG = """\
# Tiny random Grounding DINO for tests (scaffold/tiny_models.py). Load with stages.backends.groundingdino_py.
batch_size = 1
modelname = "groundingdino"
backbone = "swin_T_224_1k"
rexverse_swin = dict(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4)
position_embedding = "sine"
pe_temperatureH = 20
pe_temperatureW = 20
return_interm_indices = [1, 2, 3]
backbone_freeze_keywords = None
enc_layers = 1
dec_layers = 1
pre_norm = False
dim_feedforward = 64
hidden_dim = 256
dropout = 0.0
nheads = 8
num_queries = 30
query_dim = 4
num_patterns = 0
num_feature_levels = 4
enc_n_points = 1
dec_n_points = 1
two_stage_type = "standard"
two_stage_bbox_embed_share = False
two_stage_class_embed_share = False
transformer_activation = "relu"
dec_pred_bbox_embed_share = True
dn_box_noise_scale = 1.0
dn_label_noise_ratio = 0.5
dn_label_coef = 1.0
dn_bbox_coef = 1.0
embed_init_tgt = True
dn_labelbook_size = 2000
max_text_len = 256
text_encoder_type = "bert"  # relative to this file's folder
use_text_enhancer = True
use_fusion_layer = True
use_checkpoint = False
use_transformer_ckpt = False
use_text_cross_attention = True
text_dropout = 0.0
fusion_dropout = 0.0
fusion_droppath = 0.0
sub_sentence_present = True
"""


def _build_groundingdino_official(out: Path) -> None:
    """groundingdino-py model: 1 encoder + 1 decoder layer at d=256, Swin of widths 8-64, 1-layer BERT.

    d=256 is fixed by the package, so the weights are saved as float16 (load_state_dict casts them back)
    to keep the folder under 5 MB.
    """
    import torch
    from transformers import BertConfig, BertModel

    from stages.backends.groundingdino_build import build_official_model

    vocab = _wordpiece_vocab()
    bert_config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=0,
    )
    with _seeded():
        bert = BertModel(bert_config).eval()
    bert.save_pretrained(out / "bert")
    _wordpiece_tokenizer(vocab).save_pretrained(out / "bert")
    config = out / "GroundingDINO_tiny.py"
    config.write_text(_GROUNDINGDINO_TINY_CONFIG, encoding="utf-8")
    with _seeded():
        model = build_official_model(config, device="cpu")
    model.half()  # in place, so tied heads keep sharing storage in the saved file
    torch.save({"model": model.state_dict()}, out / "groundingdino_tiny.pth")


def _build_image_classifier(out: Path, labels: tuple[str, ...]) -> None:
    """ViT image classifier (collection filters: NSFW, low-content) over `labels`, 64 px input."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=64,
        patch_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    with _seeded():
        torch.manual_seed(_SEED + sum(map(ord, labels[-1])))  # each classifier its own weights
        model = ViTForImageClassification(config).eval()
    model.save_pretrained(out)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(out)


def _build_upn(out: Path) -> None:
    """UPN (ChatRex's proposal network), built by `upn/tiny.py`."""
    from upn.tiny import build_tiny_upn

    build_tiny_upn(out)


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "nsfw": lambda out: _build_image_classifier(out, ("normal", "nsfw")),
    "low-content": lambda out: _build_image_classifier(out, ("content", "low-content")),
    "qwen2-vl": _build_qwen2_vl,
    "grounding-dino": _build_grounding_dino,
    "qwen2-lm": _build_qwen2_lm,
    "siglip": _build_siglip,
    "clip": _build_clip,
    "owlv2": _build_owlv2,
    "sam2": _build_sam2,
    "sam2-official": _build_sam2_official,
    "groundingdino-official": _build_groundingdino_official,
    "upn": _build_upn,
}


# ---------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """`python -m scaffold.tiny_models [--cache DIR] [names...]`: build (or find) and print each folder."""
    parser = argparse.ArgumentParser(prog="python -m scaffold.tiny_models", description=main.__doc__)
    parser.add_argument("--cache", type=Path, default=None, help=f"cache folder (default: {cache_root()})")
    parser.add_argument(
        "names", nargs="*", help=f"models to build (default: all of {', '.join(available())})"
    )
    args = parser.parse_args(argv)
    try:
        paths: dict[str, Path] = {n: ensure_tiny_model(n, args.cache) for n in (args.names or available())}
    except ValueError as err:
        parser.error(str(err))
    for name, path in paths.items():
        print(f"{name} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
