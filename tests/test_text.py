"""Parsing of free model generations into record fields (refine/caption parsing)."""

from stages.text import check_referring, clean_generation, first_sentence, parse_category, parse_short_phrase


def test_clean_generation_takes_first_line_and_strips_labels_and_quotes():
    assert clean_generation('\n  Answer: "a red ball"\nsecond line') == "a red ball"
    assert clean_generation("...\n--\n") == ""


def test_first_sentence_cuts_capitalises_and_ends_with_period():
    assert first_sentence("a dog runs on grass. It is happy.", 40) == "A dog runs on grass."
    assert first_sentence("Caption: two cats   sleeping", 40) == "Two cats sleeping."
    assert first_sentence("one two three four five", 3) == "One two three."
    assert first_sentence("   \n ", 10) == ""
    assert first_sentence("!!! ...", 10) == ""


def test_parse_category_lowercases_strips_articles_and_clauses():
    assert parse_category("A Dog.", 3) == "dog"
    assert parse_category("Category: the red car, parked", 3) == "red car"
    assert parse_category("very big old wooden table", 2) == "very big"
    assert parse_category("123", 3) == ""
    assert parse_category("", 3) == ""


def test_parse_short_phrase():
    assert parse_short_phrase("The small brown dog on the left.", 6) == "small brown dog on the left"
    assert parse_short_phrase("a b c d e f g h", 3) == "b c d"  # article 'a' stripped first
    assert parse_short_phrase("(none)", 4) == ""


def test_referring_is_checked_against_the_rules_and_never_truncated():
    assert check_referring("The dog sitting on the left near a tree.", 5, 10) == (
        "the dog sitting on the left near a tree",
        "",
    )
    assert check_referring("The dog, sitting on the left", 5, 10) == (
        "",
        "has a comma: an expression is one clause",
    )
    assert check_referring("Man in red", 5, 10) == ("", "too few words: 3 < 5")
    words = " ".join(f"w{i}" for i in range(11))
    assert check_referring(words, 5, 10) == ("", "too many words: 11 > 10")  # rejected, not cut to 10
    assert check_referring(" ".join(f"w{i}" for i in range(10)), 5, 10)[0].split()[-1] == "w9"
    assert check_referring("TV on the wall to the left", 5, 10)[0] == "TV on the wall to the left"  # acronym
    assert check_referring("...", 5, 10)[1].startswith("no words")
