"""Turning the few logged examples into text: decoding, redaction, marked-up cells, and the data-map image.

Host-side and pure (lists in, strings out); only the rows about to be logged ever get here.
"""

from __future__ import annotations

import codecs
import difflib
import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Decoder = Any  # None, a Hugging Face tokenizer, or a callable list[int] -> str


def validate_decoder(decode: Decoder) -> None:
    if decode is None or callable(decode) or hasattr(decode, "batch_decode"):
        return
    raise ValueError(
        f"`decode` must be None (bytes, else ids), a Hugging Face tokenizer or a callable list[int] -> str, got {decode!r}."
    )


def token_pieces(ids: Sequence[int], decode: Decoder = None) -> list[str]:
    """The text of each token, so that marks can be placed on tokens.

    - A Hugging Face tokenizer (anything with ``batch_decode``): each token decoded alone.
    - A callable: called with ``[id]`` for each token.
    - None: byte-level if every id is below 256 (UTF-8, a multi-byte character goes to the token that completes
      it, invalid bytes become U+FFFD), else the ids themselves, ``[id]`` each.
    """
    ids = [int(i) for i in ids]
    if decode is not None and hasattr(decode, "batch_decode"):
        return list(decode.batch_decode([[i] for i in ids]))
    if decode is not None:
        return [str(decode([i])) for i in ids]
    if all(0 <= i < 256 for i in ids):
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces = [decoder.decode(bytes([i])) for i in ids]
        if pieces:
            pieces[-1] += decoder.decode(b"", final=True)
        return pieces
    return [f"[{i}]" for i in ids]


@dataclass
class Segment:
    """A stretch of the text as logged: the token it shows (None for text between tokens or redacted text)."""

    text: str
    token: int | None


def redacted_segments(pieces: Sequence[str], redact: Callable[[str], str] | None) -> list[Segment]:
    """The example's text after ``redact``, cut into segments that keep their token where the token's text
    survived redaction unchanged.

    ``redact`` sees the whole plain text, never text with marks in it (a mark inside a secret would hide the secret
    from a pattern). Tokens inside text that ``redact`` changed lose their identity: their text is what ``redact``
    returned and they are not marked.
    """
    plain = "".join(pieces)
    shown = redact(plain) if redact is not None else plain
    if not isinstance(shown, str):
        raise TypeError(f"`redact` must return a str, got {type(shown).__name__}.")
    starts, pos = [], 0
    for piece in pieces:
        starts.append(pos)
        pos += len(piece)
    if shown == plain:
        return [Segment(p, i) for i, p in enumerate(pieces)]
    # Map character offsets of unchanged stretches from the plain text to the redacted one.
    kept: list[tuple[int, int, int]] = []  # (plain start, plain end, offset into shown)
    for op, a0, a1, b0, _ in difflib.SequenceMatcher(None, plain, shown, autojunk=False).get_opcodes():
        if op == "equal":
            kept.append((a0, a1, b0 - a0))
    spans: list[tuple[int, int, int]] = []  # (shown start, shown end, token)
    for i, (start, piece) in enumerate(zip(starts, pieces)):
        end = start + len(piece)
        for a0, a1, shift in kept:
            if piece and a0 <= start and end <= a1:
                spans.append((start + shift, end + shift, i))
                break
    segments, pos = [], 0
    for s, e, i in spans:
        if s > pos:
            segments.append(Segment(shown[pos:s], None))
        segments.append(Segment(shown[s:e], i))
        pos = e
    if pos < len(shown):
        segments.append(Segment(shown[pos:], None))
    return segments


_MARKDOWN_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]#~"} | {"<": "&lt;", ">": "&gt;", "\n": "↵", "\r": "", "\t": "⇥"})


def markdown_escape(text: str) -> str:
    return text.translate(_MARKDOWN_SPECIAL)


def _visible(text: str) -> str:
    """A marked token's text with whitespace made visible (a bold space shows nothing)."""
    return text.replace(" ", "␣") if text.strip() == "" else text


