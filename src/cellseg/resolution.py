"""Resolution (µm/px) as image files record it: Aperio's and OME's descriptions, TIFF resolution tags.

Read by the slide reader and by ``cellseg predict``; whether a value is believed is the caller's choice (a
slide reader accepts a wider range than a folder of images, where a scanner's dpi is common).
"""

from __future__ import annotations

import re


def parse_mpp_from_description(description: str) -> float | None:
    """Aperio's ``MPP = 0.2520`` in the ImageDescription, or OME's ``PhysicalSizeX="0.25"`` (µm)."""
    match = re.search(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)", description)
    if match is None:
        match = re.search(r'PhysicalSizeX="([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"', description)
        if match is not None and re.search(r'PhysicalSizeXUnit="(?!µm|um)', description):
            return None  # another unit: not worth guessing
    return float(match.group(1)) if match else None


def mpp_from_tags(page) -> float | None:
    """µm/px from the TIFF XResolution/ResolutionUnit tags (centimetre or inch), when plausible."""
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    num, den = tags["XResolution"].value
    unit = int(tags["ResolutionUnit"].value)
    if not num or not den:
        return None
    per_unit = num / den  # pixels per unit
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)
    if um_per_unit is None:
        return None
    return um_per_unit / per_unit
