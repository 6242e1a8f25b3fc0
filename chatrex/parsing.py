"""Read and write ChatRex answers: `<ground>phrase</ground><objects><obj3><obj7></objects>`.

The model never writes coordinates; it names input boxes by index. Generations from a model in training, or
cut off by `max_new_tokens`, are often malformed, and evaluation must score them rather than crash, so
`parse_answer` is total: any input gives a (possibly empty) list and never raises.

How malformed text is read (a small state machine over the tags, text between tags kept as phrase text):
- `<ground>` opens a phrase; a new `<ground>` before the phrase got any objects drops the unfinished one.
- `</ground>` closes the phrase; `<objects>` (or directly an `<objN>`) after it starts its index list.
  `<objects>` or `<objN>` inside an unclosed phrase closes the phrase there.
- A group ends at `</objects>`, at the next `<ground>`, at non-tag text after `</ground>` (the phrase then
  has no boxes), or at the end of the text (truncated generation: the indices seen so far count).
- `<objects>` outside any phrase opens a group with an empty phrase; bare `<objN>` in running text (a
  reference such as "the dog <obj2> runs") and stray closing tags are ignored.
- Indices outside 0..num_boxes-1 are dropped, repeats keep their first position; text inside an index list
  is ignored. A group with an empty phrase and no valid index is dropped.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Grounding",
    "format_answer",
    "format_grounded_text",
    "indices_to_boxes",
    "parse_answer",
    "strip_tags",
]

# Indices longer than 9 digits are out of range for any model, and int() of huge digit strings can raise.
_TAG = re.compile(r"<(/?)(ground|objects)>|<obj(\d+)>")
_MAX_INDEX_DIGITS = 9


@dataclass
class Grounding:
    """A phrase and the indices of the input boxes it refers to (in the order the answer gave them)."""

    phrase: str
    indices: list[int] = field(default_factory=list)


def parse_answer(text: Any, num_boxes: Any) -> list[Grounding]:
    """All groundings in a generated answer; tolerant of any malformation (rules in the module docstring)."""
    try:
        return _parse(text, num_boxes)
    except Exception:  # the contract is "never raises"; the rules above should make this unreachable
        return []


def _parse(text: Any, num_boxes: Any) -> list[Grounding]:
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8", errors="replace")
    if not isinstance(text, str):
        return []
    try:
        limit = max(int(num_boxes), 0)
    except (TypeError, ValueError, OverflowError):
        limit = 0

    results: list[Grounding] = []
    state = "text"  # text | phrase | after_phrase | objects
    phrase_parts: list[str] = []
    indices: list[int] = []

    def finish() -> None:
        phrase = " ".join("".join(phrase_parts).split())
        if phrase or indices:
            results.append(Grounding(phrase, list(indices)))
        phrase_parts.clear()
        indices.clear()

    def add_index(digits: str) -> None:
        if len(digits) <= _MAX_INDEX_DIGITS:
            index = int(digits)
            if index < limit and index not in indices:
                indices.append(index)

    position = 0
    for match in _TAG.finditer(text):
        between = text[position : match.start()]
        position = match.end()
        if state == "phrase":
            phrase_parts.append(between)
        elif state == "after_phrase" and between.strip():
            finish()  # the phrase was followed by plain text: no boxes for it
            state = "text"
        closing, name, digits = match.group(1), match.group(2), match.group(3)

        if name == "ground" and not closing:
            if state in ("after_phrase", "objects"):
                finish()
            else:  # an unfinished phrase (never closed, no objects) is dropped
                phrase_parts.clear()
                indices.clear()
            state = "phrase"
        elif name == "ground":  # </ground>
            if state == "phrase":
                state = "after_phrase"
        elif name == "objects" and not closing:
            if state == "text":
                phrase_parts.clear()
                indices.clear()
            state = "objects"
        elif name == "objects":  # </objects>
            if state in ("objects", "after_phrase"):
                finish()
                state = "text"
        elif digits is not None:
            if state in ("phrase", "after_phrase"):
                state = "objects"
            if state == "objects":
                add_index(digits)

    if state == "phrase":
        phrase_parts.clear()  # truncated before the phrase closed: nothing to point at
    elif state in ("after_phrase", "objects"):
        finish()
    return results


def format_answer(groundings: Sequence[Grounding], sep: str = "") -> str:
    """Groundings -> answer text; `parse_answer(format_answer(g), n) == g` for well-formed groundings."""
    return sep.join(_format_group(g.phrase, g.indices) for g in groundings)


def _format_group(phrase: str, indices: Sequence[int]) -> str:
    objects = "".join(f"<obj{int(i)}>" for i in indices)
    return f"<ground>{phrase}</ground><objects>{objects}</objects>"


def format_grounded_text(text: str, spans: Sequence[tuple[int, int, Sequence[int]]]) -> str:
    """Wrap character spans of `text` as groups in place: a grounded caption answer.

    `spans` are (start, end, box indices); they must not overlap. Text outside the spans is kept as is.
    """
    parts: list[str] = []
    position = 0
    for start, end, indices in sorted(spans, key=lambda s: (s[0], s[1])):
        if start < position or not 0 <= start < end <= len(text):
            raise ValueError(f"span ({start}, {end}) overlaps another span or lies outside the text")
        parts.append(text[position:start])
        parts.append(_format_group(text[start:end], indices))
        position = end
    parts.append(text[position:])
    return "".join(parts)


def strip_tags(text: str) -> str:
    """The answer as plain text: grammar and index tags removed (a grounded caption's caption)."""
    return " ".join(_TAG.sub("", text).split())


def indices_to_boxes(indices: Sequence[int], boxes: Any) -> list[list[float]]:
    """Look up boxes (any (n, 4) array-like) for indices; indices out of range are skipped."""
    rows = [list(map(float, box)) for box in (boxes.tolist() if hasattr(boxes, "tolist") else boxes)]
    picked = []
    for index in indices:
        try:
            i = operator.index(index)  # ints, numpy and torch integer scalars; not floats
        except TypeError:
            continue
        if 0 <= i < len(rows):
            picked.append(rows[i])
    return picked
