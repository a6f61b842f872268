"""``python -m cellseg.eval.score_results``: results JSON or zip against real tif truth folders, figures and clear errors."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

import cellseg.eval.score_results as score_module
from cellseg.data.io import write_label_tif
from cellseg.eval.score_results import ResultsError, main, read_results, read_truth, score_results
from cellseg.instances import Instances
from cellseg.outputs.coco import RESULTS_FILE
from cellseg.rle import to_coco_results
from conftest import ROOT, disk_labels

CONSEP = ROOT.parent / "shared" / "datasets" / "consep-dev"
SHAPE = (40, 48)


@pytest.fixture
def truth(tmp_path: Path) -> dict:
    """Two mapped images: ``a`` with two class-2 discs in a real class2.tif, ``b`` without a truth folder."""
    folder = tmp_path / "truth" / "a"
    folder.mkdir(parents=True)
    write_label_tif(folder / "class2.tif", disk_labels(SHAPE, [(10, 10), (25, 30)], 5, first_id=3))
    mapping = tmp_path / "mapping.json"
    mapping.write_text(
        json.dumps(
            [
                {"file_name": f"{s}.tif", "id": i, "height": SHAPE[0], "width": SHAPE[1]}
                for i, s in ((7, "a"), (9, "b"))
            ]
        )
    )
    rows = np.zeros((4, *SHAPE), np.int32)
    rows[1] = disk_labels(SHAPE, [(10, 10), (25, 30)], 5, first_id=3)
    return {
        "dir": tmp_path / "truth",
        "mapping": mapping,
        "a": Instances.from_label_rows(rows),
        "tmp": tmp_path,
    }


def _results(truth: dict) -> list[dict]:
    """Both nuclei of ``a`` exactly (scores .9 and .3), and a false positive at .8 on ``b`` (no truth folder)."""
    a = truth["a"]
    a = Instances(a.height, a.width, a.labels, np.array([0.9, 0.3], np.float32), a.offsets, a.crops)
    fp = Instances(
        *SHAPE, np.array([2]), np.array([0.8], np.float32), np.array([[0, 0]]), [np.ones((6, 6), bool)]
    )
    return to_coco_results(a, 7) + to_coco_results(fp, 9)


def test_figures_by_hand_from_json_and_zip(truth: dict, capsys) -> None:
    results = truth["tmp"] / "results.json"
    results.write_text(json.dumps(_results(truth)))
    archive = truth["tmp"] / "submission.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(results, arcname="test-results.json")
    for source in (results, archive):
        report = score_results(source, truth["dir"], truth["mapping"], score_threshold=0.5)
        m = report.metrics
        assert report.missing_truth == ["b"]
        # COCO, by score: .9 TP, .8 FP, .3 TP -> precision 1 up to recall .5, then 2/3: (51 + 50·2/3) / 101
        assert m["ap50_at_100"] == pytest.approx((51 + 50 * 2 / 3) / 101)
        # label maps at .5: a has 1 TP (IoU 1) and 1 FN -> PQ 1/1.5; b has 1 FP -> PQ 0; mean 1/3
        assert m["pq"] == pytest.approx(1 / 3) and m["sq"] == pytest.approx(0.5)
        assert m["f1"] == pytest.approx(2 * 1 / (2 + 2))
        assert m["per_class"]["class2"]["pq"] == pytest.approx(1 / (1 + 0.5 + 0.5))
        assert m["per_class"]["class1"]["pq"] == -1.0 and m["mpq_plus"] == pytest.approx(0.5)
    main([str(archive), str(truth["dir"]), str(truth["mapping"]), "--json", "--score-threshold", "0.2"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["pq"] == pytest.approx(0.5)  # at .2 both nuclei of a count: PQ 1 there, 0 on b
    for key in ("ap50_at_100", "ap", "pq", "dq", "sq", "mpq_plus", "aji", "f1", "per_class"):
        assert key in printed


def test_table_and_per_image_files(truth: dict, capsys) -> None:
    results = truth["tmp"] / "results.json"
    results.write_text(json.dumps(_results(truth)))
    per_csv, per_json = truth["tmp"] / "per.csv", truth["tmp"] / "per.json"
    main([str(results), str(truth["dir"]), str(truth["mapping"]), "--per-image", str(per_csv)])
    table = capsys.readouterr().out
    assert "class2" in table and "AP50@100" in table and "1 without truth folder" in table
    rows = list(csv.DictReader(per_csv.open()))
    assert [(r["name"], r["n_true"], r["n_pred"]) for r in rows] == [("a", "2", "1"), ("b", "0", "1")]
    assert float(rows[0]["pq"]) == pytest.approx(2 / 3) and float(rows[1]["pq"]) == 0.0
    main([str(results), str(truth["dir"]), str(truth["mapping"]), "--per-image", str(per_json)])
    assert [r["name"] for r in json.loads(per_json.read_text())] == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "results file not found"),
        ("{not json", "cannot read the results"),
        ({"a": 1}, "expected a JSON list"),
        (
            [{"image_id": 99, "category_id": 1, "score": 0.5, "segmentation": {}}],
            "row 0: image_id 99 is not in",
        ),
        ([{"image_id": 7, "category_id": 1}], "row 0: needs image_id, category_id and a numeric score"),
        ([{"image_id": 7, "category_id": 5, "score": 0.5}], "row 0: category_id 5"),
        (
            [{"image_id": 7, "category_id": 1, "score": 0.5, "segmentation": [[1, 2, 3]]}],
            "row 0: 'segmentation'",
        ),
        (
            [
                {
                    "image_id": 7,
                    "category_id": 1,
                    "score": 0.5,
                    "segmentation": {"size": [3, 3], "counts": "0"},
                }
            ],
            "row 0: mask size",
        ),
    ],
)
def test_clear_errors_name_the_file_and_row(truth: dict, content, message: str) -> None:
    results = truth["tmp"] / "bad.json"
    if content is not None:
        results.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ResultsError, match=message) as err:
        score_results(results, truth["dir"], truth["mapping"])
    assert str(results) in str(err.value)


def test_a_zip_without_results_and_a_missing_truth_dir(truth: dict) -> None:
    archive = truth["tmp"] / "empty.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("other.json", "[]")
    with pytest.raises(ResultsError, match="no test-results.json"):
        score_results(archive, truth["dir"], truth["mapping"])
    (truth["tmp"] / "ok.json").write_text("[]")
    with pytest.raises(ResultsError, match="truth folder not found"):
        score_results(truth["tmp"] / "ok.json", truth["tmp"] / "nowhere", truth["mapping"])


def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def test_a_zip_must_hold_the_results_file_alone(truth: dict) -> None:
    tmp, results = truth["tmp"], json.dumps(_results(truth)).encode()
    cases = {
        "extra.zip": (
            {RESULTS_FILE: results, "notes.txt": b"x", "__MACOSX/._t": b""},
            "alone; it also holds notes.txt, __MACOSX/._t",
        ),
        "nested.zip": (
            {f"submission/{RESULTS_FILE}": results},
            "no test-results.json at the root of the zip "
            r"\(it holds submission/test-results.json\)",
        ),
        "empty.zip": ({}, r"no test-results.json at the root of the zip \(it is empty\)"),
    }
    for name, (entries, message) in cases.items():
        with pytest.raises(ResultsError, match=message) as err:
            read_results(_zip(tmp / name, entries))
        assert str(err.value).startswith(f"{tmp / name}: "), name
    assert read_results(_zip(tmp / "ok.zip", {RESULTS_FILE: results})) == json.loads(results)


def test_an_oversized_results_file_is_not_unpacked(truth: dict, monkeypatch) -> None:
    tmp, results = truth["tmp"], json.dumps(_results(truth)).encode()
    archive = _zip(tmp / "big.zip", {RESULTS_FILE: results})
    (tmp / "big.json").write_bytes(results)
    monkeypatch.setattr(score_module, "MAX_RESULTS_BYTES", len(results) - 1)
    opened = []
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *a, **k: opened.append(a) or pytest.fail("unpacked"))
    with pytest.raises(
        ResultsError,
        match=rf"big.zip: test-results.json unpacks to {len(results):,} bytes, more "
        rf"than a results file may have \({len(results) - 1:,} bytes\); not unpacked",
    ):
        read_results(archive)
    with pytest.raises(
        ResultsError, match=rf"big.json: {len(results):,} bytes, more than a results file may have"
    ):
        read_results(tmp / "big.json")
    assert not opened


def test_a_zip_bomb_is_not_unpacked(truth: dict, monkeypatch) -> None:
    """Valid JSON (an empty list padded with 8 MiB of spaces) packed about 1000:1: refused by its ratio alone."""
    archive = _zip(truth["tmp"] / "bomb.zip", {RESULTS_FILE: b"[" + b" " * (8 << 20) + b"]"})
    assert zipfile.ZipFile(archive).infolist()[0].compress_size < (8 << 20) // 500
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *a, **k: pytest.fail("unpacked"))
    with pytest.raises(
        ResultsError, match=r"bomb.zip: test-results.json unpacks to \d+ times its packed size"
    ):
        read_results(archive)


def test_a_header_that_understates_the_size_is_an_error(truth: dict) -> None:
    """The zip's headers say 10 bytes; the entry holds 20,000: at most the declared bytes are unpacked."""
    archive = _zip(truth["tmp"] / "lying.zip", {RESULTS_FILE: b"[" + b" " * 19998 + b"]"})
    raw = bytearray(archive.read_bytes())
    info = zipfile.ZipFile(archive).infolist()[0]
    for offset in (info.header_offset + 22, raw.rindex(b"PK\x01\x02") + 24):  # local and central headers
        raw[offset : offset + 4] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(raw))
    assert zipfile.ZipFile(archive).infolist()[0].file_size == 10
    with pytest.raises(ResultsError, match=r"lying.zip: cannot read the results \(BadZipFile: Bad CRC-32"):
        read_results(archive)


