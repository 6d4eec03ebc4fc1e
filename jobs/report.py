"""A run report people look at: one self-contained HTML file (gallery of sampled items with their outputs, errors
by kind, throughput and token plots) made from an output prefix as it stands, also mid-run or after a kill.

    python jobs/report.py --output out/demo                       # -> out/demo/_state/report.html
    python jobs/report.py --output s3://bucket/results/ --out report.html --sample 96

S3 credentials come from the environment, as for a run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repo root, when not pip-installed

from pipeline.report import DEFAULT_SAMPLE, write_report  # noqa: E402
from pipeline.storage import StorageOptions  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="the run's output.uri (local folder or URL)")
    parser.add_argument("--out", default="", help="where to write the report (default <output>/_state/report.html)")
    parser.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, help="items in the gallery")
    parser.add_argument("--endpoint-url", default="", help="S3-compatible endpoint, as storage.endpoint_url")
    parser.add_argument("--region", default="", help="S3 region, as storage.region")
    parser.add_argument("--anon", action="store_true", help="anonymous S3 access, as storage.anon")
    args = parser.parse_args(argv)
    if args.sample < 0:
        parser.error("--sample must be 0 or more")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    opts = StorageOptions(endpoint_url=args.endpoint_url, region=args.region, anon=args.anon)
    try:
        where = write_report(args.output, opts, sample=args.sample, out=args.out)
    except (OSError, ValueError) as e:
        print(f"report: {args.output}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"report: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
