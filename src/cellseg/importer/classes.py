"""An annotation's class names onto the model's ``classes``: mapped, defaulted, regions apart, unknowns listed.

Pathologists name classes their own way (``nuclei_tumor``, ``Lymphocyte``); the model learns ``classes`` in
params.yaml. ``import.class_map`` renames, ``import.default_class`` classifies the unclassified and
``import.region_classes`` marks the areas where every nucleus was drawn. A name that is none of these is an error
listing every such name and its count (``import.unknown_classes: skip`` makes it a warning), because guessing
would teach the model the wrong class.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from cellseg import CellsegError

REGION = 0
"""The class index of a region annotation (nuclei are 1..K)."""


class ClassError(CellsegError, ValueError):
    """An annotation's class cannot be placed; the message names the file."""


@dataclass
class ClassMap:
    """Class name -> index (1..K for nuclei, :data:`REGION`), with the counts of what it could not place."""

    classes: list[str]
    class_map: dict[str, str] = field(default_factory=dict)
    default_class: str = ""
    region_classes: list[str] = field(default_factory=list)
    skip_unknown: bool = False
    unknown: Counter = field(default_factory=Counter)
    unclassified: int = 0

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.class_map.items() if v not in self.classes}
        if bad:
            pairs = ", ".join(f"{k} -> {v}" for k, v in bad.items())
            raise ClassError(f"import.class_map maps onto names not in `classes` {self.classes}: {pairs}")
        if self.default_class and self.default_class not in self.classes:
            raise ClassError(
                f"import.default_class {self.default_class!r} is not one of `classes` {self.classes}"
            )

    @classmethod
    def of(cls, params) -> ClassMap:
        imp = params.import_
        return cls(
            list(params.classes),
            dict(imp.class_map),
            imp.default_class,
            list(imp.region_classes),
            imp.unknown_classes == "skip",
        )

    def index(self, name: str | None) -> int | None:
        """The class index of ``name``: 1..K, :data:`REGION`, or None (counted as unknown or unclassified)."""
        if name is None or name == "":
            if not self.default_class:
                self.unclassified += 1
                return None
            name = self.default_class
        if name in self.region_classes:
            return REGION
        name = self.class_map.get(name, name)
        if name in self.classes:
            return self.classes.index(name) + 1
        self.unknown[name] += 1
        return None

    def problems(self, path) -> str | None:
        """What could not be placed in ``path``, as one line (None when everything was)."""
        parts = []
        if self.unknown:
            listed = ", ".join(f"{name!r} ({n})" for name, n in self.unknown.most_common())
            parts.append(f"class names neither in `classes` {self.classes} nor in import.class_map: {listed}")
        if self.unclassified:
            parts.append(f"{self.unclassified} nuclei without a classification and no import.default_class")
        return f"{path}: " + "; ".join(parts) if parts else None

    def check(self, path) -> str | None:
        """Raise :class:`ClassError` for what could not be placed, or return the warning line when skipping."""
        line = self.problems(path)
        if line is None:
            return None
        if not self.skip_unknown or self.unclassified:
            hint = "map them with import.class_map, add them to `classes`" + (
                ", or set import.unknown_classes: skip to leave them out" if self.unknown else ""
            )
            raise ClassError(f"{line} ({hint})")
        return f"warning: {line}: left out (import.unknown_classes: skip)"

    def reset(self) -> None:
        self.unknown.clear()
        self.unclassified = 0
