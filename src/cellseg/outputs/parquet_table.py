"""The per-nucleus table as Parquet (pyarrow), one row group per 65,536 nuclei."""

from __future__ import annotations

from cellseg.outputs.base import Nuclei, SinkContext, TempOutput
from cellseg.outputs.table import TABLE_COLUMNS, table_rows

ROW_GROUP = 65536


class ParquetSink:
    """``nuclei.parquet``: the CSV's columns at full precision (id int64, class string, score float32)."""

    def __init__(self, context: SinkContext) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.context = context
        self.output = TempOutput(context.folder / "nuclei.parquet")
        self._schema = pa.schema(
            [("id", pa.int64()), ("class", pa.string()), ("score", pa.float32())]
            + [(c, pa.float64()) for c in TABLE_COLUMNS[3:]]
        )
        self._writer = pq.ParquetWriter(self.output.path, self._schema)
        self._rows: list[tuple] = []

    def add(self, nuclei: Nuclei) -> None:
        self._rows.extend(table_rows(nuclei, self.context))
        if len(self._rows) >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self._rows:
            return
        columns = list(zip(*self._rows, strict=True))
        self._writer.write_table(pa.Table.from_arrays([pa.array(c) for c in columns], schema=self._schema))
        self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self.output.commit()

    def abort(self) -> None:
        self._writer.close()
        self.output.discard()
