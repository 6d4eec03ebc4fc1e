"""The report's HTML: a Jinja template with autoescaping on, fed plain values (everything from the model, from file
names and from run records is data, escaped on output; control characters are made visible), inline CSS and JS
pinned by a Content-Security-Policy that allows nothing but them and data: images, so the page fetches nothing."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from datetime import datetime, timezone
from importlib import resources

import jinja2
import numpy as np
from markupsafe import Markup

from pipeline.report import plots
from pipeline.report.scan import MAX_KINDS, Scan, task_colors, throughput

MAX_RUN_LINES = 6       # runs drawn in the throughput plot (the most recent ones)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")


def _visible(value):
    """Jinja finalize: control characters in untrusted text shown as \\xNN instead of reaching the page raw."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value)
    return value


def _asset(name: str) -> str:
    return resources.files("pipeline.report").joinpath(name).read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


_ENV = jinja2.Environment(autoescape=True, finalize=_visible, undefined=jinja2.StrictUndefined,
                          loader=jinja2.FunctionLoader(lambda name: _asset(name)))
CSS = _asset("report.css") + "".join(f'.tag[data-color="{k}"] {{ background: {c}; }}\n'
                                     for k, c in enumerate(plots.PALETTE))
JS = _asset("report.js")
CSP = f"default-src 'none'; img-src data:; style-src {_csp_hash(CSS)}; script-src {_csp_hash(JS)}"


def render(output_uri: str, scanned: Scan, records: list[tuple[str, dict]], gallery: list[dict],
           banners: list[str]) -> str:
    template = _ENV.get_template("report.html.jinja")
    return template.render(
        output_uri=output_uri, generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        files=scanned.files, banners=banners, stats=_stats(scanned, records),
        strata=_strata(scanned), models=[(m, h, n) for (m, h), n in scanned.models.most_common()],
        run_columns=RUN_COLUMNS, runs=_runs(scanned, records), configs=_configs(records),
        plots=_plots(scanned), errors=_errors(scanned), gallery=gallery,
        left_out=scanned.left_out, css=Markup(CSS), js=Markup(JS), csp=CSP)


def _num(v, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}"


def _stats(scanned: Scan, records: list[tuple[str, dict]]) -> list[tuple[str, str]]:
    errors = sum(n for (_, _, status), n in scanned.strata.items() if status == "error")
    label = "items" if scanned.exact else "items (estimated: ±0.8% std. error)"
    items = (label, _num(scanned.items()))
    out = [("rows (item, task)", _num(scanned.rows)), items,
           ("error rows", f"{_num(errors)} ({100 * errors / max(1, scanned.rows):.1f}%)"),
           ("result files", _num(scanned.files))]
    if records:
        tag, record = records[-1]
        s = record.get("summary") if isinstance(record.get("summary"), dict) else {}
        seconds = finite_float(s.get("seconds"))
        if seconds:
            out += [("items/s, last run", _num(finite_float(s.get("items")) / seconds, 3)),
                    ("generated tokens/s, last run", _num(finite_float(s.get("generated_tokens")) / seconds))]
        engine = s.get("engine") if isinstance(s.get("engine"), dict) else {}
        if engine:   # the model engines' figures (pipeline.engine_stats)
            out += [("slot occupancy, last run", f"{100 * finite_float(engine.get('occupancy')):.1f}%"),
                    ("decode steps/s, last run", _num(finite_float(engine.get("decode_steps_per_s")))),
                    ("engine idle share, last run", f"{100 * finite_float(engine.get('idle_share')):.1f}%")]
    return out


