"""One row of every dataset's table: a mitotic figure, where its crop is, and what is known about it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

UNKNOWN = "unknown"


class DataError(ValueError):
    """A dataset folder that does not follow its layout, with the offending rows named."""


@dataclass(frozen=True)
class Figure:
    image_id: str  # unique in a merged table: sources other than MIDOG25 are prefixed "<source>:"
    path: Path
    label: int  # 1 = atypical (majority of experts)
    slide: str
    tumor: str
    scanner: str
    origin: str = UNKNOWN
    species: str = UNKNOWN
    votes: tuple[int, ...] = ()  # each expert's call, 1 = atypical; empty where the source gives none
    source: str = "MIDOG25"
    coordinates: tuple[int, int] | None = None
    pixel_size_um: float | None = None  # where the source states it per figure; else its scanner's

    @property
    def domain(self) -> str:
        """What a figure's scores are grouped by: its scanner where known, else its origin (an AtNorM lab)."""
        return self.scanner if self.scanner != UNKNOWN else self.origin

    @property
    def soft_label(self) -> float:
        """Fraction of experts who called it atypical; the majority label where votes are not given."""
        return sum(self.votes) / len(self.votes) if self.votes else float(self.label)
