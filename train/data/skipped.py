"""Records that yield no document: counted per input and reason, reported, and limited.

`prepare` (and train, which runs it into its cache) tallies each input: records read
(lines of jsonl and text, rows of parquet and hf), documents written, and the records
skipped by reason. Empty records (an empty or null text) are skipped and reported but
are not malformed; malformed ones (invalid JSON, not an object, no text key, a text
that is not a string, a line that is not UTF-8) count against a limit on their share,
since a wrong key or a corrupt file shows up as many of them. An input that yields no
document at all is always an error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from sparsetron.train.data.errors import DataError

__all__ = [
    "EMPTY",
    "MAX_SKIPPED_FRACTION",
    "Tally",
    "check_tallies",
    "skipped_lines",
    "tallies_from_json",
    "tallies_to_json",
]

EMPTY = "empty"
# The default limit (data.max_skipped_fraction, --max-skipped-fraction): per input, so a few corrupt
# rows or a truncated last line of a small file pass (reported), while a wrong key or another
# schema in part of a file, which shows up as a large share, stops the run. 0.01 would stop a
# 50-row file for one cut-off line.
MAX_SKIPPED_FRACTION = 0.05
# How many inputs the summary names one by one before it sums up the rest.
FILES_SHOWN = 5


@dataclass
class Tally:
    """What one input yielded and skipped."""

    path: str
    records: int = 0
    """Records read: lines of jsonl and text, rows of parquet and hf."""
    documents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Records skipped, by reason (EMPTY or a malformation such as 'invalid JSON')."""
    first_bad: str = ""
    """'FILE:LINE: what is wrong' of the first malformed record ('' when none)."""

    @property
    def malformed(self) -> int:
        return sum(n for reason, n in self.skipped.items() if reason != EMPTY)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def add(self, reasons: dict[str, int]) -> None:
        for reason, n in reasons.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n

    def reasons(self) -> str:
        """'3 missing key 'text', 1 empty', most frequent first."""
        ranked = sorted(self.skipped.items(), key=lambda item: (-item[1], item[0]))
        return ", ".join(f"{n:,} {reason}" for reason, n in ranked)


def check_tallies(tallies: list[Tally], max_fraction: float, knob: str) -> None:
    """Fail on the first input that yields no document or skips too many malformed records.

    `knob` names the setting that raises the limit (data.max_skipped_fraction, --max-skipped-fraction).
    """
    for tally in tallies:
        if tally.documents == 0:
            why = f": {tally.reasons()}" if tally.skipped else ""
            first = f"; the first malformed, {tally.first_bad}" if tally.first_bad else ""
            raise DataError(f"{tally.path}: no documents in {tally.records:,} records{why}{first}")
        if tally.malformed > max_fraction * tally.records:
            raise DataError(
                f"{tally.path}: {tally.malformed:,} of {tally.records:,} records malformed "
                f"({tally.malformed / tally.records:.1%}), more than {knob}={max_fraction:g} allows "
                f"(skipped: {tally.reasons()}); the first, {tally.first_bad}"
            )


def skipped_lines(tallies: list[Tally]) -> list[str]:
    """Console lines: each input with skipped records (the first few), then the total; [] when none."""
    hit = [t for t in tallies if t.skipped]
    if not hit:
        return []
    lines = [f"  {t.path}: {t.n_skipped:,} of {t.records:,} records ({t.reasons()})" for t in hit[:FILES_SHOWN]]
    if len(hit) > FILES_SHOWN:
        lines.append(f"  ... and {len(hit) - FILES_SHOWN} more inputs with skipped records")
    total = Tally("all", skipped={})
    for t in hit:
        total.add(t.skipped)
    records = sum(t.records for t in tallies)
    return [f"skipped {total.n_skipped:,} of {records:,} records ({total.reasons()}):", *lines]


def tallies_to_json(tallies: list[Tally]) -> list[dict]:
    return [asdict(t) for t in tallies]


def tallies_from_json(rows: list[dict]) -> list[Tally]:
    return [Tally(**row) for row in rows]