def finite_float(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return 0.0
    return f if math.isfinite(f) else 0.0


def _strata(scanned: Scan) -> list[tuple]:
    pairs = sorted({(task, media) for task, media, _ in scanned.strata})
    return [(t, m, scanned.strata.get((t, m, "ok"), 0), scanned.strata.get((t, m, "error"), 0)) for t, m in pairs]


RUN_COLUMNS = ["run", "rows in output", "done", "skipped", "errors", "items", "seconds", "first result s",
               "items/s", "tokens/s", "files"]


def _runs(scanned: Scan, records: list[tuple[str, dict]]) -> list[list[str]]:
    """One line per run record, plus runs that left result files but no record (still running, or killed)."""
    rows_per_run = {run: sum(p[1] for p in points) for run, (_, points) in scanned.times.items()}
    out = []
    for tag, record in records:
        s = record.get("summary") if isinstance(record.get("summary"), dict) else {}
        seconds = finite_float(s.get("seconds")) or math.nan
        out.append([tag, _num(rows_per_run.pop(tag, 0))] + [_num(s.get(k)) if isinstance(s.get(k), (int, float))
                                                             else str(s.get(k, "")) for k in
                                                             ("done", "skipped", "errors", "items", "seconds",
                                                              "first_result_s")]
                   + [_num(finite_float(s.get("items")) / seconds, 3),
                      _num(finite_float(s.get("generated_tokens")) / seconds), _num(s.get("files"))])
    for tag, n in sorted(rows_per_run.items()):
        out.append([f"{tag} (no run record: still running, or stopped early)", _num(n)] + [""] * 9)
    return out


def _configs(records: list[tuple[str, dict]]) -> list[tuple[str, list]]:
    """Newest first: (run, [(section, [(key, JSON value)])])."""
    out = []
    for tag, record in reversed(records[-20:]):
        config = record.get("config")
        if not isinstance(config, dict):
            continue
        sections = [(str(name), [(str(k), json.dumps(v, default=str)) for k, v in body.items()]
                     if isinstance(body, dict) else [("", json.dumps(body, default=str))])
                    for name, body in config.items()]
        out.append((tag, [(name, items) for name, items in sections if items]))
    return out


def _errors(scanned: Scan) -> list[tuple]:
    kinds = sorted(scanned.errors.items(), key=lambda kv: -kv[1][0])
    shown = [(kind, count, examples) for kind, (count, examples) in kinds[:MAX_KINDS]]
    rest = kinds[MAX_KINDS:]
    if rest:
        shown.append((f"{len(rest)} more kind(s)", sum(count for _, (count, _) in rest), []))
    return shown


def _plots(scanned: Scan) -> list[tuple[str, Markup]]:
    out = _throughput_plot(scanned) + _finish_plot(scanned)
    colors = task_colors(scanned)
    for task, (width, total, hist) in sorted(scanned.out_tokens.items()):
        labels, counts = _linear_bins(hist, width)
        rows = int(hist.sum())
        mean = total / max(1, rows)
        out.append((f"output tokens: {task} ({rows:,} ok rows, mean {mean:.1f})",
                    plots.histogram(f"output tokens, {task}", labels, [(task, counts)], "generated tokens",
                                    colors.get(task, 0))))
    for title, hists, unit in (("input size", scanned.pixels, "pixels (width × height), log bins"),
                               ("input tokens", scanned.in_tokens, "prompt tokens, log bins")):
        if hists:
            labels, series = _log_bins(hists)
            out.append((f"{title} by media type (ok rows)", plots.histogram(title, labels, series, unit, 4)))
    return out


def _throughput_plot(scanned: Scan) -> list[tuple[str, Markup]]:
    runs = sorted(scanned.times)[-MAX_RUN_LINES:]
    if not runs:
        return []
    curves = [(run, *throughput(scanned.times[run][1], scanned.times[run][0])) for run in runs]
    span = max(float(xs[-1] + width) for _, xs, _, width in curves)
    unit, scale = next((u, s) for u, s, limit in (("seconds", 1, 180), ("minutes", 60, 3 * 3600),
                                                  ("hours", 3600, math.inf)) if span <= limit)
    # steps: each bin's rate held over the bin, so a one-bin run still draws a line
    series = [(run, list(np.repeat(xs, 2)[1:] / scale) + [float(xs[-1] + width) / scale], list(np.repeat(ys, 2)))
              for run, xs, ys, width in curves]
    return [("items/s over time, per run (most recent runs)",
             plots.lines("items per second", series, f"{unit} since the run's first row"))]


def _finish_plot(scanned: Scan) -> list[tuple[str, Markup]]:
    if not scanned.finish:
        return []
    keys = ["eos", "length", "error"]
    per_task: dict[str, dict[str, int]] = {}
    for (task, reason), n in scanned.finish.items():
        key = reason if reason in keys else "other"
        per_task.setdefault(task, {}).setdefault(key, 0)
        per_task[task][key] += n
    if any("other" in c for c in per_task.values()):
        keys.append("other")
    return [("finish reasons per task (share of rows)",
             plots.stacked_bars("finish reasons", sorted(per_task.items()), keys))]


def _linear_bins(hist: np.ndarray, base: int = 1, max_bins: int = 40) -> tuple[list[str], list[float]]:
    """At most max_bins bins from counts in bins of `base` tokens (bin k: [k * base, (k + 1) * base))."""
    last = int(np.flatnonzero(hist)[-1]) + 1 if hist.any() else 1
    group = max(1, math.ceil(last / max_bins))
    counts = np.add.reduceat(hist[:last], np.arange(0, last, group))
    width = group * base
    labels = [str(k) if width == 1 else f"{k}-{k + width - 1}" for k in range(0, last * base, width)]
    return labels, [float(c) for c in counts]


def _log_bins(hists: dict[str, np.ndarray]) -> tuple[list[str], list[tuple[str, list[float]]]]:
    """Shared power-of-two bins over every media type's histogram."""
    used = [np.flatnonzero(h) for h in hists.values()]
    lo = min((int(u[0]) for u in used if len(u)), default=0)
    hi = max((int(u[-1]) + 1 for u in used if len(u)), default=1)
    series = [(media or "(none)", [float(h[k]) if k < len(h) else 0.0 for k in range(lo, hi)])
              for media, h in sorted(hists.items())]
    return [plots.short(2 ** k) for k in range(lo, hi)], series
