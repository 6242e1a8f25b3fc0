"""An input's own text (alt text, a caption column, COCO captions, a conversation), carried with its image.

Listing attaches it to the `SourceItem` as one JSON string (`{"caption": str}` and/or `{"conversation":
[{"role", "text"}]}`, "" when the input has none), so it travels through Ray as a plain column; decode puts
it into the record (`caption.input`, `grounded_conversation`) and the caption stage decides whether it
replaces or accompanies the VLM caption (`stages.caption.source`).
"""

from __future__ import annotations

import json
from typing import Any

MAX_TEXT_BYTES = 1 << 20  # a caption or conversation member larger than this is ignored
TEXT_SUFFIXES = (".txt", ".json")


def normalise_conversation(turns: Any) -> list[dict[str, str]]:
    """LLaVA/ShareGPT (`from`/`value`) or chat (`role`/`content`) turns as `{role, text}`; others skipped."""
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            return []
    result = []
    for turn in turns if isinstance(turns, list) else []:
        if not isinstance(turn, dict):
            continue
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if isinstance(role, str) and isinstance(text, str) and text.strip():
            result.append({"role": role, "text": text})
    return result


def encode_text(caption: Any = None, conversation: Any = None) -> str:
    """The JSON string carried by a listed item ("" when there is no usable text)."""
    payload: dict[str, Any] = {}
    if isinstance(caption, str) and caption.strip():
        payload["caption"] = " ".join(caption.split())
    turns = normalise_conversation(conversation) if conversation is not None else []
    if turns:
        payload["conversation"] = turns
    return json.dumps(payload, ensure_ascii=False) if payload else ""


def from_metadata(data: dict[str, Any]) -> str:
    """Text of a metadata dict (a table row, a webdataset `.json`): `caption`/`text`, `conversations`."""
    caption = data.get("caption", data.get("text"))
    conversation = data.get("conversations", data.get("conversation"))
    return encode_text(caption if isinstance(caption, str) else None, conversation)


def decode_text(text: str) -> dict[str, Any]:
    """The carried JSON string back as a dict (empty when there is none or it is unreadable)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def sample_text(members: dict[str, bytes]) -> str:
    """The carried text of a webdataset sample from its `txt` (alt text) and `json` members' bytes.

    A `.txt` member is the caption; a `.json` member may add `caption`/`text` and `conversations`.
    """
    caption = members["txt"].decode("utf-8", errors="replace") if "txt" in members else None
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            value = json.loads(members["json"].decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            value = {}
        meta = value if isinstance(value, dict) else {}
    own = meta.get("caption")
    if isinstance(own, dict):  # a Rexverse record (a pool pass's shards): the input's caption it carried
        own = own.get("input") or own.get("text")
    caption = caption or own or meta.get("text")
    return encode_text(caption, meta.get("conversations", meta.get("conversation")))
