"""`lsdr shards ...` (write, index, verify, sample) over `data_pipelines`.

Handlers print a short summary and return the exit status; library errors (`DataError`) are
turned into one line and status 2 by `lsdr_repr.cli`. `verify` returns 1 when it found problems.
"""

from __future__ import annotations

import argparse

from lsdr_repr.cli._common import add_command as add
from lsdr_repr.cli._common import count

EXIT_OK, EXIT_PROBLEMS = 0, 1


def register(sub) -> None:
    shards = add(sub, "shards", "Write, index, verify and sample WebDataset shards.",
                 "lsdr shards write ~/images data/shards --max-side 512")
    sub = shards.add_subparsers(dest="shards_command", required=True, metavar="SUBCOMMAND")
    p = add(sub, "write",
            "Write images (ImageFolder tree, flat folder, or CSV/TSV of path[,label]) as "
            "WebDataset shards with a manifest; an interrupted write resumes when re-run.",
            "lsdr shards write ~/imagenet/train data/imagenet/train --prefix train "
            "--max-side 512 --seed 0")
    p.add_argument("src", help="image folder (class subfolders = labels), flat folder, or .csv/.tsv")
    p.add_argument("out", help="output directory (shards, manifest.json, write_report.json)")
    p.add_argument("--prefix", default="shard", help="shard names: PREFIX-000000.tar (default: "
                   "%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed of the sample order across "
                   "shards (default: %(default)s)")
    p.add_argument("--max-count", type=int, default=None, metavar="N",
                   help="samples per shard at most (default: 10000)")
    p.add_argument("--max-size", default="256MB", metavar="BYTES",
                   help="source bytes per shard at most, e.g. 256MB, 1GiB (default: %(default)s)")
    p.add_argument("--max-side", type=int, default=None, metavar="N",
                   help="re-encode images whose longer side exceeds N, keeping the aspect ratio")
    p.add_argument("--min-side", type=int, default=None, metavar="N",
                   help="shrink images so their shorter side is N (never enlarged): the "
                   "pre-shrink for a reader at data.image_size=N, which then never upsamples")
    p.add_argument("--quality", type=int, default=None, metavar="Q",
                   help="JPEG quality of re-encoded images (default: 95)")
    p.add_argument("--layout", choices=["auto", "imagefolder", "flat"], default="auto",
                   help="how to read a folder source (default: %(default)s: class subfolders "
                   "and no files at the top means ImageFolder)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="encoding processes (default: all CPUs; 1: no subprocesses)")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="refuse images with more pixels (decompression bombs; default ~179M)")
    p.add_argument("--follow-links", action="store_true",
                   help="also follow symbolic links that lead out of SRC (default: such links "
                   "are left out and reported; loops and repeats are always listed once)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the shards of another source in OUT (refused otherwise)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (off a terminal: no progress lines)")
    p.set_defaults(handler=_cmd_write)

    p = add(sub, "index",
            "Build a manifest.json for existing shards (img2dataset or any WebDataset writer; "
            "local, http(s), s3:// ...): sample counts and sha256, streamed once. Training "
            "needs none, but with one it counts epochs.",
            "lsdr shards index 's3://bucket/laion/{00000..00999}.tar'")
    p.add_argument("shards", help="shard spec: directory, brace pattern, glob or URL")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="where to write the manifest (default: manifest.json next to the shards; "
                   "required for http(s) shards)")
    p.add_argument("--workers", type=int, default=4, metavar="N",
                   help="shards streamed in parallel (threads; default: %(default)s)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (off a terminal: no progress lines)")
    p.set_defaults(handler=_cmd_index)

    p = add(sub, "verify",
            "Re-read every shard: sha256 against the manifest, sample counts, every image "
            "decodes. Exit status 1 when anything is wrong.",
            "lsdr shards verify data/imagenet/train --workers 8")
    p.add_argument("out", help="shard directory (or its manifest.json)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (off a terminal: no progress lines)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="shards checked in parallel (default: %(default)s)")
    p.set_defaults(handler=_cmd_verify)

    p = add(sub, "sample",
            "Write the embedded sample data (scikit-learn's 1797 real handwritten digits, "
            "coloured, 64x64) as OUT/train, OUT/val, OUT/test shard dirs. No download.",
            "lsdr shards sample data/sample")
    p.add_argument("out", nargs="?", default="data/sample",
                   help="output directory (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="image side (default: %(default)s)")
    p.add_argument("--photos", action="store_true",
                   help="digits over crops of scikit-image's bundled photos instead of plain "
                   "colour backgrounds")
    p.add_argument("--grey", action="store_true",
                   help="the digits as scanned, white on black, no colours")
    p.add_argument("--seed", type=int, default=0, help="colours and split (default: %(default)s)")
    p.set_defaults(handler=_cmd_sample)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def _cmd_write(args: argparse.Namespace) -> int:
    from data_pipelines import writer

    kwargs = {}
    if args.max_count is not None:
        kwargs["max_count"] = args.max_count
    if args.quality is not None:
        kwargs["quality"] = args.quality
    if args.max_pixels is not None:
        kwargs["max_pixels"] = args.max_pixels
    result = writer.write_shards(
        args.src, args.out, prefix=args.prefix, seed=args.seed,
        max_bytes=writer.parse_size(args.max_size), max_side=args.max_side,
        min_side=args.min_side, layout=args.layout,
        workers=args.workers, progress=not args.no_progress, follow_links=args.follow_links,
        overwrite=args.overwrite, **kwargs)
    m = result.manifest
    classes = f", {m.num_classes} classes" if m.num_classes else ""
    print(f"wrote {result.written} samples{classes} in {count(len(m.shards), 'shard')} "
          f"({_human_bytes(m.num_bytes)}) to {result.out}")
    if result.shards_reused:
        print(f"kept {len(result.shards_reused)} complete shards from an earlier run, "
              f"wrote {len(result.shards_written)}")
    # skipped files: the writer's own warning names how many and where the reasons are
    print(f"manifest: {result.manifest_path}")
    return EXIT_OK


def _cmd_index(args: argparse.Namespace) -> int:
    from data_pipelines.index import build_index

    result = build_index(args.shards, out=args.out, workers=args.workers,
                         progress=not args.no_progress)
    m = result.manifest
    labels = "labelled (cls)" if m.labelled else "not all labelled"
    print(f"indexed {m.num_samples} samples in {count(len(m.shards), 'shard')} "
          f"({_human_bytes(m.num_bytes)}), {labels}")
    print(f"manifest: {result.written_to}")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from data_pipelines.verify import verify_shards

    report = verify_shards(args.out, workers=args.workers, progress=not args.no_progress)
    for check in report.shards:
        print(f"{check.name}: {check.good} good, {check.bad} bad, "
              f"sha256 {'ok' if check.sha256_ok else 'MISMATCH'}")
        for problem in check.problems:
            print(f"  {problem}")
    if report.extra_files:
        print(f"not in the manifest (ignored): {', '.join(report.extra_files)}")
    bad_shards = len(report.bad_shards)
    shards = count(len(report.shards), "shard")
    status = "OK" if report.ok else f"FAILED: {bad_shards} of {shards} bad"
    print(f"{report.root}: {shards}, {report.good} good samples, "
          f"{report.bad} bad: {status}")
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def _cmd_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    from data_pipelines.manifest import read_manifest
    from data_pipelines.sample import write_sample_shards

    splits = write_sample_shards(Path(args.out), image_size=args.size, photos=args.photos,
                                 grey=args.grey, seed=args.seed)
    for name, path in splits.items():
        m = read_manifest(path)
        print(f"{name}: {m.num_samples} images, {m.num_classes} classes, "
              f"{count(len(m.shards), 'shard')} ({_human_bytes(m.num_bytes)}): "
              f"{path / 'manifest.json'}")
    return EXIT_OK
