"""Out-of-domain scoring (issue 31): mask images as annotations, sets whose annotations live apart from their
images, the class-agnostic figures checked by hand, leave-one-lab-out, and a whole set scored end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from cellseg.annotations import AnnotationError, open_annotations
from cellseg.annotations.masks import BINARY_SPLIT, CORNER_TOUCHING
from cellseg.data.io import list_train_samples, read_train_sample
from cellseg.eval.nuclei_metrics import Counts
from cellseg.eval.ood_metrics import OodError, set_summary, summarise_sets
from cellseg.importer.pairs import PairError, sources_by_rule
from cellseg.params import OodSet
from conftest import ROOT, run_verb, tiny_params

SHARED = ROOT.parent / "shared"


def _image(path, h=40, w=50, grey=200) -> None:
    Image.fromarray(np.full((h, w, 3), grey, np.uint8)).save(path)


def _row(n_true, n_pred, tp, iou_sum, pq=None) -> dict:
    counts = Counts(
        n_true=n_true, n_pred=n_pred, tp=tp, iou_sum=iou_sum, aji_inter=tp, aji_union=n_true + n_pred
    )
    row = {f: getattr(counts, f) for f in counts.__dataclass_fields__}
    row["pq"] = counts.pq if pq is None else pq
    return row


# ------------------------------------------------------------------------------------------ mask images
def test_a_label_image_imports_back_with_the_same_pixels_per_nucleus(tmp_path, capsys) -> None:
    """Sparse ids, one nucleus in two pieces, touching nuclei: each id comes back as one nucleus, pixel-exact."""
    labels = np.zeros((40, 50), np.uint16)
    labels[5:12, 5:15] = 7
    labels[5:12, 15:20] = 300  # touches 7
    labels[30:35, 40:45] = 9
    labels[2:4, 44:48] = 9  # a second piece of 9
    _image(tmp_path / "img.png")
    tifffile.imwrite(tmp_path / "mask.tif", labels)
    params = tiny_params(import__default_class="class2").to_dict()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code, _, err = run_verb(
        "import",
        [f"{tmp_path / 'img.png'}={tmp_path / 'mask.tif'}", "--mpp", str(params["data"]["mpp"]), "--out",
         tmp_path / "raw", "--params", tmp_path / "params.yaml"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    (sample,) = list_train_samples(tmp_path / "raw", 4)
    _, back = read_train_sample(sample)
    assert not back[[0, 2, 3]].any()  # all in class2, the default class
    pairs = {(int(a), int(b)) for a, b in zip(labels.ravel(), back[1].ravel(), strict=True)}
    assert len(pairs) == 4 and {a for a, _ in pairs} == {0, 7, 9, 300}  # one imported id per id, exactly
    assert len({b for _, b in pairs}) == 4 and (0, 0) in pairs


def test_a_binary_mask_is_split_into_4_connected_nuclei_and_the_rule_is_counted(tmp_path) -> None:
    mask = np.zeros((20, 20), np.uint8)
    mask[2:6, 2:6] = 255
    mask[6:9, 6:9] = 255  # touches the first only at a corner: its own nucleus under 4-connectivity
    mask[12:18, 10:16] = 255
    Image.fromarray(mask).save(tmp_path / "gt.png")
    reader = open_annotations(tmp_path / "gt.png")
    shapes = list(reader)
    assert sorted(round(s.geometry.area) for s in shapes) == [9, 16, 36]
    assert all(s.class_name is None and s.geometry.is_valid for s in shapes)
    assert reader.repairs.counts == {BINARY_SPLIT: 3, CORNER_TOUCHING: 1}
    assert "8-connectivity would join" in reader.repairs.line(tmp_path / "gt.png")


def test_a_colour_picture_or_a_broken_file_given_as_a_mask_is_one_error_naming_it(tmp_path) -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    for name, what in (("photo.png", "colour image"), ("broken.png", "cannot read")):
        with pytest.raises(AnnotationError, match=what) as err:
            list(open_annotations(tmp_path / name))
        assert str(err.value).startswith(str(tmp_path / name)) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------- set layout
def test_annotations_in_a_parallel_folder_are_paired_by_a_rule(tmp_path) -> None:
    for patient in ("01", "02"):
        (tmp_path / f"Slide_{patient}").mkdir()
        (tmp_path / f"GT_{patient}").mkdir()
        for k in (1, 2):
            _image(tmp_path / f"Slide_{patient}" / f"{patient}_{k}.png")
            _image(tmp_path / f"GT_{patient}" / f"{patient}_{k}.png")
    sources = sources_by_rule(tmp_path, r"^Slide_(\d+)/=GT_\1/")
    assert [(s.image.relative_to(tmp_path).as_posix(), s.annotation.relative_to(tmp_path).as_posix())
            for s in sources][:2] == [("Slide_01/01_1.png", "GT_01/01_1.png"), ("Slide_01/01_2.png", "GT_01/01_2.png")]  # fmt: skip
    assert len(sources) == 4
    (tmp_path / "GT_02" / "02_2.png").unlink()
    with pytest.raises(PairError, match="02_2.png: no annotation at"):
        sources_by_rule(tmp_path, r"^Slide_(\d+)/=GT_\1/")
    with pytest.raises(PairError, match="no image path matches"):
        sources_by_rule(tmp_path, r"^Scan_(\d+)/=GT_\1/")


# --------------------------------------------------------------------------------------------- figures
def test_the_figures_pool_counts_over_nuclei_and_flag_the_worst_big_image() -> None:
    """By hand: image A 60 true, 50 found, 40 matched with IoU sum 30; image B 10 true, 0 found; image C 55 true,
    100 found, 20 matched, IoU sum 14."""
    rows = [_row(60, 50, 40, 30.0), _row(10, 0, 0, 0.0), _row(55, 100, 20, 14.0)]
    s = set_summary(rows)
    tp, fp, fn = 60, 150 - 60, 125 - 60
    assert s["pq"] == pytest.approx(44.0 / (tp + fp / 2 + fn / 2), abs=1e-6)
    assert s["dq"] == pytest.approx(tp / (tp + fp / 2 + fn / 2), abs=1e-6)
    assert s["sq"] == pytest.approx(44.0 / 60, abs=1e-6)
    assert s["f1"] == pytest.approx(2 * 60 / (125 + 150), abs=1e-6)
    assert (s["n_true"], s["n_found"], s["n_images"]) == (125, 150, 3)
    pq_c = 14.0 / (20 + 80 / 2 + 35 / 2)
    assert s["worst_pq_50plus"] == pytest.approx(pq_c, abs=1e-6) and s["images_50plus"] == 2
    assert s["images_50plus_below_0.30"] == 1  # C (0.18); A is 30/55 = 0.545
    both = summarise_sets({"a": {"summary": s, "images": rows[:1]}, "b": {"summary": s, "images": rows[1:]}})
    assert both["pooled"] == s and both["a"] == s


def test_a_set_the_training_data_was_imported_from_is_refused(tmp_path) -> None:
    from cellseg.ood.score import check_not_trained_on, ood_sources

    (tmp_path / "set").mkdir()
    _image(tmp_path / "set" / "a.png")
    (tmp_path / "set" / "a.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    sources = ood_sources("mine", OodSet(str(tmp_path / "set"), "", 0.25))
    (tmp_path / "raw").mkdir()
    check_not_trained_on("mine", sources, tmp_path / "raw")  # a plain layout: nothing imported
    record = {"samples": [{"sample": "a_0000", "image": str(tmp_path / "set" / "a.png")}]}
    (tmp_path / "raw" / "import.json").write_text(json.dumps(record))
    with pytest.raises(OodError, match=r"evaluate.ood.mine: 1 of its images are in the training data"):
        check_not_trained_on("mine", sources, tmp_path / "raw")


# ------------------------------------------------------------------------------------------- end to end
def test_a_set_of_masks_is_scored_against_its_truth(tiny_project, tmp_path, monkeypatch) -> None:
    """Mask images in a parallel folder, no resolution in the files (the set's mpp stands in): with the truth as
    the prediction every figure is perfect, and with the tiny model the counts are the masks'."""
    import cellseg.infer.predict as predict_module
    from cellseg.model.bundle import open_model
    from cellseg.ood.score import score_set

    rng = np.random.default_rng(3)
    truth_counts = []
    for k in range(3):
        (tmp_path / "set" / "img").mkdir(parents=True, exist_ok=True)
        (tmp_path / "set" / "gt").mkdir(exist_ok=True)
        labels = np.zeros((64, 80), np.uint16)
        for i in range(k + 2):
            y, x = rng.integers(4, 56), rng.integers(4, 70)
            labels[y : y + 6, x : x + 7] = i + 1
        truth_counts.append(len(np.unique(labels)) - 1)
        _image(tmp_path / "set" / "img" / f"t{k}.png", 64, 80, grey=200 + k)  # told apart by the_truth
        tifffile.imwrite(tmp_path / "set" / "gt" / f"t{k}.tif", labels)
    params = tiny_project["params"]
    bundle = open_model(tiny_project["models"] / "best.pt", params)
    spec = OodSet(str(tmp_path / "set"), r"^img/(.+)\.png$=gt/\1.tif", params.data.mpp)
    result = score_set("masks", spec, bundle, params, "cpu", progress=False, overlays=tmp_path / "worst")
    assert result["summary"]["n_true"] == sum(truth_counts) and result["summary"]["n_images"] == 3
    assert sorted(p.stem for p in (tmp_path / "worst").glob("*.png")) == sorted(result["overlays"])
    assert len(result["overlays"]) == 3  # every image has nuclei; OVERLAYS is 3
    assert [r["n_true"] for r in result["images"]] == truth_counts

    def the_truth(model, image, *args, **kwargs):
        from cellseg.instances import Instances

        (sample,) = [s for s in samples if np.array_equal(read_train_sample(s)[0], image)]
        return Instances.from_label_rows(read_train_sample(sample)[1])

    samples = []
    real_list = list_train_samples

    def remember(raw, k):
        samples[:] = real_list(raw, k)
        return samples

    monkeypatch.setattr("cellseg.ood.score.list_train_samples", remember)
    monkeypatch.setattr(predict_module, "predict_image", the_truth)
    perfect = score_set("masks", spec, bundle, params, "cpu", progress=False)["summary"]
    assert (perfect["pq"], perfect["f1"], perfect["aji"], perfect["n_found"]) == (
        1.0,
        1.0,
        1.0,
        sum(truth_counts),
    )


@pytest.mark.skipif(
    not (SHARED / "datasets/tnbc").is_dir(), reason="the TNBC set lives in ../shared (absent)"
)
def test_the_tnbc_masks_give_the_connected_components_the_readme_counts() -> None:
    spec = OodSet(str(SHARED / "datasets/tnbc"), r"^Slide_(\d+)/=GT_\1/", 0.25)
    from cellseg.ood.score import ood_sources

    sources = ood_sources("tnbc", spec)
    assert len(sources) == 50
    assert sum(len(list(open_annotations(s.annotation))) for s in sources) == 4056  # the README's figure
