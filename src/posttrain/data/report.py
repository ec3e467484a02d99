"""What loading and encoding did to a dataset, in counts a trainer prints."""

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class LoadReport:
    """Counts for one dataset, filled in by `validate_rows` and the `encode_*` functions.

    rows: rows read from the source.
    skipped: rows left out by `on_bad_row="skip"`, per reason ("missing field", "turn order", ...; "identical
        pair" is counted by the encoders, once the pair's tokens are known).
    truncated: examples cut to `max_length`.
    dropped: examples left out because they did not fit `max_length` (`truncation="drop"`, or nothing
        trainable was left after truncating).
    """

    source: str = ""
    rows: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    truncated: int = 0
    dropped: int = 0

    @property
    def kept(self) -> int:
        """Rows that became examples (before encoding drops, after the pairs it skipped)."""
        return self.rows - sum(self.skipped.values())

    def summary(self) -> str:
        """One line for a log: `d.jsonl: 100 rows, 3 skipped (empty text: 3), 4 truncated, 1 dropped`."""
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
        skipped_text = f"{skipped} skipped ({reasons})" if skipped else "0 skipped"
        head = f"{self.source}: " if self.source else ""
        return f"{head}{self.rows} rows, {skipped_text}, {self.truncated} truncated, {self.dropped} dropped"
