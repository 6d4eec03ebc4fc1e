"""The slot engine: a fixed number of decode slots kept full from one queue that callers add to at any time.

- `add` queues a prompt batch as a `Ticket` (glmv.tickets); a free slot takes the next queued prompt whichever ticket
  it came from: its media go through the vision tower (each distinct image/video once), its tokens are prefilled
  (packed with the other rows admitted at the same time, no padding), and it joins the decode steps. A ticket is
  done when all its rows have finished. `generate` is one ticket run until the engine is idle; a model actor keeps
  one engine for its whole life and feeds it from several threads (glmv.server), so it never drains between calls.
- The KV cache is paged (glmv.paged): a row takes blocks from one pool as it grows and gives them back when it ends.
  A pool of fixed size (`kv_blocks`) admits a row only while blocks are free, and when a decoding row needs a block
  and none is free, the youngest row is preempted: its blocks are freed, it goes back to the head of the queue and
  later runs again from its prompt (its tokens depend only on its prompt and seed, so it writes the same text). A
  pool of no fixed size grows instead, and never preempts.
- Rows of one prefix group (the tasks of one item) are queued together; the group's shared prefix is prefilled once
  into blocks of its own, each member's table points at its full blocks (the partial last one is copied), and each
  member prefills only its own suffix.
- A decode step reads only device state (`Slots`, the block tables) and writes it in place: the next token of every
  slot (sampled on the device), its output, its position. Slots that finished or hold no row keep running on a
  scratch output row and a scratch block; the host looks at which rows finished only every `check_every` steps (one
  small copy), then refills.
- An exclusive ticket's rows enter only an empty engine and nothing joins them: a row run alone, to learn which row
  fails (or kills the process) without taking others with it.
- A failure (an exception in vision, prefill or a decode step) fails the tickets of the rows it touched; the queue
  goes on.
- With compile_decode on CUDA the step is torch.compile'd and captured in a CUDA graph (again when the pool grows).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, fields

import torch

from glmv.attention import Decode, Prefill, use_varlen
from glmv.errors import InputError
from glmv.paged import PagedKVCache
from glmv.positions import IMAGE, VIDEO
from glmv.prompts import Media, PromptBatch
from glmv.sampling import SamplingParams, choose, row_keys
from glmv.thinking import NO_BUDGET, ThinkingBudget, ThinkingMarkers, starts_inside
from glmv.tickets import Row, RowOutput, Ticket, queue_order

CUDA_CHECK_EVERY = 8  # decode steps between looks at which rows finished, on CUDA (on CPU: every step)
PREFILL_TOKENS = 16384  # tokens per packed prefill pass (activation memory; a longer row goes alone)
VISION_PATCHES = 65536  # patches per vision tower pass
# positions per KV block: flash attention's paged kernel wants multiples of 256; SDPA gathers any size, and small
# blocks waste less of a row's last block and copy less of a group's partial prefix block
BLOCK_SIZE = {"cuda": 256}
DEFAULT_BLOCK_SIZE = 16


def chunks(items: list, sizes: list[int], budget: int) -> list[list]:
    """Consecutive runs of items whose sizes sum to at most budget (an item larger than budget alone)."""
    out, total = [], budget + 1
    for item, size in zip(items, sizes):
        if total + size > budget:
            out.append([])
            total = 0
        out[-1].append(item)
        total += size
    return out


@dataclass
class EngineConfig:
    """What every row of an engine shares; per-row budgets and seeds come with each ticket."""
    params: SamplingParams
    eos: list[int]
    pad: int
    slots: int
    markers: ThinkingMarkers | None = None  # needed by rows with a thinking budget
    compile_decode: bool = False
    kv_blocks: int = 0  # KV pool size in blocks; 0: the pool grows as rows need it (and never preempts)
    block_size: int = 0  # positions per block; 0: BLOCK_SIZE of the device

    def validate(self) -> None:
        self.params.validate()
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1, got {self.slots}")
        if self.kv_blocks < 0 or self.block_size < 0:
            raise ValueError(f"kv_blocks and block_size must be >= 0, got {self.kv_blocks}, {self.block_size}")


@dataclass
class EngineStats:
    """Counters over an engine's life; occupancy = live_steps / (steps * slots)."""
    slots: int
    steps: int = 0  # decode steps
    live_steps: int = 0  # slot-steps that advanced a row still generating
    tokens: int = 0  # tokens of finished rows (each row's first token comes from its prefill)
    rows: int = 0  # rows finished
    preempted: int = 0  # rows sent back to the queue for want of KV blocks
    recomputed: int = 0  # tokens those rows had generated, thrown away
    busy_s: float = 0.0  # in rounds: admission (vision, prefill), decode steps, the host's look at finished rows
    admit_s: float = 0.0  # of which admission
    kv_blocks: int = 0  # the pool's blocks (scratch included)
    kv_block_bytes: int = 0
    kv_used_blocks: int = 0  # held by rows and prefixes now
    kv_used_peak_blocks: int = 0

    @property
    def occupancy(self) -> float:
        return self.live_steps / max(1, self.steps * self.slots)


