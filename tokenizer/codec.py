"""Mask codes ↔ mask words: the text side of SAMTok (spec §2), shared by data, mllm, rl and eval.

One mask is written ``<|mt_start|><|mt_AAAA|><|mt_BBBB|><|mt_end|>`` where ``AAAA = c0`` and
``BBBB = codebook_size + c1`` (token number = depth × codebook_size + code, four digits).

Parsing generated text never raises. The rules, in order:

* the text is scanned for ``<|mt_start|>``, ``<|mt_end|>`` and ``<|mt_dddd|>`` tokens;
* a span opens at a start token and closes at the next end token; a new start token, or any
  non-blank text, closes an open span first (missing end: repaired), as does the end of the text;
* code tokens directly followed by an end token without a start form a span (missing start:
  repaired); code tokens with neither delimiter, and end tokens with no codes before them, are
  ignored (counted in :attr:`ParseResult.ignored`);
* a span with more than two codes keeps the first two; a span with one code gets ``c1 = -1``
  (decode from the first code alone); a span with no code is dropped;
* ``c0`` must be a depth-0 token number (``0 <= n < codebook_size``) or the span is invalid
  (kept in the result with ``valid=False`` so that callers can count it, never decoded);
  ``c1`` must be a depth-1 number (``codebook_size <= n < 2·codebook_size``) or becomes ``-1``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

MT_START = "<|mt_start|>"
MT_END = "<|mt_end|>"
_TOKEN_RE = re.compile(r"<\|mt_(start|end|\d{4})\|>")


def code_token(number: int) -> str:
    """The word for token number ``number`` (depth × codebook_size + code)."""
    if not 0 <= number <= 9999:
        raise ValueError(f"mask token number must lie in [0, 9999], got {number}")
    return f"<|mt_{number:04d}|>"


@dataclass(frozen=True)
class MaskSpan:
    """One parsed mask span: the codes and where it sits in the text (character offsets)."""

    c0: int
    c1: int  # -1: decode from the first code only
    start: int
    end: int
    valid: bool = True  # False when c0 is out of range: counted, never decoded
    repaired: bool = False

    @property
    def codes(self) -> tuple[int, int]:
        return (self.c0, self.c1)


@dataclass
class ParseResult:
    spans: list[MaskSpan] = field(default_factory=list)
    ignored: int = 0  # stray mask tokens that could not be attached to any span

    @property
    def valid_spans(self) -> list[MaskSpan]:
        return [s for s in self.spans if s.valid]

    @property
    def codes(self) -> list[tuple[int, int]]:
        """Codes of the valid spans, in order (duplicates kept)."""
        return [s.codes for s in self.spans if s.valid]


class MaskCodec:
    """Formats and parses mask spans for a residual quantizer of ``depth`` × ``codebook_size``.

    The LLM vocabulary always holds ``2 + depth × codebook_size`` words (514 for 2 × 256), in the
    order of :attr:`tokens`. Only the first two depths are written into spans, as the release does.
    """

    def __init__(self, codebook_size: int = 256, depth: int = 2):
        if codebook_size < 1 or depth < 1 or depth * codebook_size > 10000:
            raise ValueError(f"unsupported codebook layout {depth} x {codebook_size}")
        self.codebook_size = codebook_size
        self.depth = depth

    # ---------------------------------------------------------------- vocabulary
    @property
    def tokens(self) -> list[str]:
        """All mask words in vocabulary order: start, every code of every depth, end."""
        return [MT_START] + [code_token(i) for i in range(self.depth * self.codebook_size)] + [MT_END]

    # ---------------------------------------------------------------- formatting
    def format(self, c0: int, c1: int = -1) -> str:
        """The span of one mask; ``c1 = -1`` writes a one-code span."""
        n = self.codebook_size
        if not 0 <= int(c0) < n:
            raise ValueError(f"c0 must lie in [0, {n}), got {c0}")
        if int(c1) == -1 or self.depth < 2:
            return f"{MT_START}{code_token(int(c0))}{MT_END}"
        if not 0 <= int(c1) < n:
            raise ValueError(f"c1 must lie in [0, {n}) or be -1, got {c1}")
        return f"{MT_START}{code_token(int(c0))}{code_token(n + int(c1))}{MT_END}"

    def format_many(self, codes: Iterable[Sequence[int]]) -> list[str]:
        return [self.format(int(c[0]), int(c[1]) if len(c) > 1 else -1) for c in codes]

    # ---------------------------------------------------------------- parsing
    def _finish(self, numbers: list[int], start: int, end: int, repaired: bool) -> MaskSpan | None:
        if not numbers:
            return None
        n = self.codebook_size
        c0_num = numbers[0]
        valid = 0 <= c0_num < n
        c1 = -1
        if len(numbers) > 1 and n <= numbers[1] < 2 * n:
            c1 = numbers[1] - n
        return MaskSpan(c0=c0_num if valid else -1, c1=c1 if valid else -1, start=start, end=end,
                        valid=valid, repaired=repaired)

    def parse(self, text: str) -> ParseResult:
        """Parse every mask span of ``text`` with the repair rules of the module docstring."""
        result = ParseResult()
        if not isinstance(text, str) or "<|mt_" not in text:
            return result
        open_start: int | None = None  # offset of an open span's start token
        numbers: list[int] = []  # codes of the open span, or of a stray run
        run_start: int | None = None  # offset of the first stray code (no start token)
        last_end = 0

        def close(end_offset: int, repaired: bool) -> None:
            nonlocal open_start, numbers
            span = self._finish(numbers, open_start if open_start is not None else end_offset, end_offset, repaired)
            if span is None:
                result.ignored += 1  # a start token with no code after it
            else:
                result.spans.append(span)
            open_start, numbers = None, []

        def drop_stray() -> None:
            nonlocal numbers, run_start
            if run_start is not None and numbers:
                result.ignored += len(numbers)
            numbers, run_start = [], None

        for m in _TOKEN_RE.finditer(text):
            gap = text[last_end:m.start()]
            if gap.strip():
                if open_start is not None:
                    close(last_end, repaired=True)
                else:
                    drop_stray()
            kind = m.group(1)
            if kind == "start":
                if open_start is not None:
                    close(m.start(), repaired=True)
                drop_stray()
                open_start, numbers = m.start(), []
            elif kind == "end":
                if open_start is not None:
                    close(m.end(), repaired=False)
                elif run_start is not None and numbers:
                    open_start = run_start
                    run_start = None
                    close(m.end(), repaired=True)
                else:
                    result.ignored += 1
            else:
                if open_start is None and run_start is None:
                    run_start = m.start()
                numbers.append(int(kind))
            last_end = m.end()
        if open_start is not None:
            close(last_end, repaired=True)
        else:
            drop_stray()
        return result

    def parse_codes(self, text: str) -> list[tuple[int, int]]:
        """Codes of the valid spans of ``text``, in order."""
        return self.parse(text).codes

    def replace_spans(self, text: str, fn: Callable[[int, MaskSpan], str]) -> str:
        """Replace each parsed span (valid or not) by ``fn(index, span)``."""
        out, pos = [], 0
        for k, span in enumerate(self.parse(text).spans):
            out.append(text[pos:span.start])
            out.append(fn(k, span))
            pos = span.end
        out.append(text[pos:])
        return "".join(out)

    def strip_spans(self, text: str, marker: str = "[mask {k}]") -> str:
        """Human-readable text: spans replaced by numbered markers."""
        return self.replace_spans(text, lambda k, s: marker.format(k=k))


DEFAULT_CODEC = MaskCodec()
