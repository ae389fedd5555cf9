"""What counts as note text (app/text.py)."""

import re
import unicodedata

import pytest

from app.text import BLANK, INVISIBLE_RANGES, NOT_UNICODE, VISIBLE, VISIBLE_PATTERN, text_problem


def test_the_invisible_ranges_are_exactly_unicodes_whitespace_control_format_and_separators():
    expected = {
        code_point
        for code_point in range(0x110000)
        if chr(code_point).isspace() or unicodedata.category(chr(code_point)) in ("Cc", "Cf", "Zs", "Zl", "Zp")
    }
    listed = {code_point for low, high in INVISIBLE_RANGES for code_point in range(low, high + 1)}
    assert listed == expected


def test_the_published_pattern_agrees_with_the_check_on_the_basic_multilingual_plane():
    published = re.compile(VISIBLE_PATTERN)
    for code_point in range(0x10000):
        if 0xD800 <= code_point <= 0xDFFF:
            continue
        character = chr(code_point)
        assert bool(published.search(character)) == bool(VISIBLE.search(character)), hex(code_point)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("CC: chest pain", None),
        ("3세 남아", None),
        ("\u200b x \u200d", None),
        (" \t\n", BLANK),
        ("\u200b\u200b\u200d", BLANK),
        ("\ufeff\u2060\u00ad\u180e", BLANK),
        ("\x00\x1f\x7f\x85", BLANK),
        ("\U000e0001\U000e0041", BLANK),  # tag characters
        ("pain \ud800", NOT_UNICODE),
        ("\udfff", NOT_UNICODE),
    ],
)
def test_text_problem(text, problem):
    assert text_problem(text) == problem
