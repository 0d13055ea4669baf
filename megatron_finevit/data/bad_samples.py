"""Bad-sample accounting: skip broken data loudly, abort when too much of it is broken.

Web-scale image data always holds some broken samples (truncated downloads, corrupt JPEGs, bad
JSON). Crashing on the first one wastes a cluster allocation; silently skipping hides a broken
pipeline. The policy here: every reader raises or reports a `BadSampleError` with a short
machine-readable `reason`, a `BadSampleCounter` logs each skip (with shard and member) and counts it
per reason, and once at least `min_samples` samples were seen it raises `RuntimeError` as soon as
the bad fraction exceeds `max_bad_fraction`.

Items smaller than a sample (an invalid box inside an otherwise good sample) are *dropped*, not
skipped: they are counted per reason too but do not count towards the bad-sample fraction.
"""

from __future__ import annotations

import logging
from collections import Counter

logger = logging.getLogger(__name__)


class BadSampleError(ValueError):
    """A sample (or one of its parts) that cannot be used.

    Attributes:
        reason: short snake_case key used for counting, e.g. "corrupt_image", "invalid_json".
    """

    def __init__(self, reason: str, message: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {message}" if message else reason)


class BadSampleCounter:
    """Counts good / skipped samples and dropped sub-sample items; enforces a bad-sample budget.

    Args:
        max_bad_fraction: abort when skipped / seen exceeds this (after `min_samples` seen).
        min_samples: samples seen before the fraction is enforced (small counts are noisy).
        name: label used in log lines and the abort message (e.g. the data set or stage).
    """

    def __init__(self, max_bad_fraction: float = 0.05, min_samples: int = 100, name: str = "data"):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples}")
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.name = name
        self.good = 0
        self.skipped: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def num_seen(self) -> int:
        return self.good + self.num_skipped

    @property
    def bad_fraction(self) -> float:
        return self.num_skipped / self.num_seen if self.num_seen else 0.0

    def ok(self, n: int = 1) -> None:
        """Record `n` samples that were read successfully."""
        self.good += n
        self._check()

    def skip(self, reason: str, shard: str = "", member: str = "", detail: str = "") -> None:
        """Record (and log) one skipped sample; raise RuntimeError if the budget is exceeded."""
        self.skipped[reason] += 1
        logger.warning("%s: skipped sample (%s) shard=%s member=%s %s", self.name, reason, shard,
                       member, detail)
        self._check()

    def skip_error(self, err: BadSampleError, shard: str = "", member: str = "") -> None:
        """`skip` for a caught `BadSampleError`."""
        self.skip(err.reason, shard=shard, member=member, detail=str(err))

    def drop(self, reason: str, n: int = 1, shard: str = "", member: str = "") -> None:
        """Record (and log) `n` dropped items inside an otherwise usable sample (e.g. bad boxes)."""
        if n <= 0:
            return
        self.dropped[reason] += n
        logger.info("%s: dropped %d item(s) (%s) shard=%s member=%s", self.name, n, reason, shard,
                    member)

    def totals(self) -> dict:
        """Counts as a plain dict: good, skipped (total and per reason), dropped per reason."""
        return {"good": self.good, "skipped": self.num_skipped, "skipped_by_reason":
                dict(self.skipped), "dropped_by_reason": dict(self.dropped)}

    def summary(self) -> str:
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.skipped.items())) or "none"
        drops = ", ".join(f"{r}={n}" for r, n in sorted(self.dropped.items())) or "none"
        return (f"{self.name}: {self.good} good samples, {self.num_skipped} skipped "
                f"({100 * self.bad_fraction:.2f}%; {reasons}); dropped items: {drops}")

    def _check(self) -> None:
        if self.num_seen >= self.min_samples and self.bad_fraction > self.max_bad_fraction:
            raise RuntimeError(
                f"{self.name}: too many bad samples: {self.num_skipped} of {self.num_seen} "
                f"({100 * self.bad_fraction:.2f}%) exceed the limit of "
                f"{100 * self.max_bad_fraction:.2f}% ({self.summary()}). The data is probably "
                "broken (wrong path, truncated copy, wrong format); fix it or raise "
                "max_bad_fraction deliberately.")