@dataclass
class Slots:
    """Per-slot decode state on the device (B slots); every field is updated in place."""
    tokens: torch.Tensor  # (B,) last chosen token: the next step's input
    cache_pos: torch.Tensor  # (B,) where that token's keys/values go
    rope_pos: torch.Tensor  # (B,)
    live: torch.Tensor  # (B,) bool: holds a row that has not finished
    n_gen: torch.Tensor  # (B,) tokens generated by the slot's row
    max_new: torch.Tensor  # (B,)
    keys: torch.Tensor  # (B, 2) sampling keys
    eos_hit: torch.Tensor  # (B,) bool
    bad: torch.Tensor  # (B,) bool: saw non-finite logits

    @classmethod
    def empty(cls, slots: int, device) -> "Slots":
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)
        return cls(zeros(slots), zeros(slots), zeros(slots), zeros(slots, dtype=torch.bool), zeros(slots),
                   zeros(slots), zeros(slots, 2), zeros(slots, dtype=torch.bool), zeros(slots, dtype=torch.bool))


class Engine:
    def __init__(self, model, config: EngineConfig, max_len: int = 0, max_new: int = 1):
        """max_len, max_new: the longest row and budget to size for at once (a growable pool and the output rows
        grow later as rows need)."""
        config.validate()
        self.model, self.c, self.device = model, config, model.device
        S = config.slots
        self.block_size = config.block_size or BLOCK_SIZE.get(self.device.type, DEFAULT_BLOCK_SIZE)
        self.cache: PagedKVCache | None = None
        self.varlen = use_varlen(torch.empty(0, dtype=model.dtype, device=self.device))
        self.state = Slots.empty(S, self.device)
        self.slot_ids = torch.arange(S, device=self.device)
        self.out = torch.full((S + 1, max(1, max_new)), config.pad, dtype=torch.long, device=self.device)  # +scratch
        self.eos = torch.tensor(config.eos, dtype=torch.long, device=self.device)
        vocab = model.config.text.vocab_size
        self.seen = (torch.zeros(S, vocab, dtype=torch.bool, device=self.device)
                     if config.params.repetition_penalty != 1.0 else None)
        self.think = ThinkingBudget(config.markers, S, self.device) if config.markers is not None else None
        self.check_every = 1 if self.device.type == "cpu" else CUDA_CHECK_EVERY
        self.queue: deque[Row] = deque()
        self.lock = threading.Lock()  # `add` may come from other threads than the one running rounds
        self.occupant: list[Row | None] = [None] * S
        self.bound = [0] * S  # host upper bound of each slot's next cache position
        self.n_gen = [0] * S  # tokens of each slot's row at the host's last look
        self.age = [0] * S  # admission order of each slot's row: the youngest is preempted first
        self.admissions = itertools.count()
        self.prefixes: dict[tuple[int, int], list[int]] = {}  # group -> its prefix blocks, until its last member
        self.fresh: list[Row] = []  # group leaders placed this round: their group's prefix is prefilled with them
        self.unadmitted: dict[tuple[int, int], int] = {}  # group -> members not yet admitted
        self.numbers = itertools.count()
        self.stats = EngineStats(slots=S)
        self.step = None
        if config.kv_blocks or max_len:
            self._new_cache(max_len or 1)

    # -- the host loop ------------------------------------------------------------------------------------------

    def add(self, batch: PromptBatch, max_new: list[int], seeds: list[int], budgets: list[int] | None = None, *,
            exclusive: bool = False, on_admit=None, on_leave=None) -> Ticket:
        """Queue a batch's prompts (per-row max_new_tokens, seeds, thinking budgets) behind those already queued."""
        n = len(batch.prompts)
        budgets = [NO_BUDGET] * n if budgets is None else budgets
        if not len(max_new) == len(seeds) == len(budgets) == n:
            raise ValueError(f"{n} prompts with {len(max_new)} max_new, {len(seeds)} seeds, {len(budgets)} budgets")
        if min(max_new, default=1) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {min(max_new)}")
        if self.think is None and any(b != NO_BUDGET for b in budgets):
            raise ValueError("thinking budgets need an engine made with thinking markers")
        with self.lock:
            ticket = Ticket(next(self.numbers), batch, exclusive, on_admit, on_leave)
            for g, group in enumerate(batch.groups):
                self.unadmitted[(ticket.number, g)] = len(group.members)
            self.queue.extend(Row(ticket, batch.prompts[i], max_new[i], seeds[i], budgets[i])
                              for i in queue_order(batch))
        if not n:
            ticket.finish()
        return ticket

    def busy(self) -> bool:
        return bool(self.queue) or any(r is not None for r in self.occupant)

    def run(self) -> None:
        """Rounds until every queued row has finished (a failure raises, after failing its tickets)."""
        while self.busy():
            self.round()

    def round(self) -> None:
        """Admit queued rows into the free slots, run `check_every` decode steps, free the slots of finished rows."""
        start = time.perf_counter()
        admitted = []
        try:
            admitted = self._take()
            if admitted:
                self._admit(admitted)
        except Exception as e:
            self._fail(e, {row.ticket for _, row in admitted} | {row.ticket for row in self.fresh})
            raise
        finally:
            self.stats.admit_s += time.perf_counter() - start
        try:
            if any(r is not None for r in self.occupant):
                self._make_decode_room()
            if any(r is not None for r in self.occupant):
                self._decode_steps()
                self._collect()
        except Exception as e:
            self._fail(e, {row.ticket for row in self.occupant if row is not None})
            raise
        finally:
            self.stats.busy_s += time.perf_counter() - start

    def _take(self) -> list[tuple[int, Row]]:
        """(slot, row) pairs to admit, their blocks taken: the queue's head into the free slots while the pool has
        blocks for them; an exclusive ticket's rows only into an empty engine, and none beside them."""
        occupied = [r for r in self.occupant if r is not None]
        if any(r.ticket.exclusive for r in occupied):
            return []
        free = [s for s, r in enumerate(self.occupant) if r is None]
        taken: list[tuple[int, Row]] = []
        unfit = None
        with self.lock:
            while self.queue and len(taken) < len(free):
                head = self.queue[0]
                alone = head.ticket.exclusive or (taken and taken[0][1].ticket.exclusive)
                if alone and (occupied or (taken and taken[0][1].ticket is not head.ticket)):
                    break
                slot = free[len(taken)]
                if not self._place(slot, head, running=len(occupied) + len(taken) + 1):
                    unfit = head if not occupied and not taken else None
                    break
                taken.append((slot, self.queue.popleft()))
        if unfit is not None:  # alone in an empty engine and still no room: free what waiting groups hold, or fail
            if self._drop_prefixes():
                return self._take()
            self._fail(self._too_long(unfit.prompt.length + 1), {unfit.ticket})
        return taken

    def _decode_steps(self) -> None:
        live = [s for s, r in enumerate(self.occupant) if r is not None]
        for _ in range(self.check_every):
            bound = max(self.bound[s] for s in live)
            self.step(self.cache.max_len if self.c.compile_decode else min(self.cache.max_len, bound + 1))
            self.bound = [n + 1 for n in self.bound]
        self.stats.steps += self.check_every

    def _collect(self) -> None:
        """One host sync: which slots' rows finished; hand their tokens to their tickets and free the slots."""
        st = self.state
        hit = self.think.hit if self.think is not None else torch.zeros_like(st.live)
        snapshot = torch.stack([t.long() for t in (st.live, st.n_gen, st.eos_hit, hit, st.bad)]).cpu()
        live, self.n_gen, eos_hit, hit, bad = snapshot.tolist()
        broken = [r.prompt.index for s, r in enumerate(self.occupant) if bad[s] and r is not None]
        if broken:  # e.g. an overflow in half precision: fail loudly rather than emit arbitrary tokens
            raise FloatingPointError(f"non-finite logits in batch rows {sorted(broken)}")
        done = [s for s, r in enumerate(self.occupant) if r is not None and not live[s]]
        if done:
            tokens = self.out[done, :max(self.n_gen[s] for s in done)].tolist()  # the finished rows only
            now = time.perf_counter()
            for slot, row_tokens in zip(done, tokens):
                row, n = self.occupant[slot], self.n_gen[slot]
                self._vacate(slot)
                reason = ("thinking_budget" if hit[slot] else "eos") if eos_hit[slot] else "length"
                vision_s, prefill_s, prefill_end = row.timing
                self.stats.rows, self.stats.tokens = self.stats.rows + 1, self.stats.tokens + n
                self.stats.live_steps += n - 1  # its first token came from the prefill
                self._finished(row, RowOutput(row_tokens[:n], reason, vision_s, prefill_s, now - prefill_end))
        self._note_kv()

    def _finished(self, row: Row, output: RowOutput) -> None:
        ticket = row.ticket
        ticket.outputs[row.prompt.index] = output
        ticket.remaining -= 1
        self._left(ticket, 1)
        if not ticket.remaining:
            ticket.finish()

    def _left(self, ticket: Ticket, rows: int) -> None:
        ticket.in_slots -= rows
        if not ticket.in_slots and ticket.on_leave is not None:
            ticket.on_leave()  # before the ticket is done: its caller may note its next position right after

    def _vacate(self, slot: int) -> None:
        """The slot holds no row from now on: its blocks go back to the pool, its steps write the scratch block."""
        self.occupant[slot] = None
        self.cache.release(slot)

    def _fail(self, error: BaseException, tickets: set[Ticket]) -> None:
        """Take every row of these tickets out of the queue and the slots, and fail the tickets."""
        numbers = {t.number for t in tickets}
        with self.lock:
            self.queue = deque(r for r in self.queue if r.ticket not in tickets)
            for key in [k for k in self.unadmitted if k[0] in numbers]:
                self.unadmitted.pop(key)
                if key in self.prefixes:
                    self.cache.pool.release(self.prefixes.pop(key))
            self.fresh = [r for r in self.fresh if r.ticket not in tickets]
        gone = [s for s, r in enumerate(self.occupant) if r is not None and r.ticket in tickets]
        for s in gone:
            self._vacate(s)
        if gone:
            self.state.live[torch.tensor(gone, device=self.device)] = False
        for ticket in tickets:
            if ticket.in_slots:
                self._left(ticket, ticket.in_slots)
            ticket.finish(error)

    def fail_all(self, error: BaseException) -> None:
        """Fail every ticket with a row queued or in a slot (the engine is closing)."""
        with self.lock:
            tickets = {r.ticket for r in self.queue}
        self._fail(error, tickets | {r.ticket for r in self.occupant if r is not None})

    # -- KV blocks: placing rows, growing them, preempting ----------------------------------------------------

    def _new_cache(self, longest: int) -> None:
        """The pool: `kv_blocks`, or (growable) room for every slot at `longest` positions."""
        width = -(-longest // self.block_size)
        blocks = self.c.kv_blocks or self.c.slots * width
        self.cache = self.model.new_cache(blocks + 1, self.block_size, self.c.slots, width)  # + the scratch block
        self._cache_changed()

    def _grow(self, blocks: int = 0, width: int = 0) -> None:
        self.cache = self.cache.grown(blocks, width)
        self._cache_changed()

    def _cache_changed(self) -> None:
        self.stats.kv_blocks, self.stats.kv_block_bytes = self.cache.blocks, self.cache.block_bytes()
        self.step = self._make_step()  # a compiled step (a CUDA graph) holds the old tensors

    def _reserve(self, slot: int, positions: int) -> bool:
        """Blocks for the slot's first `positions` positions; a growable pool grows for them, a fixed one may lack
        them (False, nothing taken)."""
        need = self.cache.blocks_for(positions)
        if need > self.cache.table.shape[1]:
            self._grow(width=need)
        if self.cache.reserve(slot, positions):
            return True
        if self.c.kv_blocks:
            return False
        self._grow(blocks=self.cache.blocks + max(need, self.cache.blocks // 2))
        return self.cache.reserve(slot, positions)

    def _place(self, slot: int, row: Row, running: int) -> bool:
        """Take the blocks a row needs to be admitted into `slot` (its prompt and first token; a new group's prefix
        too). A fixed pool also keeps a block free per other running row, so that they can grow before anyone is
        preempted. False: not now (nothing taken)."""
        if self.cache is None:
            self._new_cache(row.prompt.length + row.max_new)
        if self.cache.blocks_for(row.prompt.length + row.max_new) > self.cache.table.shape[1]:
            self._grow(width=self.cache.blocks_for(row.prompt.length + row.max_new))  # its table's whole life
        group, bs = row.group, self.block_size
        if group is not None and group not in self.prefixes:
            ids = self.cache.pool.take(self.cache.blocks_for(row.prompt.prefix_len))
            if ids is None and not self.c.kv_blocks:
                self._grow(blocks=self.cache.blocks + max(self.cache.blocks // 2, row.prompt.prefix_len // bs + 1))
                ids = self.cache.pool.take(self.cache.blocks_for(row.prompt.prefix_len))
            if ids is None:
                return False
            self.prefixes[group] = ids
            self.fresh.append(row)
        if group is not None:
            self.cache.adopt(slot, self.prefixes[group][:row.prompt.prefix_len // bs])
        headroom = running - 1 if self.c.kv_blocks else 0
        if self._reserve(slot, row.prompt.length + 1) and len(self.cache.pool.free) >= headroom:
            return True
        self.cache.release(slot)
        if self.fresh and self.fresh[-1] is row:
            self.fresh.pop()
            self.cache.pool.release(self.prefixes.pop(group))
        return False

    def _make_decode_room(self) -> None:
        """Blocks for this round's steps of every row in a slot, the oldest first; when a fixed pool runs out, the
        youngest row goes back to the queue (and a row alone that cannot grow fails)."""
        for slot in sorted((s for s, r in enumerate(self.occupant) if r is not None), key=lambda s: self.age[s]):
            row = self.occupant[slot]
            if row is None:  # preempted for an older row just now
                continue
            need = min(self.bound[slot] + self.check_every, row.prompt.length + row.max_new)
            while not self._reserve(slot, need):
                others = [s for s, r in enumerate(self.occupant) if r is not None and s != slot]
                if not others:
                    if self._drop_prefixes():
                        continue
                    self._fail(self._too_long(need), {row.ticket})
                    break
                victim = max(others + [slot], key=lambda s: self.age[s])
                self._preempt(victim)
                if victim == slot:
                    break

    def _drop_prefixes(self) -> bool:
        """Give back the blocks of the prefixes that groups hold for their members still queued (who then prefill
        their whole prompt): the last resort before a row alone in the engine is found too long. False: none."""
        if not self.prefixes:
            return False
        with self.lock:
            for row in self.queue:
                if row.group in self.prefixes:
                    row.restarted = True
            for group, ids in self.prefixes.items():
                self.cache.pool.release(ids)
                self.unadmitted.pop(group, None)
            self.prefixes.clear()
        return True

    def _too_long(self, positions: int) -> InputError:
        """A row longer than the whole pool: about that row (a long video on a small device), not the device."""
        return InputError(f"the KV pool ({self.cache.blocks - 1} blocks of {self.block_size} positions) cannot hold "
                          f"a row of {positions} positions")

    def _preempt(self, slot: int) -> None:
        """Send the slot's row back to the head of the queue; it runs again from its prompt later."""
        row, n = self.occupant[slot], self.n_gen[slot]
        self._vacate(slot)
        self.state.live[slot] = False
        self.stats.preempted += 1
        self.stats.recomputed += n
        self.stats.live_steps += max(0, n - 1)
        row.restarted = True
        self._left(row.ticket, 1)
        with self.lock:
            self.queue.appendleft(row)

    def _widen_out(self, width: int) -> None:
        out = torch.full((self.out.shape[0], width), self.c.pad, dtype=torch.long, device=self.device)
        out[:, :self.out.shape[1]] = self.out
        self.out = out
        self.step = self._make_step()

    def _note_kv(self) -> None:
        st = self.stats
        st.kv_used_blocks = self.cache.pool.in_use
        st.kv_used_peak_blocks = max(st.kv_used_peak_blocks, st.kv_used_blocks)

    # -- admission: vision, prefix, packed prefill --------------------------------------------------------------

    def _admit(self, admitted: list[tuple[int, Row]]) -> None:
        rows = [row for _, row in admitted]
        if max(row.max_new for row in rows) > self.out.shape[1]:
            self._widen_out(max(row.max_new for row in rows))
        for slot, row in admitted:
            self.occupant[slot], self.bound[slot] = row, row.prompt.length
            self.n_gen[slot], self.age[slot] = 1, next(self.admissions)
            row.ticket.in_slots += 1
        for ticket in {row.ticket for row in rows}:
            if ticket.on_admit is not None:
                ticket.on_admit([row.prompt.index for row in rows if row.ticket is ticket])
        leaders, self.fresh = self.fresh, []
        wanted = {(row.ticket.number, m): row.ticket.batch.media[m]
                  for row in leaders + [row for row in rows if row.group is None] for m in row.prompt.media}
        t0 = time.perf_counter()
        features = self._encode(wanted)
        self._sync()
        t1 = time.perf_counter()
        self._prefill_prefixes(leaders, features)
        logits = self._prefill_rows(admitted, features)
        self._start(admitted, logits)
        for row in rows:
            if row.group is not None:
                self.unadmitted[row.group] -= 1
                if not self.unadmitted[row.group]:  # the last member holds its own references now
                    del self.unadmitted[row.group]
                    self.cache.pool.release(self.prefixes.pop(row.group))
        self._sync()
        t2 = time.perf_counter()
        for row in rows:
            row.timing = (t1 - t0, t2 - t1, t2)

    def _encode(self, wanted: dict[tuple[int, int], Media]) -> dict[tuple[int, int], torch.Tensor]:
        """Vision features (tokens, D) of each wanted media, packed into as few vision tower passes as fit."""
        keys, out = sorted(wanted), {}
        for part in chunks(keys, [wanted[k].pixels.shape[0] for k in keys], VISION_PATCHES):
            images = [k for k in part if wanted[k].kind == IMAGE]
            videos = [k for k in part if wanted[k].kind == VIDEO]
            image_features, video_features = self.model.encode_vision(*_stack([wanted[k] for k in images]),
                                                                      *_stack([wanted[k] for k in videos]))
            for ids, features in ((images, image_features), (videos, video_features)):
                if ids:
                    out.update(zip(ids, features.split([wanted[k].tokens for k in ids])))
        return out

    def _embed(self, segments: list[tuple[Row, int, int]], features: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed embeddings (N, D) and rope positions (3, N) of prompt token ranges [start, end). A range starting
        at 0 covers the prompt's media (groups' prefixes end after them), a later one none."""
        ids = torch.cat([r.prompt.ids[a:b] for r, a, b in segments])
        types = torch.cat([r.prompt.types[a:b] for r, a, b in segments])
        positions = torch.cat([r.prompt.positions[:, a:b] for r, a, b in segments], dim=1)
        per_kind = {}
        for kind in (IMAGE, VIDEO):
            parts = [features[(r.ticket.number, m)] for r, a, _ in segments if a == 0 for m in r.prompt.media
                     if r.ticket.batch.media[m].kind == kind]
            per_kind[kind] = torch.cat(parts) if parts else None
        return self.model.embed(ids[None], types[None], per_kind[IMAGE], per_kind[VIDEO])[0], positions

    def _prefill_prefixes(self, leaders: list[Row], features) -> None:
        """Each new group's shared prefix into the group's own blocks, once."""
        if not leaders:
            return
        lengths = [r.prompt.prefix_len for r in leaders]
        for part in chunks(list(range(len(leaders))), lengths, PREFILL_TOKENS):
            x, positions = self._embed([(leaders[i], 0, lengths[i]) for i in part], features)
            self.model.prefill(x, positions, Prefill(self.cache, [self.prefixes[leaders[i].group] for i in part],
                                                     [0] * len(part), [lengths[i] for i in part], self.varlen))

    def _prefill_rows(self, admitted: list[tuple[int, Row]], features) -> torch.Tensor:
        """Logits (m, V) at each admitted prompt's last token, in `admitted` order."""
        bs, starts = self.block_size, []
        for slot, row in admitted:
            start = row.prompt.prefix_len if row.group is not None else 0
            if start % bs:  # the prefix's partial last block: the member writes its own tokens after it
                self.cache.copy_block(self.cache.rows[slot][start // bs], self.prefixes[row.group][start // bs])
            starts.append(start)
        rows = [(slot, row, start) for (slot, row), start in zip(admitted, starts)]
        logits = []
        for part in chunks(rows, [row.prompt.length - start for _, row, start in rows], PREFILL_TOKENS):
            x, positions = self._embed([(row, start, row.prompt.length) for _, row, start in part], features)
            lengths = [row.prompt.length - start for _, row, start in part]
            last = torch.tensor(lengths, device=self.device).cumsum(0) - 1
            batch = Prefill(self.cache, [self.cache.rows[slot] for slot, _, _ in part],
                            [start for _, _, start in part], lengths, self.varlen)
            logits.append(self.model.prefill(x, positions, batch, last=last))
        return torch.cat(logits)

    def _start(self, admitted: list[tuple[int, Row]], logits: torch.Tensor) -> None:
        """Set the admitted slots' state and choose their first token from the prefill logits."""
        st, dev = self.state, self.device
        slots, rows = [s for s, _ in admitted], [r for _, r in admitted]
        index = torch.tensor(slots, device=dev)
        lengths = torch.tensor([r.prompt.length for r in rows], device=dev)
        st.cache_pos[index] = lengths
        st.rope_pos[index] = lengths + torch.tensor([r.prompt.delta for r in rows], device=dev)
        st.n_gen[index], st.eos_hit[index], st.bad[index], st.live[index] = 0, False, False, True
        st.max_new[index] = torch.tensor([r.max_new for r in rows], device=dev)
        st.keys[index] = row_keys([r.seed for r in rows], dev)
        if self.seen is not None:
            self.seen[index] = False
            for slot, r in zip(slots, rows):
                self.seen[slot, r.prompt.ids] = True
        if self.think is not None:
            inside = [starts_inside(r.prompt.ids.tolist(), self.c.markers) for r in rows]
            self.think.reset(index, torch.tensor([r.budget for r in rows], device=dev),
                             torch.tensor(inside, device=dev))
        full = torch.zeros(self.c.slots, logits.shape[-1], dtype=logits.dtype, device=dev)
        full[index] = logits
        active = torch.zeros(self.c.slots, dtype=torch.bool, device=dev)
        active[index] = True
        self._advance(full, active)

    # -- the decode step (device only) ----------------------------------------------------------------------------

    def _decode(self, kv_len: int) -> None:
        st = self.state
        logits = self.model.decode(st.tokens, st.rope_pos, Decode(self.cache, st.cache_pos, kv_len, self.varlen))
        active = st.live.clone()
        st.cache_pos.add_(active)
        st.rope_pos.add_(active)
        self._advance(logits, active)

    def _advance(self, logits: torch.Tensor, active: torch.Tensor) -> None:
        """Choose, record and account the next token of the `active` slots (B,) from logits (B, V)."""
        st = self.state
        # a NaN or inf anywhere in a row makes its sum non-finite: one pass over the logits instead of three
        st.bad.copy_(st.bad | (active & ~torch.isfinite(logits.float().sum(-1))))
        tokens = choose(logits, self.c.params, self.seen, st.keys, st.n_gen)
        if self.think is not None:
            tokens = self.think.apply(tokens, active)
        target = torch.where(active, self.slot_ids, self.out.shape[0] - 1)  # inactive slots write the scratch row
        self.out[target, st.n_gen.clamp_max(self.out.shape[1] - 1)] = tokens
        if self.seen is not None:
            self.seen[self.slot_ids, tokens] = self.seen[self.slot_ids, tokens] | active
        st.n_gen.add_(active)
        is_eos = active & torch.isin(tokens, self.eos)
        st.eos_hit.copy_(st.eos_hit | is_eos)
        st.live.copy_(st.live & ~(is_eos | (active & (st.n_gen >= st.max_new))))
        st.tokens.copy_(torch.where(active, tokens, st.tokens))

    def _make_step(self):
        if not self.c.compile_decode or self.cache is None:
            return self._decode
        compiled = compiled_step(self.model)
        if self.device.type != "cuda":
            return lambda kv_len: compiled(self, kv_len)
        return CudaGraphStep(self, compiled)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def state_tensors(self) -> list[torch.Tensor]:
        """Everything a decode step writes besides the cache (restored after a CUDA graph's warm-up)."""
        extra = [self.out] + ([self.seen] if self.seen is not None else [])
        if self.think is not None:
            extra += [self.think.inside, self.think.count, self.think.forcing, self.think.hit]
        return [getattr(self.state, f.name) for f in fields(Slots)] + extra


def _stack(media: list[Media]):
    """The patch rows and grids of these media, concatenated ((None, None) for none)."""
    if not media:
        return None, None
    return torch.cat([m.pixels for m in media]), torch.tensor([m.grid for m in media])


def compiled_step(model):
    """torch.compile of one decode step, made once per model and kept out of its module tree (never a submodule,
    never in its state_dict)."""
    from glmv.cpu_kernels import is_packed

    if is_packed(model):
        raise ValueError("compile_decode cannot trace oneDNN-packed CPU weights; load with fast_cpu=False")
    if "_compiled_step" not in model.__dict__:
        model.__dict__["_compiled_step"] = torch.compile(Engine._decode)
    return model.__dict__["_compiled_step"]


class CudaGraphStep:
    """The compiled decode step captured in a CUDA graph over the engine's fixed tensors; replayed per step."""

    def __init__(self, engine: Engine, compiled):
        kv_len = engine.cache.max_len
        saved = [t.clone() for t in engine.state_tensors()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: compiles, and lets the allocator settle before capture
            for _ in range(2):
                compiled(engine, kv_len)
        torch.cuda.current_stream().wait_stream(stream)
        for tensor, copy in zip(engine.state_tensors(), saved):  # the warm-up steps must not count
            tensor.copy_(copy)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            compiled(engine, kv_len)

    def __call__(self, kv_len: int) -> None:
        self.graph.replay()
