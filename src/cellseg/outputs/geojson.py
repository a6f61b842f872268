"""QuPath GeoJSON: a ``FeatureCollection`` of detections, streamed one nucleus at a time.

As ``qupath.lib.io.GsonTools`` and qubalab's ``qubalab.objects.geojson`` write it: each ``Feature`` has an ``id``
(a UUID, derived from the run's stem and the nucleus id, so a rerun gives the same ids), a ``Polygon`` geometry
in level-0 pixels (closed rings, x then y) and ``properties`` ``{"objectType": "detection", "classification":
{"name", "color": [r, g, b]}, "measurements": {name: number}}``.
"""

from __future__ import annotations

import gzip
import json
import uuid

from cellseg.outputs.base import Nuclei, SinkContext, TempOutput, class_colour

_NAMESPACE = uuid.UUID("6f1c7f3e-8d1a-4c55-9a53-3a4f0c1e2b77")


class GeoJsonSink:
    """``nuclei.geojson``."""

    FILE = "nuclei.geojson"

    def __init__(self, context: SinkContext) -> None:
        self.context = context
        self.output = TempOutput(context.folder / self.FILE)
        self._file = self._open(self.output.path)
        self._file.write('{"type": "FeatureCollection", "features": [\n')
        self._first = True

    def _open(self, path):
        return open(path, "w", encoding="utf-8")

    def add(self, nuclei: Nuclei) -> None:
        from shapely.geometry import mapping

        mpp = self.context.mpp or 1.0
        areas = nuclei.areas_px
        for k, poly in enumerate(nuclei.polygons):
            label, nucleus_id = int(nuclei.instances.labels[k]), int(nuclei.ids[k])
            feature = {
                "type": "Feature",
                "id": str(uuid.uuid5(_NAMESPACE, f"{self.context.stem}/{nucleus_id}")),
                "geometry": mapping(poly),
                "properties": {
                    "objectType": "detection",
                    "name": f"nucleus {nucleus_id}",
                    "classification": {
                        "name": self.context.class_names[label - 1],
                        "color": list(class_colour(label)),
                    },
                    "measurements": {
                        "id": nucleus_id,
                        "score": round(float(nuclei.instances.scores[k]), 4),
                        "area_um2": round(float(areas[k]) * mpp * mpp, 3),
                    },
                },
            }
            self._file.write(("" if self._first else ",\n") + json.dumps(feature, separators=(",", ":")))
            self._first = False

    def close(self) -> None:
        self._file.write("\n]}\n")
        self._file.close()
        self.output.commit()

    def abort(self) -> None:
        self._file.close()
        self.output.discard()


class GzipGeoJsonSink(GeoJsonSink):
    """``nuclei.geojson.gz``: the same features, gzipped (QuPath opens it)."""

    FILE = "nuclei.geojson.gz"

    def _open(self, path):
        return gzip.open(path, "wt", encoding="utf-8", compresslevel=6)
