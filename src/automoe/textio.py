"""Text that reaches a translator: always valid Unicode, and no line lost.

Invalid UTF-8 (bytes that do not decode, or the lone surrogates Python makes of them
under `surrogateescape`) becomes U+FFFD replacement characters, so every line is
translated and keeps its position; callers learn which lines were repaired.
"""

from __future__ import annotations

from collections.abc import Iterable

REPLACEMENT = "\ufffd"


def as_text(item: str | bytes) -> tuple[str, bool]:
    """(valid text, whether anything was replaced) for one line."""
    if isinstance(item, bytes | bytearray):
        try:
            return bytes(item).decode("utf-8"), False
        except UnicodeDecodeError:
            return bytes(item).decode("utf-8", errors="replace"), True
    text = str(item)
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        pass
    raw = bytearray()
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte Python could not decode (surrogateescape)
            raw.append(code - 0xDC00)
        elif 0xD800 <= code <= 0xDFFF:  # any other lone surrogate
            raw += REPLACEMENT.encode()
        else:
            raw += ch.encode()
    return raw.decode("utf-8", errors="replace"), True


def clean_lines(lines: Iterable[str | bytes]) -> tuple[list[str], list[int]]:
    """Valid text for every line, and the 0-based indices of the lines that were repaired."""
    out, repaired = [], []
    for i, item in enumerate(lines):
        text, bad = as_text(item)
        out.append(text)
        if bad:
            repaired.append(i)
    return out, repaired
