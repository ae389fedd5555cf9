"""What the service accepts as a note's text: valid Unicode with at least one visible character.

Blank means nothing but whitespace, control characters (Cc), format characters (Cf: zero-width spaces and
joiners, bidirectional marks, the byte-order mark...) and separators (Z*): a note of `\\u200b\\u200d` shows
nothing to a clinician, so the model must not score it either. A lone surrogate (`"\\ud800"` in JSON, or
text decoded from a charset that allows them) is not text at all: the tokenizer cannot take it.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

# Code points (inclusive ranges) that are whitespace, Cc, Cf or Z* in Unicode 14 (Python 3.11's unicodedata);
# tests/app/test_text.py checks this list against unicodedata, so a Unicode upgrade shows up there.
INVISIBLE_RANGES = (
    (0x0000, 0x0020),
    (0x007F, 0x00A0),
    (0x00AD, 0x00AD),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x1680, 0x1680),
    (0x180E, 0x180E),
    (0x2000, 0x200F),
    (0x2028, 0x202F),
    (0x205F, 0x2064),
    (0x2066, 0x206F),
    (0x3000, 0x3000),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x13438),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
)


def _character_class(ranges: tuple[tuple[int, int], ...]) -> str:
    def escape(code_point: int) -> str:
        return f"\\u{code_point:04x}" if code_point <= 0xFFFF else f"\\U{code_point:08x}"

    return "".join(escape(low) if low == high else f"{escape(low)}-{escape(high)}" for low, high in ranges)


VISIBLE = re.compile(f"[^{_character_class(INVISIBLE_RANGES)}]")
# The same class for JSON Schema (ECMA-262 patterns without the `u` flag have no escape for code points past
# U+FFFF): the published `pattern` leaves out the few invisible characters outside the Basic Multilingual Plane.
VISIBLE_PATTERN = f"[^{_character_class(tuple(r for r in INVISIBLE_RANGES if r[1] <= 0xFFFF))}]"
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


BLANK = "is blank (only whitespace, control or format characters)"
NOT_UNICODE = "holds a lone surrogate code point (not valid Unicode text)"


def text_problem(text: str) -> str | None:
    """Why `text` cannot be classified as a note (BLANK or NOT_UNICODE), or None when it can."""
    if _LONE_SURROGATE.search(text):
        return NOT_UNICODE
    if not VISIBLE.search(text):
        return BLANK
    return None


def _valid_note_text(text: str) -> str:
    problem = text_problem(text)
    if problem is not None:
        raise ValueError(f"the note text {problem}")
    return text


NoteText = Annotated[
    str, Field(min_length=1, json_schema_extra={"pattern": VISIBLE_PATTERN}), AfterValidator(_valid_note_text)
]
"""A request field holding a note: valid Unicode text with a visible character (422/400 otherwise)."""
