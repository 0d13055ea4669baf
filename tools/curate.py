"""Curate WebDataset shards with the paper's per-stage rules (FineViT §3.3, Appendix A).

    python tools/curate.py IN_SHARD_DIR OUT_SHARD_DIR [--stage {1,2,3}] \
        [--config key=value ...] [--samples-per-shard 1000] [--prefix curated]

Reads every `*-NNNNNN.tar` shard of IN_SHARD_DIR in name order and writes the kept samples (the
original image bytes, the JSON with curated regions) as new shards in OUT_SHARD_DIR, plus:
  curation_report.json  counts per rule (images and regions) and the configuration used
  curation_report.txt   the same as a table
  regions.png           some kept images with their regions and captions drawn on them
Thresholds: see megatron_finevit/curation/config.py; e.g. `--config min_short_side=336 seed=1`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from megatron_finevit.config.errors import UserError, report_user_error
from megatron_finevit.curation.config import CurationConfig, apply_overrides
from megatron_finevit.curation.pipeline import Curator, format_report
from megatron_finevit.curation.visualize import SampleReservoir, render_regions_png
from megatron_finevit.data.bad_samples import BadSampleCounter
from megatron_finevit.data.shards import ShardWriter, iter_shard_records, list_shards

logger = logging.getLogger("curate")


def directory_problems(in_dir: Path, out_dir: Path) -> list[str]:
    """One line per reason the shards of ``in_dir`` cannot be curated into ``out_dir``."""
    if not in_dir.is_dir():
        return [f"IN_SHARD_DIR {in_dir}: no such directory"]
    if not list_shards(in_dir):
        return [f"IN_SHARD_DIR {in_dir} holds no shards named PREFIX-NNNNNN.tar"]
    if out_dir.resolve() == in_dir.resolve():
        return ["OUT_SHARD_DIR must differ from IN_SHARD_DIR"]
    if out_dir.is_dir() and list_shards(out_dir):
        # never mix with (or half-overwrite) an earlier output
        return [f"OUT_SHARD_DIR {out_dir} already holds shards; curate into a new directory"]
    return []


def curate(in_dir: str | Path, out_dir: str | Path, cfg: CurationConfig,
           samples_per_shard: int = 1000, prefix: str = "curated", progress: bool = True,
           max_bad_fraction: float = 0.05) -> dict:
    """Curate all shards of `in_dir` into `out_dir`; returns the report (also written there)."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    problems = directory_problems(in_dir, out_dir)
    if problems:
        raise UserError(problems)
    shards = list_shards(in_dir)
    curator = Curator(cfg)
    reservoir = SampleReservoir(cfg.num_visualized, seed=cfg.seed)
    bad = BadSampleCounter(max_bad_fraction=max_bad_fraction, name="curate")
    start = time.perf_counter()
    with ShardWriter(out_dir, prefix=prefix, max_samples_per_shard=samples_per_shard) as writer, \
            tqdm(desc="curate", unit="img", disable=not progress) as bar:
        for shard in shards:
            for key, image_ext, image_bytes, meta, _ in iter_shard_records(shard, bad):
                decision = curator(image_bytes, meta)
                if decision.kept:
                    writer.write(key, image_bytes, decision.meta, image_ext=image_ext)
                    reservoir.offer(decision.image, decision.meta)
                bar.update(1)
                bar.set_postfix(kept=curator.images_kept, refresh=False)
    seconds = time.perf_counter() - start

    report = curator.report()
    report["bad_samples"] = bad.totals()
    report["input_shards"] = len(shards)
    report["output_shards"] = [p.name for p in writer.written_shards]
    report["seconds"] = round(seconds, 3)
    (out_dir / "curation_report.json").write_text(json.dumps(report, indent=2) + "\n")
    text = format_report(report) + (f"{curator.images_in} images in {seconds:.1f} s "
                                     f"({curator.images_in / max(seconds, 1e-9):.1f} img/s)\n")
    (out_dir / "curation_report.txt").write_text(text)
    if not render_regions_png(reservoir.samples, str(out_dir / "regions.png"),
                              cfg.max_regions_drawn, cfg.seed):
        logger.warning("no kept sample has regions or OCR boxes: regions.png not written")
    logger.info("\n%s", text)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("in_dir", help="directory of input shards")
    parser.add_argument("out_dir", help="directory for the curated shards and the reports")
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), default=3,
                        help="which stage's rules to apply (default 3)")
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="threshold overrides, e.g. min_short_side=336 nms_iou=0.6")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--prefix", default="curated", help="output shard name prefix")
    parser.add_argument("--max-bad-fraction", type=float, default=0.05,
                        help="abort when more than this fraction of samples is unreadable")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = apply_overrides(CurationConfig.for_stage(args.stage), args.config)
    except ValueError as err:
        parser.error(str(err))
    try:
        curate(args.in_dir, args.out_dir, cfg, args.samples_per_shard, args.prefix,
               progress=not args.no_progress, max_bad_fraction=args.max_bad_fraction)
    except UserError as exc:  # a missing or unusable directory: one line, exit 2
        return report_user_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
