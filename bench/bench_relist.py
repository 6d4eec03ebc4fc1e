"""What the driver's relist of a listed prefix costs per listed object (pipeline.listing.relist, run by
pipeline.changes before Ray starts on the first run after a run that ended), to extrapolate to 1e7 objects on S3.

A prefix of --objects empty .jpg files in --folders sub-folders (one partition each) is listed once into a snapshot,
then relisted as the driver does (16 partitions at a time, nothing new): the time per object, split into the
walk alone (the storage's listing) and the rest (the snapshot's parts read back and compared, in Python). With --s3
the prefix lives on a moto S3 server in this process (its per-request cost is moto's, not S3's). The CPU that
botocore spends parsing one ListObjectsV2 page of 1,000 keys is measured on a canned response, since on S3 that
parse runs in the driver for every page.

    python bench/bench_relist.py --objects 100000 [--folders 16] [--s3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import listing  # noqa: E402
from pipeline.state import StateDir  # noqa: E402
from pipeline.storage import StorageOptions  # noqa: E402


def _names(objects: int, folders: int) -> list[str]:
    return [f"f{i % folders:02d}/img{i:08d}.jpg" for i in range(objects)]


def synthesize_local(root: str, objects: int, folders: int) -> None:
    for f in range(folders):
        os.makedirs(f"{root}/f{f:02d}", exist_ok=True)
    for name in _names(objects, folders):
        open(f"{root}/{name}", "wb").close()


def synthesize_s3(fs, root: str, objects: int, folders: int) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda name: fs.pipe_file(f"{root}/{name}", b""), _names(objects, folders)))


def relist_all(uri: str, opts: StorageOptions, snapshot, parts, before: float, now: float) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:   # as pipeline.changes.finished_units
        found = list(pool.map(lambda ip: listing.relist(uri, opts, snapshot, ip[0], ip[1], before, now),
                              enumerate(parts)))
    assert all(found), "every partition has its parts"
    return time.perf_counter() - t0


def walk_all(uri: str, opts: StorageOptions, parts) -> tuple[float, int]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        counts = list(pool.map(lambda p: sum(1 for _ in listing.walk(uri, opts, p)), parts))
    return time.perf_counter() - t0, sum(counts)


def bench(uri: str, out: str, opts: StorageOptions, objects: int) -> None:
    snapshot = listing.ListingSnapshot(StateDir(out, opts), uri)
    parts = snapshot.partitions(opts)
    t0 = time.perf_counter()
    for index, part in enumerate(parts):   # the first listing: every part snapshotted, none read
        list(listing.partition_parts(uri, opts, snapshot, index, part, lambda n: True, 0.0, 1.0))
    print(f"  {len(parts)} partitions; first listing into the snapshot {time.perf_counter() - t0:.2f}s")
    walked, count = walk_all(uri, opts, parts)
    assert count == objects, count
    relisted = relist_all(uri, opts, snapshot, parts, 2.0, 3.0)
    print(f"  relist of {objects} objects, nothing new: {relisted:.2f}s = {relisted / objects * 1e6:.1f} us/object "
          f"(the walk alone {walked:.2f}s = {walked / objects * 1e6:.1f} us/object)")


def botocore_parse_us_per_key(keys: int = 1000, repeat: int = 20) -> float:
    """CPU per key of botocore parsing a ListObjectsV2 response (what aiobotocore does in the driver per page)."""
    import botocore.session
    from botocore import parsers

    model = botocore.session.get_session().get_service_model("s3").operation_model("ListObjectsV2")
    contents = "".join(f"<Contents><Key>media/f00/img{i:08d}.jpg</Key><LastModified>2026-01-01T00:00:00.000Z"
                       f"</LastModified><ETag>&quot;d41d8cd98f00b204e9800998ecf8427e&quot;</ETag><Size>0</Size>"
                       f"<StorageClass>STANDARD</StorageClass></Contents>" for i in range(keys))
    body = (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<Name>b</Name><Prefix>media/</Prefix><KeyCount>{keys}</KeyCount><MaxKeys>1000</MaxKeys>"
            f"<IsTruncated>true</IsTruncated><NextContinuationToken>t</NextContinuationToken>{contents}"
            f"</ListBucketResult>").encode()
    parser = parsers.create_parser("rest-xml")
    t0 = time.perf_counter()
    for _ in range(repeat):
        parsed = parser.parse({"status_code": 200, "headers": {}, "body": body}, model.output_shape)
    assert len(parsed["Contents"]) == keys
    return (time.perf_counter() - t0) / repeat / keys * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--folders", type=int, default=16)
    parser.add_argument("--s3", action="store_true")
    args = parser.parse_args()
    print(f"botocore's parse of a ListObjectsV2 page: {botocore_parse_us_per_key():.1f} us of CPU per key")
    opts = StorageOptions(retries=2, retry_backoff_s=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.s3:
            t0 = time.perf_counter()
            synthesize_local(f"{tmp}/media", args.objects, args.folders)
            print(f"local: {args.objects} files in {args.folders} folders made in {time.perf_counter() - t0:.1f}s")
            bench(f"{tmp}/media", f"{tmp}/out", opts, args.objects)
            return
        from tests.pipeline_helpers import moto_s3, s3fs_for

        with moto_s3() as endpoint:
            fs = s3fs_for(endpoint)
            fs.mkdir("bench-relist")
            t0 = time.perf_counter()
            synthesize_s3(fs, "bench-relist/media", args.objects, args.folders)
            print(f"moto S3: {args.objects} objects in {args.folders} folders made in {time.perf_counter() - t0:.1f}s")
            s3_opts = StorageOptions(endpoint_url=endpoint, retries=2, retry_backoff_s=0.0)
            bench("s3://bench-relist/media", f"{tmp}/out", s3_opts, args.objects)


if __name__ == "__main__":
    main()
