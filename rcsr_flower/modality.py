"""What a client holds (§1): both modalities, only images, or only captions.

One enum for the whole app: the partition assigns it, the client trains the towers it
names and sends its wire code with every reply, the server reads the code back to know
which towers a client's update may move.
"""

from __future__ import annotations

from enum import StrEnum


class Modality(StrEnum):
    PAIRED = "paired"
    IMAGE_ONLY = "image-only"
    TEXT_ONLY = "text-only"

    @property
    def code(self) -> int:
        """The integer a reply's ``modality`` metric carries (Flower metrics are numbers)."""
        return _CODES[self]

    @classmethod
    def from_code(cls, code: object) -> Modality:
        """The modality a reply's ``modality`` metric names; ``ValueError`` otherwise."""
        for modality, value in _CODES.items():
            if code == value and isinstance(code, int) and not isinstance(code, bool):
                return modality
        raise ValueError(
            f"modality is {code!r}, expected 0 (both towers), 1 (vision only) or 2 (text only)"
        )

    @property
    def towers(self) -> frozenset[str]:
        """The towers a client of this modality trains."""
        return _TOWERS[self]

    @property
    def has_image(self) -> bool:
        return self is not Modality.TEXT_ONLY

    @property
    def has_text(self) -> bool:
        return self is not Modality.IMAGE_ONLY


_CODES = {Modality.PAIRED: 0, Modality.IMAGE_ONLY: 1, Modality.TEXT_ONLY: 2}
_TOWERS = {
    Modality.PAIRED: frozenset({"vision", "text"}),
    Modality.IMAGE_ONLY: frozenset({"vision"}),
    Modality.TEXT_ONLY: frozenset({"text"}),
}
MODALITIES: tuple[str, ...] = tuple(m.value for m in Modality)
