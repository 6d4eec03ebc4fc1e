"""Split generated GLM-V text into reasoning, answer and grounding boxes.

GLM-4.1V writes `<think>...</think><answer>...</answer>`; the 4.5V/4.6V family writes `<think>...</think>` then
the answer without tags. Boxes are marked `<|begin_of_box|>...<|end_of_box|>` and hold (x1, y1, x2, y2) quadruples
on a 0-1000 scale in whatever bracket style the model picked ([...], [[...]], (...), <...>); the same markers also
wrap final answers that are not coordinates (`<|begin_of_box|>C<|end_of_box|>`), which stay plain answer text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

BOX_RE = re.compile(r"<\|begin_of_box\|>(.*?)(?:<\|end_of_box\|>|$)", re.S)
NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")   # 12, 12.5, 12. and .5
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


def parse_output(text: str) -> ParsedOutput:
    text = _strip_end_of_turn(text)
    out = ParsedOutput()
    rest = text
    if "<think>" in text or "</think>" in text:
        before, opened, after = text.partition("<think>")
        body = after if opened else before  # a prompt that already opened <think> leaves only </think> here
        thinking, closed, rest = body.partition("</think>")
        out.thinking = thinking.strip()
        if not closed:  # cut off while thinking: no answer yet
            out.complete = False
            return out
    if "<answer>" in rest:
        answer, closed, _ = rest.partition("<answer>")[2].partition("</answer>")
        out.complete = bool(closed)
    else:
        answer = rest.replace("</answer>", "")

    def unwrap(match: re.Match) -> str:
        boxes = _parse_boxes(match.group(1))
        if boxes is not None:
            out.boxes.extend(boxes)
        return match.group(1)

    out.answer = BOX_RE.sub(unwrap, answer).replace("<|end_of_box|>", "").strip()
    return out