@pytest.mark.skipif(not CONSEP.is_dir(), reason=f"consep-dev not available at {CONSEP} (../shared)")
def test_consep_truth_scored_against_itself_is_perfect(tmp_path: Path) -> None:
    from cellseg.data.io import read_test_mapping

    entries = read_test_mapping(CONSEP / "test_image_name_to_ids.json")[:6]
    mapping = tmp_path / "mapping.json"
    mapping.write_text(
        json.dumps(
            [
                {"file_name": e.file_name, "id": e.image_id, "height": e.height, "width": e.width}
                for e in entries
            ]
        )
    )
    truths, _ = read_truth(CONSEP / "test_truth", entries, 4)
    rows = [row for e, t in zip(entries, truths, strict=True) for row in to_coco_results(t, e.image_id)]
    assert len(rows) > 50
    results = tmp_path / "results.json"
    results.write_text(json.dumps(rows))
    m = score_results(results, CONSEP / "test_truth", mapping).metrics
    for key in ("ap50_at_100", "pq", "dq", "sq", "mpq_plus", "aji", "aji_plus", "dice2", "f1"):
        assert m[key] == pytest.approx(1.0), key


def test_thresholds_file_gives_per_class_label_score_thresholds(truth: dict, capsys) -> None:
    """With the tune stage's file: class 2 at 0.2 (both nuclei of a kept, the .8 FP on b too) -> PQ 0.5, as
    --score-threshold 0.2; a file without the per-class entry uses its global threshold."""
    results = truth["tmp"] / "results.json"
    results.write_text(json.dumps(_results(truth)))
    thresholds = truth["tmp"] / "thresholds.json"
    args = [str(results), str(truth["dir"]), str(truth["mapping"])]
    thresholds.write_text(
        json.dumps(
            {
                "tuned": True,
                "label_score_threshold": 0.5,
                "mask_threshold": 0.5,
                "label_score_threshold_per_class": {"1": 0.5, "2": 0.2, "3": 0.5, "4": 0.5},
            }
        )
    )
    main([*args, "--json", "--thresholds", str(thresholds)])
    printed = json.loads(capsys.readouterr().out)
    assert printed["pq"] == pytest.approx(0.5) and printed["score_threshold"] == [0.5, 0.2, 0.5, 0.5]
    main([*args, "--thresholds", str(thresholds)])
    assert "score >= per class 0.5/0.2/0.5/0.5" in capsys.readouterr().out
    thresholds.write_text(json.dumps({"tuned": True, "label_score_threshold": 0.5, "mask_threshold": 0.5}))
    main([*args, "--json", "--thresholds", str(thresholds)])
    assert json.loads(capsys.readouterr().out)["pq"] == pytest.approx(1 / 3)
