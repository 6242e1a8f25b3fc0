"""Turn free model generations into the exact field formats of the record.

Generations are noisy (chatty prefixes, several lines, quotes, trailing lists). Every parser here is
total: any input gives a cleaned string or "" (empty = unusable, the caller drops with a reason).
"""

from __future__ import annotations

import re

_LABEL = re.compile(
    r"^\s*(answer|description|caption|category|short phrase|phrase|referring expression|expression|output)"
    r"\s*[:\-]\s*",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"(?<=[.!?])(\s|$)")
_ARTICLES = ("a ", "an ", "the ")
_KEEP_CATEGORY = re.compile(r"[^a-z0-9 \-]")


def clean_generation(text: str) -> str:
    """First non-empty line, without a leading label ("Answer:"), quotes or extra whitespace."""
    for line in text.replace("\r", "\n").split("\n"):
        line = _LABEL.sub("", line).strip().strip("\"'`*").strip()
        if any(ch.isalnum() for ch in line):
            return " ".join(line.split())
    return ""


def first_sentence(text: str, max_words: int) -> str:
    """One sentence, at most `max_words` words, capitalised and ending with a period ("" if none)."""
    line = clean_generation(text)
    match = _SENTENCE_END.search(line)
    sentence = line[: match.start()] if match else line
    words = sentence.split()[:max_words]
    if not words:
        return ""
    sentence = " ".join(words).rstrip(",;:- ")
    if not sentence or not any(ch.isalpha() for ch in sentence):
        return ""
    sentence = sentence[0].upper() + sentence[1:]
    return sentence if sentence[-1] in ".!?" else sentence + "."


def _strip_article(text: str) -> str:
    lowered = text.lower()
    for article in _ARTICLES:
        if lowered.startswith(article):
            return text[len(article) :]
    return text


def _first_clause(text: str) -> str:
    """Text before the first sentence or clause break."""
    return re.split(r"[.;:!?,(\[]", text, maxsplit=1)[0].strip()


def parse_category(text: str, max_words: int) -> str:
    """A lowercase category name ("red car" -> kept as "red car"; "A dog." -> "dog"), or ""."""
    name = _first_clause(clean_generation(text)).lower()
    name = _KEEP_CATEGORY.sub(" ", _strip_article(name))
    words = name.split()[:max_words]
    return " ".join(words) if any(ch.isalpha() for ch in "".join(words)) else ""


def parse_short_phrase(text: str, max_words: int) -> str:
    """A short lowercase noun phrase without a leading article or trailing punctuation, or ""."""
    phrase = _strip_article(_first_clause(clean_generation(text)).lower())
    words = phrase.split()[:max_words]
    return " ".join(words) if any(ch.isalpha() for ch in "".join(words)) else ""


def check_referring(text: str, min_words: int, max_words: int) -> tuple[str, str]:
    """(expression, "") if the generation is a referring expression within the rules, else ("", reason).

    The rules (paper §4.1): one clause of `min_words`..`max_words` whitespace-separated words and no commas.
    An answer outside them is rejected with the reason (the caller may retry once with it), never cut or
    padded into range: a truncated expression may no longer single out its object.
    """
    line = clean_generation(text)
    match = _SENTENCE_END.search(line)
    line = (line[: match.start()] if match else line).strip(" .!?:-")
    if not any(ch.isalpha() for ch in line):
        return "", "no words: the answer is empty"
    if "," in line or ";" in line:
        return "", "has a comma: an expression is one clause"
    words = line.split()
    if len(words) < min_words:
        return "", f"too few words: {len(words)} < {min_words}"
    if len(words) > max_words:
        return "", f"too many words: {len(words)} > {max_words}"
    first = words[0] if words[0].isupper() else words[0][0].lower() + words[0][1:]  # keep acronyms
    return " ".join([first, *words[1:]]), ""
