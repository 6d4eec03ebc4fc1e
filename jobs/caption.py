"""Caption / OCR / reason over an image and video corpus with a GLM-V model on Ray Data; results go to Parquet.

    python jobs/caption.py --config configs/X.toml [--set section.key=value ...]
    ray job submit --working-dir . -- python jobs/caption.py --config configs/X.toml

Run the same command again after a crash or a kill: finished (item, task) rows are skipped.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repo root, when not pip-installed

from pipeline import config as config_mod  # noqa: E402
from pipeline.errors import (ConfigError, Interrupted, LeaseHeld, LeaseLost, OutputChanged,  # noqa: E402
                             PipelineError, RunStopped, StorageUnavailable, find_error, own_errors)

# What the first word of the one-line message says, per kind of error; each kind's exit code is its `exit_code`
# (2 config or input, 3 storage unavailable, 4 run stopped by its circuit breaker, 5 output in use, 6 output changed,
# 143 SIGTERM).
LABELS = ((ConfigError, "config error"), (StorageUnavailable, "storage error"), (RunStopped, "run stopped"),
          (Interrupted, "stopped"), ((LeaseHeld, LeaseLost), "output in use"), (OutputChanged, "output changed"),
          (PipelineError, "error"))


def prepare_demo(cfg) -> None:
    """`[demo] generate = true`: make the sample corpus and the tiny checkpoint on first use."""
    from pipeline.corpus import make_demo_corpus

    if cfg.input.uri and "://" not in cfg.input.uri and not Path(cfg.input.uri).exists():
        print(f"demo: writing a sample corpus to {cfg.input.uri}", flush=True)
        make_demo_corpus(cfg.input.uri)
    if not (Path(cfg.model.path) / "config.json").exists():
        from glmv.testing import make_tiny_checkpoint

        print(f"demo: writing a tiny random-weight checkpoint to {cfg.model.path}", flush=True)
        make_tiny_checkpoint(cfg.model.path, preset="gqa", family="glm41v", seed=0)


def known_error(exc: BaseException) -> BaseException | None:
    """The PipelineError or glmv error behind exc (Ray wraps what a task raised)."""
    return find_error(exc, own_errors())


def report(exc: BaseException) -> int:
    """Print one line for a known error and return its exit code."""
    if isinstance(exc, PipelineError):
        label = next(text for kinds, text in LABELS if isinstance(exc, kinds))
        code = exc.exit_code
    else:   # glmv's own errors: a checkpoint, tokenizer or processor config the model cannot use
        label, code = "model error", ConfigError.exit_code
    message = " ".join(str(exc).split())
    print(f"{label}: {message}", file=sys.stderr, flush=True)
    return code


def _stop_on_sigterm(signum, frame):
    # a plain `kill` runs the `finally` blocks (the output lease is released) instead of dying mid-write; while
    # results stream, pipeline.cluster.GracefulStop takes SIGTERM instead and drains what is in flight
    print("stopped: SIGTERM before any work was in flight; rerun the same command to go on", file=sys.stderr,
          flush=True)
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config (TOML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key; the value is read as TOML, a bare word as a string")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        cfg = config_mod.load(args.config, args.overrides)
        if cfg.demo.generate:
            prepare_demo(cfg)
        from pipeline import preflight

        units = preflight.check(cfg)   # inputs, checkpoint, context: before Ray starts, in well under a second

        from pipeline.run import run

        run(cfg, units=units)
    except Exception as e:  # noqa: BLE001 - known kinds become one line and their exit code; the rest a traceback
        known = known_error(e)
        if known is None:
            raise
        return report(known)
    return 0


if __name__ == "__main__":
    sys.exit(main())