def marked_markdown(segments: Sequence[Segment], marked: set[int]) -> str:
    """The text in markdown, the ``marked`` tokens in bold (neighbouring marked tokens in one bold run: ``****``
    would not render)."""
    out, run = [], []
    for seg in segments:
        if seg.token in marked and seg.text:
            run.append(seg.text)
            continue
        if run:
            out.append(f"**{markdown_escape(_visible(''.join(run)))}**")
            run = []
        out.append(markdown_escape(seg.text))
    if run:
        out.append(f"**{markdown_escape(_visible(''.join(run)))}**")
    return "".join(out)


def marked_html(segments: Sequence[Segment], token_loss: Sequence[float], token_saliency: Sequence[float], marked: set[int]) -> str:
    """The text as HTML: each token's background as red as its loss is high (relative to the example's highest),
    its loss and saliency in a tooltip, the ``marked`` tokens outlined."""
    finite = [v for v in token_loss if v is not None and math.isfinite(v)]
    top = max(finite) if finite else 1.0
    spans = []
    for seg in segments:
        text = html.escape(seg.text).replace("\n", "↵<br>")
        if seg.token is None:
            spans.append(text)
            continue
        loss = token_loss[seg.token] if seg.token < len(token_loss) else float("nan")
        sal = token_saliency[seg.token] if seg.token < len(token_saliency) else float("nan")
        alpha = max(0.0, min(1.0, loss / top)) if math.isfinite(loss) and top > 0 else 0.0
        style = f"background:rgba(255,0,0,{alpha:.2f})"
        if seg.token in marked:
            style += ";outline:1px solid black;font-weight:bold"
        title = f"loss {loss:.3f}" + (f", saliency {sal:.3g}" if math.isfinite(sal) else "")
        spans.append(f'<span style="{style}" title="{title}">{text}</span>')
    return '<div style="font-family:monospace;white-space:pre-wrap">' + "".join(spans) + "</div>"


def top_tokens(values: Sequence[float], n: int, by_abs: bool = False) -> list[int]:
    """Indices of the ``n`` largest finite values (by absolute value with ``by_abs``), largest first."""
    finite = [(abs(v) if by_abs else v, i) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    return [i for _, i in sorted(finite, key=lambda x: (-x[0], x[1]))[:n]]


def token_list(indices: Sequence[int], values: Sequence[float], segments: Sequence[Segment] | None) -> str:
    """``"tok" 7.21; "x" 5.02`` (with text) or ``@12 7.21; @40 5.02`` (positions only; also for tokens whose
    text was redacted)."""
    shown = {seg.token: seg.text for seg in segments or () if seg.token is not None}
    parts = []
    for i in indices:
        label = repr(shown[i]) if i in shown else f"@{i}"
        parts.append(f"{label} {values[i]:.3g}")
    return "; ".join(parts)


def data_map_image(confidence: Sequence[float], variability: Sequence[float], suspicious: Sequence[bool], size: int = 400) -> Any:
    """Dataset cartography's data map as an ``H×W×3`` uint8 array: variability on x (0 to 0.5), confidence on y
    (0 to 1), every id a grey point, the suspicious ones red."""
    import numpy as np
    from PIL import Image, ImageDraw

    margin = 40
    image = Image.new("RGB", (size + margin + 10, size + margin + 10), "white")
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = margin, 10, margin + size, 10 + size
    draw.rectangle([x0, y0, x1, y1], outline="black")
    for frac in (0.0, 0.5, 1.0):
        draw.text((x0 + frac * size - 8, y1 + 4), f"{0.5 * frac:.2f}", fill="black")
        draw.text((2, y1 - frac * size - 5), f"{frac:.1f}", fill="black")
    draw.text((x0 + size // 2 - 30, y1 + 20), "variability", fill="black")
    draw.text((x0 + 4, y0 + 2), "confidence", fill="black")

    def point(c: float, v: float) -> tuple[float, float]:
        return x0 + min(max(v / 0.5, 0.0), 1.0) * size, y1 - min(max(c, 0.0), 1.0) * size

    for mark in (False, True):  # suspicious points on top
        for c, v, s in zip(confidence, variability, suspicious):
            if bool(s) != mark or not (math.isfinite(c) and math.isfinite(v)):
                continue
            x, y = point(c, v)
            r = 3 if mark else 2
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(220, 0, 0) if mark else (120, 120, 120))
    return np.asarray(image, dtype=np.uint8)
