"""Split generated GLM-V text into reasoning, answer and grounding boxes.

GLM-4.1V writes `<think>...</think><answer>...</answer>`; the 4.5V/4.6V family writes `<think>...</think>` then
the answer without tags. Boxes are marked `<|begin_of_box|>...<|end_of_box|>` and hold (x1, y1, x2, y2) quadruples
on a 0-1000 scale in whatever bracket style the model picked ([...], [[...]], (...), <...>); the same markers also
wrap final answers that are not coordinates (`<|begin_of_box|>C<|end_of_box|>`), which stay plain answer text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

BOX_BEGIN, BOX_END = "<|begin_of_box|>", "<|end_of_box|>"
BOX_MARKER_RE = re.compile(r"(<\|begin_of_box\|>|<\|end_of_box\|>)")
# 12, 12.5, 12. and .5; the digits after the point only after a point, else a long digit run that fails to match
# ("1111x") is retried at every split of the run (quadratic)
NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
# brackets and separators between the numbers of a box
SEPARATORS_RE = re.compile(r"[\s\[\]\(\)<>{},;:]+")
# end-of-turn tokens that show up when decoding with skip_special_tokens=False
END_OF_TURN = ("<|endoftext|>", "<|user|>", "<|observation|>", "<|assistant|>")


@dataclass
class ParsedOutput:
    thinking: str = ""
    answer: str = ""
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    complete: bool = True  # False when the text stops inside <think> or <answer> (hit the token limit)


def _parse_boxes(content: str) -> list[tuple[float, float, float, float]] | None:
    """The quadruples in one box marker, or None when the content is not coordinates."""
    tokens = [t for t in SEPARATORS_RE.split(content.strip().rstrip(".。")) if t]   # "[1,2,3,4]." ends a sentence
    # each token one whole number: "[1-2-3-4]" or "[1..2,3,4]" is text, not the box (1, -2, -3, -4) or (1, 2, 3, 4)
    if not tokens or len(tokens) % 4 or not all(NUMBER_RE.fullmatch(t) for t in tokens):
        return None
    numbers = [float(t) for t in tokens]
    return [tuple(numbers[i:i + 4]) for i in range(0, len(numbers), 4)]


def _strip_end_of_turn(text: str) -> str:
    """The text without trailing end-of-turn tokens and the whitespace around them. A loop, not a regex: an
    anchored pattern with a whitespace run in it backtracks from every start, quadratic in a long whitespace run."""
    stripped = text.rstrip()
    while stripped.endswith(END_OF_TURN):
        stripped = stripped[:stripped.rfind("<|")].rstrip()
    return stripped if stripped != text.rstrip() else text


def _unwrap_boxes(text: str, boxes: list) -> str:
    """The text without box markers; the coordinates of each innermost box (one holding no other) go to `boxes`.
    A box cut off by the token limit runs to the end; a stray end marker is dropped. Linear in the text."""
    kept: list[str] = []
    open_boxes: list[list] = []   # [where its content starts in `kept`, whether another box opened inside it]
    for part in BOX_MARKER_RE.split(text):
        if part == BOX_BEGIN:
            if open_boxes:
                open_boxes[-1][1] = True
            open_boxes.append([len(kept), False])
        elif part == BOX_END:
            if open_boxes:
                _add_boxes(kept, *open_boxes.pop(), boxes)
        else:
            kept.append(part)
    while open_boxes:
        _add_boxes(kept, *open_boxes.pop(), boxes)
    return "".join(kept)


def _add_boxes(kept: list[str], start: int, nested: bool, boxes: list) -> None:
    found = None if nested else _parse_boxes("".join(kept[start:]))
    if found is not None:
        boxes.extend(found)


def parse_output(text: str, verbatim: bool = False) -> ParsedOutput:
    """verbatim: the answer is the text exactly as generated (OCR's Markdown, HTML tables, LaTeX), see
    `_parse_verbatim`."""
    text = _strip_end_of_turn(text)
    if verbatim:
        return _parse_verbatim(text)
    out = ParsedOutput()
    rest = text
    if "<think>" in text or "</think>" in text:
        before, opened, after = text.partition("<think>")
        if not opened:   # a prompt that already opened <think> leaves only </think> here
            before, after = "", before
        thinking, closed, after = after.partition("</think>")
        out.thinking, out.complete = thinking.strip(), bool(closed)
        rest = before + after   # text outside the reasoning, on either side of it
        if not rest.strip():   # cut off while thinking: no answer yet
            return out
    if "<answer>" in rest:
        answer, closed, _ = rest.partition("<answer>")[2].partition("</answer>")
        out.complete = out.complete and bool(closed)
    else:
        answer = rest.replace("</answer>", "")
    out.answer = _unwrap_boxes(answer, out.boxes).strip()
    return out


def _parse_verbatim(text: str) -> ParsedOutput:
    """The answer kept byte for byte: no box markers taken out, no whitespace stripped, and tag-like text inside it
    left alone (a page may well show "<answer>" or "</think>"). Only the model's own wrappers come off, and only where
    the model opened them: a reasoning trace that starts the text (`<think>...</think>`, then one newline as the 4.6V
    family writes it) and GLM-4.1V's `<answer>` that opens the rest and whose `</answer>` ends it."""
    out = ParsedOutput()
    rest = text
    if text.lstrip().startswith("<think>"):
        thinking, closed, rest = text.lstrip()[len("<think>"):].partition("</think>")
        out.thinking, out.complete = thinking.strip(), bool(closed)
        if not closed:   # cut off while thinking: no answer yet
            return out
        rest = rest[1:] if rest.startswith("\n") else rest
    if rest.lstrip().startswith("<answer>"):
        inner = rest.lstrip()[len("<answer>"):]
        answer, closed, after = inner.rpartition("</answer>")
        if closed and not after.strip():   # the answer's own end closes the text; one inside the page does not
            out.answer = answer
        else:   # cut off by the token limit
            out.answer, out.complete = inner, False
        return out
    out.answer = rest
    return out
