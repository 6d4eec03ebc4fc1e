"""One gallery card per sampled item: its thumbnail, boxes to draw, and each task's output as plain values."""

from __future__ import annotations

import math

from pipeline.pdf import PAGE_MARK
from pipeline.report import plots
from pipeline.report.thumbs import Thumb

MAX_TEXT = 4000   # characters of one generated text embedded (the rest is counted, not shown)
MAX_EXTRA = 300
MAX_BOXES = 50    # per row: a degenerate output may hold thousands
# the columns a card shows in their own places; any other one is listed as "name: value"
KNOWN = {"id", "uri", "media_type", "task", "prompt", "text", "thinking", "answer", "boxes", "error",
         "num_input_tokens", "num_output_tokens", "finish_reason", "width", "height", "duration_s", "num_frames",
         "model", "run_config_hash", "processed_at", "page", "num_pages"}


def card(rows: list[dict], thumb: Thumb, task_colors: dict[str, int]) -> dict:
    first = rows[0]
    uri = str(first.get("uri") or "")
    boxes = []
    task_rows = []
    for row in rows:
        color = task_colors.get(str(row.get("task")), 0)
        row_boxes = list(_boxes(row.get("boxes")))
        boxes += [(plots.PALETTE[color % len(plots.PALETTE)], *_rect(b)) for b in row_boxes]
        task_rows.append(_task(row, color, row_boxes))
    return {"uri": uri, "name": _name(uri, first),
            "media": str(first.get("media_type") or ""), "has_error": any(r.get("error") is not None for r in rows),
            "info": _info(first), "frames": thumb.frames, "note": thumb.note, "boxes": boxes, "rows": task_rows}


def _name(uri: str, row: dict) -> str:
    """The file name; a PDF page's: its document's name and the page ("report.pdf · page 3 of 12")."""
    if isinstance(row.get("page"), int) and PAGE_MARK in uri:
        of = f" of {row['num_pages']}" if isinstance(row.get("num_pages"), int) else ""
        uri = uri.rsplit(PAGE_MARK, 1)[0]
        return f"{uri.rstrip('/').rsplit('/', 1)[-1] or uri} · page {row['page']}{of}"
    return uri.rstrip("/").rsplit("/", 1)[-1] or uri


def _info(row: dict) -> str:
    parts = [str(row.get("media_type") or "not media")]
    if isinstance(row.get("page"), int):
        parts[0] = f"pdf page {row['page']}" + (f" of {row['num_pages']}" if isinstance(row.get("num_pages"), int)
                                                else "")
    if isinstance(row.get("width"), int) and isinstance(row.get("height"), int):
        parts.append(f"{row['width']}×{row['height']}")
    if isinstance(row.get("duration_s"), float) and math.isfinite(row["duration_s"]):
        parts.append(f"{row['duration_s']:.1f} s")
    if isinstance(row.get("num_frames"), int) and row.get("media_type") == "video":
        parts.append(f"{row['num_frames']} frames to the model")
    parts.append(f"id {row.get('id')}")
    return " · ".join(parts)


def _clip(value) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= MAX_TEXT else f"{text[:MAX_TEXT]}… ({len(text) - MAX_TEXT:,} more characters)"


def _task(row: dict, color: int, boxes: list[tuple]) -> dict:
    answer, text = _clip(row.get("answer")), _clip(row.get("text"))
    return {"task": str(row.get("task")), "color_index": color % len(plots.PALETTE),
            "finish": str(row.get("finish_reason") or ""),
            "tokens": f"{row.get('num_input_tokens')} in / {row.get('num_output_tokens')} out",
            "error": None if row.get("error") is None else str(row["error"]),
            "answer": answer, "thinking": _clip(row.get("thinking")),
            "text": text if text.strip() != answer.strip() else "",
            "boxes": "; ".join(f"({b[0]:.0f}, {b[1]:.0f}, {b[2]:.0f}, {b[3]:.0f})" for b in boxes),
            "prompt": _clip(row.get("prompt")),
            "extras": [(str(k), str(v)[:MAX_EXTRA]) for k, v in row.items() if k not in KNOWN]}


def _boxes(value):
    """(x1, y1, x2, y2) floats of a row's boxes; malformed or non-finite ones are left out."""
    if not isinstance(value, list):
        return
    for box in value[:MAX_BOXES]:
        try:
            coords = tuple(float(box[k]) for k in ("x1", "y1", "x2", "y2"))
        except (TypeError, KeyError, ValueError):
            continue
        if all(math.isfinite(c) for c in coords):
            yield coords


def _rect(box: tuple) -> tuple[str, str, str, str]:
    """SVG x, y, width, height on the 0-1000 viewBox, clamped to the picture."""
    x1, y1, x2, y2 = (min(max(c, 0.0), 1000.0) for c in box)
    x1, x2 = min(x1, x2), max(x1, x2)
    y1, y2 = min(y1, y2), max(y1, y2)
    return f"{x1:.1f}", f"{y1:.1f}", f"{x2 - x1:.1f}", f"{y2 - y1:.1f}"
