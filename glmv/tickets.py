"""What callers hand an engine and get back: a ticket per added prompt batch, a row per prompt, its output."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from glmv.prompts import Prompt, PromptBatch


@dataclass
class RowOutput:
    tokens: list[int]  # generated, eos included
    reason: str  # eos, length, thinking_budget
    vision_s: float  # of the admission round that started this row
    prefill_s: float
    decode_s: float  # from the end of its prefill until its finish was seen


@dataclass(eq=False)
class Row:
    ticket: "Ticket"
    prompt: Prompt
    max_new: int
    seed: int
    budget: int  # thinking budget (thinking.NO_BUDGET: none)
    timing: tuple[float, float, float] = (0.0, 0.0, 0.0)  # vision_s, prefill_s, prefill end
    restarted: bool = False  # preempted once: its group's prefix may be gone, so it prefills its whole prompt

    @property
    def group(self) -> tuple[int, int] | None:
        """Its prefix group across the engine's tickets (None: it prefills its whole prompt)."""
        if self.prompt.group is None or self.restarted:
            return None
        return self.ticket.number, self.prompt.group


class Ticket:
    """One `Engine.add`: its rows' outputs in the batch's order once all have finished, or the error that failed them.

    Hooks, called in the engine's thread: on_admit(prompt indices) before rows of this ticket are prefilled,
    on_leave() when none of its rows is in a slot any more (finished, failed or preempted)."""

    def __init__(self, number: int, batch: PromptBatch, exclusive: bool = False,
                 on_admit: Callable[[list[int]], None] | None = None, on_leave: Callable[[], None] | None = None):
        self.number, self.batch, self.exclusive = number, batch, exclusive
        self.on_admit, self.on_leave = on_admit, on_leave
        self.outputs: list[RowOutput | None] = [None] * len(batch.prompts)
        self.remaining, self.in_slots = len(batch.prompts), 0
        self.error: BaseException | None = None
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> list[RowOutput]:
        if not self._done.wait(timeout):
            raise TimeoutError(f"ticket {self.number}: {self.remaining} rows still running")
        if self.error is not None:
            raise self.error
        return self.outputs

    def finish(self, error: BaseException | None = None) -> None:
        self.error = self.error or error
        self._done.set()


def queue_order(batch: PromptBatch) -> list[int]:
    """Prompts in the caller's order, except that a prefix group's members follow its first one."""
    order, queued = [], set()
    for p in batch.prompts:
        members = batch.groups[p.group].members if p.group is not None else [p.index]
        order.extend(m for m in members if m not in queued)
        queued.update(members)
    return order
