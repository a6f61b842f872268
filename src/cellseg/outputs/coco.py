"""COCO RLE results, as the leaderboard reads them: ``test-results.json`` and ``submission.zip`` holding it.

``test-results.json`` is ``[{"image_id", "category_id", "segmentation": {"size": [h, w], "counts": str},
"score", "bbox": [x, y, w, h]}]`` in ``image_id`` order; ``submission.zip`` holds that file at its root under
exactly that name. The rows are detections, not nuclei: COCO AP scores a ranked list of possibly overlapping
masks, so the batches are the detections above ``predict.score_threshold``.
"""

from __future__ import annotations

import json
import zipfile

from cellseg.outputs.base import Nuclei, SinkContext, TempOutput
from cellseg.rle import to_coco_results

RESULTS_FILE = "test-results.json"
ZIP_FILE = "submission.zip"
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can hold


class CocoResultsSink:
    """Both files, written when the last image is in (the zip needs the whole list)."""

    def __init__(self, context: SinkContext) -> None:
        self.folder = context.folder
        self._rows: list[tuple[int, int, list[dict]]] = []  # (image_id, arrival, rows)

    def add(self, nuclei: Nuclei) -> None:
        if nuclei.image_id is None:
            raise ValueError("COCO results need the image's id (Nuclei.image_id)")
        self._rows.append(
            (nuclei.image_id, len(self._rows), to_coco_results(nuclei.instances, nuclei.image_id))
        )

    @property
    def rows(self) -> list[dict]:
        return [row for _, _, rows in sorted(self._rows, key=lambda r: r[:2]) for row in rows]

    def close(self) -> None:
        results = TempOutput(self.folder / RESULTS_FILE)
        text = json.dumps(self.rows)
        results.path.write_text(text)
        archive = TempOutput(self.folder / ZIP_FILE)
        # a fixed timestamp: the same predictions give a byte-identical zip, so DVC sees an unchanged output
        entry = zipfile.ZipInfo(RESULTS_FILE, date_time=ZIP_DATE_TIME)
        entry.compress_type = zipfile.ZIP_DEFLATED
        with zipfile.ZipFile(archive.path, "w") as zipped:
            zipped.writestr(entry, text.encode())
        results.commit()
        archive.commit()

    def abort(self) -> None:
        self._rows = []
