"""The model actors' engine counters, as the driver adds them up for the summary and the run record.

Each refill-mode call returns its actor's counters so far (glmv.server.EngineServer.stats, on its first row's
`_engine` column); the driver keeps the latest per actor, and a restarted actor is a new one (its engine starts from
zero). Figures:
- slot occupancy: live slot-steps / all slot-steps (a slot-step is one slot in one decode step; live: it advanced a
  row still generating), over every engine;
- decode steps/s: per engine, its steps over its wall time (first submission to its last call's return);
- tokens/s: every engine's tokens over its wall time, summed (the actors run side by side);
- idle share: the part of the engines' wall time in which no round ran (no row queued or decoding: waiting for the
  next window);
- KV cache: the pool's size, the peak held by rows and prefixes, and how many rows were preempted (sent back to
  the queue when a fixed pool ran out, to run again from their prompt) with the tokens they threw away.
"""

from __future__ import annotations

import json


def latest(per_actor: dict[str, dict], values: list[str]) -> None:
    """Fold `_engine` values (JSON, one per call) into the latest counters per actor, in place."""
    for value in values:
        stats = json.loads(value)
        kept = per_actor.get(stats["id"])
        if kept is None or stats["wall_s"] >= kept["wall_s"]:
            per_actor[stats["id"]] = stats


def figures(per_actor: dict[str, dict]) -> dict:
    engines = list(per_actor.values())
    if not engines:
        return {}
    wall = sum(e["wall_s"] for e in engines)
    slot_steps = sum(e["steps"] * e["slots"] for e in engines)
    return {
        "actors": len(engines), "slots": sum(e["slots"] for e in engines),
        "occupancy": sum(e["live_steps"] for e in engines) / max(1, slot_steps),
        "decode_steps": sum(e["steps"] for e in engines),
        "decode_steps_per_s": sum(e["steps"] for e in engines) / max(wall, 1e-9),
        "tokens": sum(e["tokens"] for e in engines),
        "tokens_per_s": sum(e["tokens"] / max(e["wall_s"], 1e-9) for e in engines),
        "idle_share": 1 - sum(e["busy_s"] for e in engines) / max(wall, 1e-9),
        "kv_pool_bytes": sum(e["kv_blocks"] * e["kv_block_bytes"] for e in engines),
        "kv_used_peak_bytes": sum(e["kv_used_peak_blocks"] * e["kv_block_bytes"] for e in engines),
        "preempted": sum(e["preempted"] for e in engines), "recomputed": sum(e["recomputed"] for e in engines),
    }


def line(f: dict) -> str:
    return (f"model engines: {f['actors']} ({f['slots']} decode slots): slot occupancy {100 * f['occupancy']:.1f}% "
            f"(live slot-steps / all), {f['decode_steps']} decode steps ({f['decode_steps_per_s']:.1f}/s), "
            f"{f['tokens']} tokens ({f['tokens_per_s']:.1f}/s), idle {100 * f['idle_share']:.1f}% of engine time "
            f"(no row to run), KV pool {f['kv_pool_bytes'] / 2**20:.1f} MiB (peak {f['kv_used_peak_bytes'] / 2**20:.1f}"
            f" MiB in use), {f['preempted']} rows preempted ({f['recomputed']} tokens recomputed)")
