"""Caption / OCR / reason over an image and video corpus with a GLM-V model on Ray Data; results go to Parquet.

    python jobs/caption.py --config configs/X.toml [--set section.key=value ...]
    ray job submit --working-dir . -- python jobs/caption.py --config configs/X.toml

Run the same command again after a crash or a kill: finished (item, task) rows are skipped.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repo root, when not pip-installed

from pipeline import config as config_mod  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config (TOML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key; the value is read as TOML, a bare word as a string")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_mod.load(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if cfg.demo.generate:
        prepare_demo(cfg)
    if "://" not in cfg.model.path and not (Path(cfg.model.path) / "config.json").exists():
        print(f"config error: model.path: {cfg.model.path} has no config.json", file=sys.stderr)
        return 2

    from pipeline.run import run

    try:
        run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
