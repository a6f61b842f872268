"""The per-nucleus table as CSV (standard library), one row written per nucleus."""

from __future__ import annotations

import csv

from cellseg.outputs.base import Nuclei, SinkContext, TempOutput
from cellseg.outputs.table import TABLE_COLUMNS, table_rows


class CsvSink:
    """``nuclei.csv``: scores to 4 decimals, µm² to 3, pixels and µm to 2."""

    def __init__(self, context: SinkContext) -> None:
        self.context = context
        self.output = TempOutput(context.folder / "nuclei.csv")
        self._file = open(self.output.path, "w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file)
        self._csv.writerow(TABLE_COLUMNS)

    def add(self, nuclei: Nuclei) -> None:
        for row in table_rows(nuclei, self.context):
            self._csv.writerow(
                [
                    row[0],
                    row[1],
                    f"{row[2]:.4f}",
                    *(f"{v:.2f}" for v in row[3:8]),
                    f"{row[8]:.3f}",
                    *(f"{v:.2f}" for v in row[9:]),
                ]
            )

    def close(self) -> None:
        self._file.close()
        self.output.commit()

    def abort(self) -> None:
        self._file.close()
        self.output.discard()
