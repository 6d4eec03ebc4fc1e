"""A thinking budget: a row that has reasoned `max_thinking_tokens` tokens inside `<think>` is made to answer.

When the budget runs out the row's next tokens are forced to `</think>` plus what the family's chat template puts
before the answer (GLM-4.1V: `<answer>`, as zai-org's own benchmark script appends; GLM-4.5V/4.6V: a newline), and it
goes on generating its answer. Its finish_reason is then "thinking_budget" (unless `max_new_tokens` cuts the answer:
"length"). Everything runs on the device, per slot, with no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

NO_BUDGET = 2**62
ANSWER_OPENERS = {"glm41v": ["</think>", "<answer>"], "glm46v": ["</think>", "\n"]}


@dataclass(frozen=True)
class ThinkingMarkers:
    open_id: int  # <think>
    close_ids: tuple[int, ...]  # forced when the budget runs out; starts with </think>


def markers_from_tokenizer(tokenizer, family: str) -> ThinkingMarkers:
    """Token ids of a GLM-V tokenizer (glmv's GlmTokenizer) for the given processor family."""
    ids = []
    for text in ANSWER_OPENERS[family]:
        token = tokenizer.convert_tokens_to_ids(text)
        ids.extend([token] if token is not None else tokenizer.encode(text, add_special_tokens=False))
    open_id = tokenizer.convert_tokens_to_ids("<think>")
    if open_id is None or tokenizer.convert_tokens_to_ids("</think>") is None:
        raise ValueError("this tokenizer has no <think> / </think> tokens: max_thinking_tokens needs a thinking model")
    return ThinkingMarkers(open_id, tuple(ids))


def markers_for_checkpoint(path: str | Path) -> ThinkingMarkers:
    from glmv.processor import Glm4vProcessor

    processor = Glm4vProcessor.from_pretrained(path)
    return markers_from_tokenizer(processor.tokenizer, processor.family)


def starts_inside(prompt_ids: list[int], markers: ThinkingMarkers) -> bool:
    """Whether a prompt ends inside an open <think> block (a template that opens it for the model)."""
    opened = max((i for i, t in enumerate(prompt_ids) if t == markers.open_id), default=-1)
    closed = max((i for i, t in enumerate(prompt_ids) if t == markers.close_ids[0]), default=-1)
    return opened > closed


class ThinkingBudget:
    """Per-slot state on the device: inside <think>, tokens thought, budget, position in the forced sequence."""

    def __init__(self, markers: ThinkingMarkers, slots: int, device):
        self.open_id, self.close_id = markers.open_id, markers.close_ids[0]
        self.forced = torch.tensor(markers.close_ids, dtype=torch.long, device=device)  # (F,)
        self.inside = torch.zeros(slots, dtype=torch.bool, device=device)
        self.count = torch.zeros(slots, dtype=torch.long, device=device)
        self.budget = torch.full((slots,), NO_BUDGET, dtype=torch.long, device=device)
        self.forcing = torch.full((slots,), -1, dtype=torch.long, device=device)  # index into forced, -1 = not
        self.hit = torch.zeros(slots, dtype=torch.bool, device=device)

    def reset(self, slots: torch.Tensor, budgets: torch.Tensor, inside: torch.Tensor) -> None:
        self.inside[slots], self.budget[slots] = inside, budgets
        self.count[slots], self.forcing[slots], self.hit[slots] = 0, -1, False

    def apply(self, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Replace the chosen tokens (B,) of forcing slots, then update the state of `active` slots."""
        forcing = active & (self.forcing >= 0)
        tokens = torch.where(forcing, self.forced[self.forcing.clamp(0, len(self.forced) - 1)], tokens)
        step = torch.where(forcing, self.forcing + 1, self.forcing)
        self.forcing.copy_(torch.where(step >= len(self.forced), -1, step))
        was_inside = self.inside.clone()
        self.inside.copy_(torch.where(active & (tokens == self.open_id), True, self.inside))
        self.inside.copy_(torch.where(active & (tokens == self.close_id), False, self.inside))
        self.count.add_(active & was_inside & self.inside)  # tokens strictly inside the block
        start = active & self.inside & (self.count >= self.budget) & (self.forcing < 0) & ~forcing
        self.forcing.copy_(torch.where(start, 0, self.forcing))
        self.hit.copy_(self.hit | start)
        return tokens
