"""Document cleaning: Unicode normalisation and white-space rules, one document at a time.

``clean_text`` applies, in this order:

1. NFC normalisation, so "é" typed as e + combining accent and as one code point are the same
   text (and the same tokens, and duplicates of each other);
2. line ends: ``\\r\\n`` and lone ``\\r`` become ``\\n``;
3. control characters other than tab and newline (C0, DEL, C1) and the byte-order mark U+FEFF
   are removed;
4. white space at the end of every line (``str.rstrip``) is removed; indentation at the start
   is kept (code and verse depend on it);
5. runs of blank lines become one blank line;
6. blank lines at the start and the end of the document are removed.

A document that is empty afterwards is dropped by the pipeline (counted as ``empty``).
"""
from __future__ import annotations

import re
import unicodedata

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")


def clean_text(text: str) -> str:
    """The document after the six rules above (idempotent: cleaning twice changes nothing)."""
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _CONTROL.search(text):
        text = _CONTROL.sub("", text)
    out, blank = [], True                         # True: drops blank lines at the start
    for line in text.split("\n"):                 # (a line loop is faster than a $ regex)
        line = line.rstrip()
        if line:
            out.append(line)
            blank = False
        elif not blank:
            out.append(line)
            blank = True
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)
