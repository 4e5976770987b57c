"""What one `zs-cache compact` is asked to do: its options and their defaults (the CLI takes its defaults from
here), checked when they are made, before the store is opened."""

from dataclasses import dataclass
from pathlib import Path

from zeroseg.pipeline.errors import require

DEFAULT_ROWS_PER_PART = 131_072  # ImageNet-1k: 10 parts; CC12M: 92


@dataclass(frozen=True)
class CompactOptions:
    store: str | Path
    rows_per_part: int = DEFAULT_ROWS_PER_PART  # parts of fewer rows are merged into parts of at most this many

    def __post_init__(self) -> None:
        require(self.rows_per_part >= 1, f"--rows-per-part must be a positive number of rows, got {self.rows_per_part}")
