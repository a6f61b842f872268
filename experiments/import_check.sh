#!/usr/bin/env bash
# Issue 27's check: consep-dev's training tiles written as QuPath GeoJSON, imported with `cellseg import`, and the
# recipe trained on the import and on the tifs, same seed, same epochs; both scored on the held-out truth.
#   usage: RAW=/abs/consep-dev OUT=/abs/results [EPOCHS=12] [SEED=0] experiments/import_check.sh
#   run from the root of a scratch clone with nothing else running; runs tifs-seedS and geojson-seedS in $OUT
set -euo pipefail
export PATH="$PWD/.venv/bin:$PATH"
: "${RAW:?set RAW to the absolute consep-dev folder}" "${OUT:?set OUT to a folder for the results}"
EPOCHS=${EPOCHS:-12}
SEED=${SEED:-0}
mkdir -p "$OUT"
python experiments/raw_to_geojson.py "$RAW" "$OUT/annotations"
rm -rf "$OUT/imported"
pairs=()
for folder in "$RAW"/train/*/; do
  name=$(basename "$folder")
  pairs+=("$folder/image.tif=$OUT/annotations/$name.geojson")
done
cellseg import "${pairs[@]}" --mpp 0.25 --out "$OUT/imported" --no-progress | tail -2
for side in test_release test_truth test_image_name_to_ids.json; do ln -s "$RAW/$side" "$OUT/imported/$side"; done
python experiments/compare_raw.py "$RAW" "$OUT/imported" | tee "$OUT/compare.txt"
BUDGET=0 MORE="-S train.epochs=$EPOCHS" TAG="tifs-" RAW="$RAW" experiments/real_cpu_seeds.sh "$SEED"
BUDGET=0 MORE="-S train.epochs=$EPOCHS" TAG="geojson-" RAW="$OUT/imported" experiments/real_cpu_seeds.sh "$SEED"
