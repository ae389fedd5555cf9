"""How a text file of notes is decoded and split: shared by training's reader (training/data/readers.py) and batch
scoring (app/note_files.py).

A file that is not UTF-8 may be a Korean EMR export in CP949 / EUC-KR (EUC-KR is a subset of CP949): it is read as
CP949 when it decodes so and its non-ASCII characters are mostly Hangul, or charset-normalizer calls it Korean.
Any other guess is only named, to be confirmed by the user, since a wrong guess would silently garble the notes.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

KOREAN_ENCODINGS = {"cp949", "euc_kr", "johab", "iso2022_kr"}  # as charset-normalizer names them
HANGUL = re.compile(r"[\uac00-\ud7a3\u3131-\u318e]")
SNIFF_DELIMITERS = ",;\t|"
SNIFF_CHARS = 65536


def decode_korean(raw: bytes) -> str | None:
    """The text of CP949 / EUC-KR bytes, or None when they are not Korean text (see the module's docstring)."""
    try:
        text = raw.decode("cp949")
    except UnicodeDecodeError:
        return None
    non_ascii = [c for c in text if ord(c) > 127]
    if non_ascii and sum(bool(HANGUL.match(c)) for c in non_ascii) >= 0.5 * len(non_ascii):
        return text
    return text if guess_encoding(raw) in KOREAN_ENCODINGS else None


def guess_encoding(raw: bytes) -> str | None:
    """charset-normalizer's best guess at the encoding of `raw`, as it names it (None: no guess)."""
    from charset_normalizer import from_bytes

    best = from_bytes(raw).best()
    return None if best is None else str(best.encoding)


def not_utf8_message(path: Path, raw: bytes, error: UnicodeDecodeError) -> str:
    """What to tell the user of a file that is neither UTF-8 nor detectably Korean: where, and what to try."""
    line = raw[: error.start].count(b"\n") + 1
    guess = guess_encoding(raw)
    hint = f"it looks like {guess}: pass --encoding {guess} if so, or" if guess else "pass --encoding, or"
    return (
        f"{path}: line {line} is not valid UTF-8 (byte 0x{raw[error.start]:02x} at offset {error.start}) and not "
        f"Korean CP949/EUC-KR; {hint} re-save the file as UTF-8"
    )


def sniff_delimiter(text: str) -> str:
    """The delimiter of a delimited text (one of `SNIFF_DELIMITERS`; a comma when its header holds none of them).
    Raises csv.Error when it cannot be told."""
    header = text.split("\n", 1)[0]
    if not any(d in header for d in SNIFF_DELIMITERS):
        return ","  # a single column: nothing to sniff
    return csv.Sniffer().sniff(text[:SNIFF_CHARS], delimiters=SNIFF_DELIMITERS).delimiter
