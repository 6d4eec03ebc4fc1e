"""The model actor: loads the checkpoint once, then turns windows of decoded items into one row per (item, task).

Each call gets `run.batch_size * batching.sort_window` sequences' worth of items. `batching.mode = "refill"`: the
actor holds one engine for its life (glmv.server: its own thread, `run.batch_size` decode slots), and every call
adds its window's sequences (template switches mixed; an item's tasks share its image encode and prompt prefix) to
that engine's queue and waits for them, while the calls before and after it do the same: Ray Data runs
`CALLS_IN_FLIGHT` calls of an actor at once (a threaded actor), so a free slot takes the next sequence whichever
window it came from, and the slots drain only at the end of the stream. A call's host work (templates, tokenizing,
patchifying, then detokenizing, parsing, Arrow) runs in its own thread beside the decode steps. `"static"`:
sequences are sorted by estimated prompt length and cut into static batches of `run.batch_size`, one `generate`
each, one call at a time. Sampling seeds come from (run.seed, item id, task), so a text does not depend on its batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa

from pipeline import items as items_mod
from pipeline import output, progress
from pipeline.breaker import OUTAGE
from pipeline.config import AUTO, Config, TaskSpec, decode_slots
from pipeline.errors import PipelineError
from pipeline.items import Item
from pipeline.media import model_kind, restore
from pipeline.poison import CrashGuard, crash_message, inject_crash

log = logging.getLogger(__name__)

CALLS_IN_FLIGHT = 3   # calls of a refill-mode actor running at once: one window's rows decoding while the next ones
#                       are prepared and queued. More windows wait as more memory (each holds its patches on the
#                       model's device), fewer leave the slots waiting for the next window's host work
ENGINE = "engine"     # the crash guard's position of a window whose rows are in the shared engine
MEDIA_WORDS = {"pdf": "page"}   # a task prompt's {media}: "Describe this page", not "this pdf"
KV_SHARE = 0.5   # of a GPU's free memory, for the KV cache (the rest: activations, vision, fragmentation): refill
#                  mode sizes its engine's pool to it at the actor's start; in static mode a call whose slots would
#                  need more runs with fewer. An actor holding a fraction of a GPU (actors.num_gpus < 1) takes that
#                  fraction of it: its neighbours see the same free memory


@dataclass
class Sequence:
    row: dict            # the decoded item's identity and media fields (see `_row_of`)
    task: str
    prompt: str
    thinking: bool
    max_new_tokens: int
    max_thinking_tokens: int  # 0: no budget
    media: object        # glmv LoadedImage / LoadedVideo
    est_len: int         # estimated prompt tokens, for sorting


def estimated_tokens(frames_shape: list[int], media_type: str, prompt: str, patch: int = 14, merge: int = 2,
                     temporal: int = 2) -> int:
    t, h, w = frames_shape[0], frames_shape[1], frames_shape[2]
    groups = -(-t // temporal) if media_type == "video" else 1
    return groups * (h // patch) * (w // patch) // (merge * merge) + len(prompt) // 3 + 16


def resolve_device(cfg: Config) -> tuple[str, "object"]:
    import torch

    device = cfg.model.device
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device = 'cuda' but this actor sees no CUDA device (torch.cuda.is_available() "
                           "is False: a CPU-only torch build, or actors.num_gpus = 0)")
    if device == "auto":   # num_gpus is sized by the run before actors start; "auto" here: used outside a run
        wants_gpu = cfg.actors.num_gpus == AUTO or cfg.actors.on_gpu
        device = "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"
        if cfg.actors.on_gpu and device == "cpu":
            log.warning("actors.num_gpus = %s but this actor sees no CUDA device; running the model on the CPU",
                        cfg.actors.num_gpus)
    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, getattr(torch, dtype)


class Predictor:
    """Ray Data actor class (`map_batches(Predictor, concurrency=N, num_gpus=G)`)."""

    def __init__(self, cfg: Config, run_tag: str = ""):
        from glmv.errors import GlmvError

        self.load_error: Exception | None = None
        self.ranks = None   # model.tensor_parallel > 1: the follower ranks (pipeline.tp)
        try:
            self._load(cfg, run_tag)
        except (GlmvError, PipelineError) as e:
            # Ray reports an actor that fails to start by the text of its traceback only (ActorDiedError), and the
            # run would end in that traceback with exit 1. Raised by the first call instead, the error reaches the
            # driver as itself: one line and its exit code (a checkpoint missing on this node, a bad config value).
            self.load_error = e
        if self.load_error is not None and self.ranks is not None:
            self.ranks.close()

    def _load(self, cfg: Config, run_tag: str) -> None:
        import torch

        from glmv.auto import AutoModelForImageTextToText
        from glmv.output import parse_output
        from glmv.processor import Glm4vProcessor

        self.cfg, self.run_tag = cfg, run_tag
        self.device, self.dtype = resolve_device(cfg)
        if self.device == "cpu":
            torch.set_num_threads(max(1, int(cfg.actors.num_cpus)))
        self.processor = Glm4vProcessor.from_pretrained(cfg.model.path)
        if self.device == "cuda":   # refused in one line before any rank loads (pipeline.tp.RankMemory)
            from pipeline.tp import rank_memory

            memory = rank_memory(cfg.model.path, cfg.model.tensor_parallel, self.dtype)
            memory.check_fits(torch.cuda.mem_get_info()[0], "this model actor's GPU")
        if cfg.model.tensor_parallel > 1:   # rank 0 of an actor over N ranks: the followers start loading now
            from pipeline.tp import Ranks

            self.ranks = Ranks(cfg, self.device)
        # GLM-4.1V/4.6V, GLM-4.5V/4.6V MoE or GLM-OCR, as config.json says
        self.model = AutoModelForImageTextToText.from_pretrained(
            cfg.model.path, dtype=self.dtype, device=self.device,
            tensor_parallel=self.ranks.group if self.ranks is not None else None)
        self.processor.check_model(self.model.config)
        self.model.eval()
        self.slots = decode_slots(cfg.run.batch_size, self.device == "cuda")
        self.specs = {spec.name: spec for spec in cfg.task_specs()}
        self.lock = threading.Lock()   # static mode: one generate at a time
        self.engine_id = uuid.uuid4().hex[:12]
        self.kv_share = KV_SHARE * (min(1.0, cfg.actors.num_gpus) if cfg.actors.on_gpu else 1.0)
        self.capped = False   # said once that a call ran with fewer slots than run.batch_size
        self.server = self._start_engine() if cfg.batching.mode == "refill" else None
        self.parse_output = parse_output
        self.model_name = cfg.model_name()
        self.config_hash = cfg.result_hash()

    def _start_engine(self):
        """The engine this actor keeps for its life, in its own thread, with the run's sampling settings."""
        from glmv.engine import BLOCK_SIZE, Engine
        from glmv.generate import checkpoint_markers, engine_config
        from glmv.server import EngineServer

        run = self.cfg.run
        sampling = dict(do_sample=True, temperature=run.temperature, top_k=run.top_k,
                        top_p=run.top_p) if run.do_sample else dict(do_sample=False)
        budgets = any(spec.max_thinking_tokens for spec in self.specs.values())
        config = engine_config(self.model, self.slots, repetition_penalty=run.repetition_penalty,
                               thinking_markers=checkpoint_markers(self.model) if budgets else None, **sampling)
        blocks = self._kv_blocks()
        config = dataclasses.replace(config, kv_blocks=blocks, block_size=BLOCK_SIZE["cuda"] if blocks else 0)
        engine = Engine(self.model, config, max_new=run.max_new_tokens)
        return self.ranks.server(engine, run.max_new_tokens) if self.ranks is not None else EngineServer(engine)

    def _kv_blocks(self) -> int:
        """The engine's KV pool on a GPU: KV_SHARE of the free memory at the actor's start, in blocks, so that the
        slots hold as many positions as fit whatever each row's length (a row that cannot grow preempts the
        youngest). 0 on a CPU: the pool grows as the rows need (host memory, sized by the user)."""
        from glmv.engine import BLOCK_SIZE

        free = free_device_bytes(self.model.device)
        if self.ranks is not None:   # the same pool on every rank: the smallest that fits each
            free = self.ranks.smallest(free)
        if free is None:
            return 0
        block = BLOCK_SIZE["cuda"]
        blocks = max(1, int(free * self.kv_share // self.model.cache_bytes(1, block)))
        log.info("KV pool: %d blocks of %d positions (%.1f GiB, %.0f%% of the %.1f GiB free on %s)", blocks, block,
                 blocks * self.model.cache_bytes(1, block) / 2**30, 100 * self.kv_share, free / 2**30,
                 self.model.device)
        return blocks

    # -- building sequences ---------------------------------------------------------------------------------

    def _spec(self, task: str, row: dict) -> TaskSpec:
        if task in self.specs:
            return self.specs[task]
        # a manifest row's own prompt
        return TaskSpec(task, row["prompt"], thinking=False)

    def _sequences(self, items: list[Item], out: list[dict]) -> list[Sequence]:
        seqs = []
        for item in items:
            row = _row_of(item)
            if item.error is not None:
                for task in item.tasks:
                    spec = self._spec(task, row)
                    out.append({**output.error_row(row, task, self._prompt(spec, row), item.error, self.model_name,
                                                   self.config_hash), OUTAGE: item.outage})
                continue
            media = restore(item.media_type, item.frames_array(), json.loads(item.meta or "{}"))
            for task in item.tasks:
                spec = self._spec(task, row)
                prompt = self._prompt(spec, row)
                seqs.append(Sequence(row, task, prompt, spec.thinking, spec.max_new_tokens or
                                     self.cfg.run.max_new_tokens, spec.max_thinking_tokens, media,
                                     estimated_tokens(item.frames_shape, item.media_type, prompt)))
        return seqs

    @staticmethod
    def _prompt(spec: TaskSpec, row: dict) -> str:
        return spec.prompt.replace("{media}", MEDIA_WORDS.get(row["media_type"], row["media_type"]) or "file")

    # -- running the model ----------------------------------------------------------------------------------

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.load_error is not None:
            raise self.load_error
        items = items_mod.from_table(batch)
        out: list[dict] = []
        if not progress.admit(self.run_tag, len(items)):
            # the run is draining after a SIGTERM: this window's pairs stay pending for the rerun
            return _with_item_columns(pa.Table.from_pylist(out, schema=output.SCHEMA), out, items, batch)
        seqs = self._sequences(items, out)
        guard = CrashGuard(self.run_tag, "model", [it.id for it in items])
        # a window whose items are all error rows already (unreadable media) has nothing for the model
        if seqs and self.cfg.batching.mode == "refill":
            with self.lock:   # an actor made for static mode (a test switching modes) starts one engine, once
                self.server = self.server or self._start_engine()
            out.extend(self._run_in_engine(guard, seqs))
        elif seqs:
            with self.lock:
                for k, group in enumerate(self._static_batches(seqs)):
                    out.extend(self._run_guarded(guard, f"call{k}", group))
        guard.finished()
        table = _with_item_columns(pa.Table.from_pylist(out, schema=output.SCHEMA), out, items, batch)
        return self._with_engine_stats(table)

    def _with_engine_stats(self, table: pa.Table) -> pa.Table:
        """The engine's counters so far, on the first row of the call's rows (`_engine`, never written): the driver
        keeps each actor's latest for the run's summary (pipeline.run.Summary)."""
        if self.server is None:
            return table
        stats = json.dumps({"id": self.engine_id, **self.server.stats()})
        values = [stats] + [None] * (table.num_rows - 1) if table.num_rows else []
        return table.append_column("_engine", pa.array(values, pa.string()))

    # -- refill mode: the actor's engine ---------------------------------------------------------------------

    def _run_in_engine(self, guard: CrashGuard, seqs: list[Sequence]) -> list[dict]:
        """The window's sequences through the shared engine. A window whose rows were in the slots when the actor
        died runs its sequences one by one, each alone in the engine; one that killed it twice alone is an error
        row (pipeline.poison)."""
        if not guard.poisoned(ENGINE):
            return self._through_engine(guard, ENGINE, seqs, exclusive=False)
        return self._one_by_one(guard, seqs, lambda alone, s: self._through_engine(guard, alone, [s], exclusive=True))

    def _one_by_one(self, guard: CrashGuard, seqs: list[Sequence], run_alone) -> list[dict]:
        """After a crash: each sequence run alone (`run_alone(position, seq)`), except one that already killed the
        actor twice alone, which becomes an error row (pipeline.poison)."""
        rows = []
        for s in seqs:
            alone = f"{s.row['id']}:{s.task}"
            if guard.gave_up(alone):
                msg = crash_message(s.row["uri"], "running the model", guard.poisoned(alone))
                rows.append(output.error_row(s.row, s.task, s.prompt, msg, self.model_name, self.config_hash))
            else:
                rows.extend(run_alone(alone, s))
        return rows

    def _through_engine(self, guard: CrashGuard, position: str, seqs: list[Sequence], exclusive: bool) -> list[dict]:
        """Rows of these sequences. The guard's note names `position` while their host work runs and while any of
        their rows is in a slot. A failure (an exception, not a death) retries them one by one, each alone."""
        from glmv.generate import prompt_batch
        from glmv.sampling import row_seed
        from glmv.thinking import NO_BUDGET

        def admitted(indices: list[int]) -> None:   # in the engine's thread, before their prefill
            guard.at(position)
            for i in indices:
                inject_crash("model", seqs[i].row["uri"])

        try:
            guard.at(position)
            batch = prompt_batch(self.model, **self._encode(seqs))
            guard.left()
            seeds = [row_seed(self.cfg.run.seed, s.row["id"], s.task) for s in seqs]
            ticket = self.server.submit(batch, [s.max_new_tokens for s in seqs], seeds,
                                        [s.max_thinking_tokens or NO_BUDGET for s in seqs], exclusive=exclusive,
                                        on_admit=admitted, on_leave=guard.left)
            outputs = ticket.wait()
        except Exception as e:  # noqa: BLE001 - one bad sequence must not sink the window or the run
            if len(seqs) > 1:
                log.warning("%d sequences failed together (%s: %s); retrying one by one", len(seqs),
                            type(e).__name__, e)
                return [row for s in seqs for row in self._through_engine(guard, f"{s.row['id']}:{s.task}", [s],
                                                                           exclusive=True)]
            return [self._failed_row(seqs[0], e)]
        texts = self.processor.batch_decode([o.tokens for o in outputs], skip_special_tokens=True)
        return [self._result_row(s, text, p.length, len(o.tokens), o.reason)
                for s, text, p, o in zip(seqs, texts, batch.prompts, outputs)]

    # -- static mode ----------------------------------------------------------------------------------------

    def _static_batches(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """Batches of run.batch_size sorted by prompt length, sharing template switches and budget."""
        seqs = sorted(seqs, key=lambda s: (s.thinking, s.max_new_tokens, s.est_len))
        groups, bs = [], self.slots
        for s in seqs:
            if groups and len(groups[-1]) < bs and (groups[-1][0].thinking, groups[-1][0].max_new_tokens) == (
                    s.thinking, s.max_new_tokens):
                groups[-1].append(s)
            else:
                groups.append([s])
        return groups

    def _run_guarded(self, guard: CrashGuard, position: str, seqs: list[Sequence]) -> list[dict]:
        """A call that killed the actor before runs its sequences one by one; one that killed it twice is an
        error row (pipeline.poison)."""
        if not guard.poisoned(position):
            guard.at(position)
            for s in seqs:
                inject_crash("model", s.row["uri"])
            return self._run_batch(seqs)

        def run_alone(alone: str, s: Sequence) -> list[dict]:
            guard.at(alone)
            inject_crash("model", s.row["uri"])
            return self._run_batch([s])

        return self._one_by_one(guard, seqs, run_alone)

    def _run_batch(self, seqs: list[Sequence]) -> list[dict]:
        try:
            return self._generate(seqs)
        except Exception as e:  # noqa: BLE001 - one bad sequence must not sink the batch or the run
            if len(seqs) > 1:
                log.warning("batch of %d failed (%s: %s); retrying one by one", len(seqs), type(e).__name__, e)
                return [row for s in seqs for row in self._run_batch([s])]
            return [self._failed_row(seqs[0], e)]

    def _generate(self, seqs: list[Sequence]) -> list[dict]:
        import torch

        from glmv.sampling import row_seed

        inputs = self._encode(seqs)
        run = self.cfg.run
        sampling = dict(do_sample=True, temperature=run.temperature, top_k=run.top_k,
                        top_p=run.top_p) if run.do_sample else dict(do_sample=False)
        budgets = [s.max_thinking_tokens or None for s in seqs]
        prompt_len = inputs["input_ids"].shape[1]
        slots = self._slots_that_fit(len(seqs), prompt_len + max(s.max_new_tokens for s in seqs))
        with torch.inference_mode():
            result = self.model.generate(
                **inputs, max_new_tokens=[s.max_new_tokens for s in seqs], repetition_penalty=run.repetition_penalty,
                seed=[row_seed(run.seed, s.row["id"], s.task) for s in seqs], return_dict_in_generate=True,
                max_batch_size=slots if slots < len(seqs) else None,
                max_thinking_tokens=budgets if any(budgets) else None, **sampling)
        texts = self.processor.batch_decode(result.sequences[:, prompt_len:].cpu(), skip_special_tokens=True)
        return [self._result_row(s, text, info.num_prompt_tokens, info.num_generated_tokens, info.finish_reason)
                for s, text, info in zip(seqs, texts, result.rows)]

    # -- shared: inputs and rows ----------------------------------------------------------------------------

    def _encode(self, seqs: list[Sequence]) -> dict:
        """The processor's batch of these sequences: each rendered with its own template switch (the compiled
        template is cached), patchified on the model's device straight into its dtype, an item's frames once for
        all its tasks. The grids stay on the CPU: the model only reads them as lists, which on a GPU would be a
        sync per read."""
        kinds = [model_kind(s.row["media_type"]) for s in seqs]
        conversations = [[{"role": "user", "content": [{"type": kind, kind: s.media},
                                                        {"type": "text", "text": s.prompt}]}]
                         for s, kind in zip(seqs, kinds)]
        prompts = [self.processor.apply_chat_template(conv, add_generation_prompt=True, enable_thinking=s.thinking)
                   for conv, s in zip(conversations, seqs)]
        return self.processor.encode_rendered(prompts, conversations, padding=True, return_tensors="pt",
                                              device=self.device, dtype=self.dtype)

    def _result_row(self, s: Sequence, text: str, prompt_tokens: int, generated: int, reason: str) -> dict:
        spec = self.specs.get(s.task)   # None: a manifest row's own prompt
        parsed = self.parse_output(text, verbatim=spec is not None and spec.verbatim)
        return {
            "id": s.row["id"], "uri": s.row["uri"], "media_type": s.row["media_type"], "task": s.task,
            "prompt": s.prompt, "text": text, "thinking": parsed.thinking or "", "answer": parsed.answer or "",
            "boxes": [dict(zip(("x1", "y1", "x2", "y2"), map(float, b))) for b in parsed.boxes],
            "error": None, "num_input_tokens": int(prompt_tokens), "num_output_tokens": int(generated),
            "finish_reason": reason, "width": s.row["width"], "height": s.row["height"],
            "duration_s": s.row["duration_s"], "num_frames": s.row["num_frames"], "page": s.row["page"],
            "num_pages": s.row["num_pages"], "model": self.model_name,
            "run_config_hash": self.config_hash, "processed_at": datetime.now(timezone.utc)}

    def _failed_row(self, s: Sequence, e: Exception) -> dict:
        msg = f"{s.row['uri']}: model failed ({type(e).__name__}: {e})"
        return {**output.error_row(s.row, s.task, s.prompt, msg, self.model_name, self.config_hash),
                OUTAGE: is_device_failure(e)}

    def _slots_that_fit(self, rows: int, longest: int) -> int:
        """Decode slots for a call of `rows` sequences up to `longest` tokens: run.batch_size (static mode: the
        batch's rows), fewer where their KV cache would take more than KV_SHARE of the device's free memory (long
        videos), so that a window of them runs with fewer slots instead of failing out of memory."""
        from glmv.engine import BLOCK_SIZE

        slots = min(rows, self.slots)
        free = free_device_bytes(self.model.device)
        if free is None:
            return slots
        longest = -(-longest // BLOCK_SIZE["cuda"]) * BLOCK_SIZE["cuda"]   # in whole blocks, as a GPU engine takes them
        fit = max(1, min(slots, int(free * self.kv_share // self.model.cache_bytes(1, longest))))
        if fit < slots and not self.capped:
            self.capped = True
            log.warning("a call of %d sequences up to %d tokens runs with %d decode slots, not %d: their KV cache "
                        "would take more than %.0f%% of the %.1f GiB free on %s (said once per actor)", rows,
                        longest, fit, slots, 100 * self.kv_share, free / 2**30, self.model.device)
        return fit


def free_device_bytes(device) -> int | None:
    """Free memory of a CUDA device; None elsewhere (a CPU actor's cache sits in host memory, sized by the user)."""
    import torch

    if device.type != "cuda":
        return None
    # what this process's caching allocator holds but no tensor uses (the last call's cache and activations) is
    # free for this call too; the driver counts it as taken
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return torch.cuda.mem_get_info(device)[0] + unused


def _row_of(item: Item) -> dict:
    """The fields of an item that its output rows repeat (no frames: they stay in the item)."""
    return {"id": item.id, "uri": item.uri, "media_type": item.media_type, "prompt": item.prompt,
            "width": item.width, "height": item.height, "duration_s": item.duration_s,
            "num_frames": item.num_frames, "page": item.page, "num_pages": item.num_pages}


def is_device_failure(exc: BaseException) -> bool:
    """A CUDA error or running out of memory says nothing about the item: not recorded as its result."""
    text = f"{type(exc).__name__}: {exc}"
    return "CUDA" in text or "out of memory" in text.lower() or isinstance(exc, MemoryError)


def _with_item_columns(table: pa.Table, rows: list[dict], items: list[Item], batch: pa.Table) -> pa.Table:
    """Output rows plus, from their item: `_key`, the kept input columns, `_shard` (for the writer's count) and
    `_outage` (for the circuit breaker), never written; the writer names them as the output schema says."""
    index = {}
    for i, item in enumerate(items):
        index.setdefault(item.id, i)
    take = pa.array([index[r["id"]] for r in rows], pa.int64())
    table = table.append_column("_key", pa.array([items[i].key for i in take.to_pylist()], pa.string()))
    extra = items_mod.extra_columns(batch)
    for name in (extra.column_names if extra is not None else []):
        table = table.append_column(extra.schema.field(name), extra[name].take(take))
    table = table.append_column("_shard", pa.array([items[i].shard for i in take.to_pylist()], pa.string()))
    return table.append_column(OUTAGE, pa.array([bool(r.get(OUTAGE)) for r in rows], pa.bool_()))
