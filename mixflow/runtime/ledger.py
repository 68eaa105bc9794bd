"""The delivery ledger: proves each key of an epoch reached exactly one rank exactly once.

For an epoch resumed from a checkpoint, the keys delivered before the checkpoint (known
from the saved state) are counted with the ones delivered after it, so a key sent both
before and after (a replay that should not have happened) shows up as a duplicate.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class EpochLedger:
    epoch: int
    expected: int
    delivered: int
    per_rank: dict[int, int]
    duplicates: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    before_resume: int = 0  # keys delivered before the checkpoint this epoch was resumed from

    @property
    def exactly_once(self) -> bool:
        return not (self.duplicates or self.missing or self.unexpected)

    def describe(self) -> str:
        if self.exactly_once:
            return (f"epoch {self.epoch}: {self.delivered} keys delivered exactly once"
                    + (f" ({self.before_resume} before the resume)" if self.before_resume else "")
                    + (f", {len(self.skipped)} skipped (quarantined)" if self.skipped else ""))
        parts = [f"epoch {self.epoch}: delivery NOT exactly-once"]
        for name in ("duplicates", "missing", "unexpected"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{len(keys)} {name} (e.g. {', '.join(keys[:5])})")
        return "; ".join(parts)


def check_epoch(epoch: int, expected_keys: set[str], per_rank_keys: dict[int, list[str]],
                skipped_keys: list[str], before_resume: list[str] = ()) -> EpochLedger:
    """Compare what ranks received (plus ``before_resume``, the keys delivered in this epoch
    before the checkpoint it was resumed from) with the dataset minus what was skipped."""
    counts = Counter(k for keys in [*per_rank_keys.values(), before_resume] for k in keys)
    skipped = set(skipped_keys)
    should = expected_keys - skipped
    return EpochLedger(
        epoch=epoch,
        expected=len(should),
        delivered=sum(counts.values()),
        per_rank={r: len(k) for r, k in per_rank_keys.items()},
        duplicates=sorted(k for k, c in counts.items() if c > 1),
        missing=sorted(should - counts.keys()),
        unexpected=sorted(k for k in counts if k not in should),
        skipped=sorted(skipped),
        before_resume=len(before_resume),
    )
