"""The one documented configuration object, loaded from ``params.yaml``.

``params.yaml`` is the single source of every setting: the dataclasses below declare the keys and their types
but hold no default values, so a setting can never live only in code. Loading is strict: a missing key, an
unknown key (often a typo such as ``aux.w_boundry``) or a value of the wrong type stops with a message that
names the key. Each section checks its own values in ``__post_init__``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cellseg import CellsegError

STAIN_METHODS = ("random_preset", "macenko", "vahadane")
PRECISIONS = ("fp32", "fp16", "bf16")
ARCHS = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "maskrcnn_resnet18_fpn_lite")
BOUNDARY_DOWNSAMPLING = ("nearest", "area", "max")
DEVICES = ("auto", "cpu", "cuda", "mps")
MAX_CLASSES = 50
RESERVED_CLASS_NAMES = ("background",)  # the model's class 0 and the confusion matrix's "no instance"


class ParamsError(CellsegError, ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range."""


_BELOW_ONE = math.nextafter(1.0, 0.0)  # the largest float below 1


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ParamsError(message)


# ------------------------------------------------------------------------------ which keys a process reads
# With CELLSEG_PARAMS_TRACE=<dir>, every params key a process reads is recorded and written at exit to
# <dir>/<script stem>.json: tests/test_dvc_params.py compares each stage's reads with what dvc.yaml lists.
# Loading, checking, saving (to_dict) and copying (replace) are not reads.
TRACE_ENV = "CELLSEG_PARAMS_TRACE"
_reads: set[str] = set()
_tracing = [False]  # on once params are loaded with the environment variable set
_quiet = [0]  # > 0 inside _untraced()


class _Section:
    """Base of the params sections: records ``section.key`` when a traced process reads a key of params.yaml
    (sections built otherwise, e.g. from a checkpoint's saved params, are not params.yaml's keys)."""

    _section: typing.ClassVar[str] = ""
    _from_file: bool = False  # set on the sections load_params builds, and on their replace() copies

    def __getattribute__(self, name: str) -> Any:
        if _tracing[0] and not _quiet[0] and name in type(self).__dataclass_fields__:
            if object.__getattribute__(self, "_from_file"):
                _reads.add(f"{type(self)._section}.{name}")
        return object.__getattribute__(self, name)


@contextlib.contextmanager
def _untraced():
    _quiet[0] += 1
    try:
        yield
    finally:
        _quiet[0] -= 1


def _start_trace() -> None:
    folder = os.environ.get(TRACE_ENV)
    if not folder or _tracing[0]:
        return
    _tracing[0] = True
    name = Path(sys.argv[0]).stem or "python"

    def write() -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        out = Path(folder) / f"{name}.json"
        previous = set(json.loads(out.read_text())) if out.is_file() else set()
        out.write_text(json.dumps(sorted(_reads | previous)))

    atexit.register(write)


def as_dict(section: Any) -> dict[str, Any]:
    """A section's keys and values, for a record (provenance); not a read of the keys."""
    with _untraced():
        return dataclasses.asdict(section)


def replace(section: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` for params (a copy is not a read of the keys it copies)."""
    with _untraced():
        copy = dataclasses.replace(section, **changes)
        if isinstance(section, _Section | Params) and section._from_file:
            object.__setattr__(copy, "_from_file", True)
        return copy


@dataclass(frozen=True)
class DataParams(_Section):
    """Which raw dataset to use and how to split it."""

    raw_dir: str
    val_fraction: float
    seed: int
    group_regex: str
    mpp: float

    def __post_init__(self) -> None:
        _check(0.0 <= self.val_fraction < 1.0, "data.val_fraction must be in [0, 1)")
        _check(
            math.isfinite(self.mpp) and 0.01 <= self.mpp <= 100.0,
            f"data.mpp (training resolution, µm/px) must be in [0.01, 100]; got {self.mpp}",
        )
        try:
            re.compile(self.group_regex)
        except re.error as err:
            raise ParamsError(f"data.group_regex is not a valid regular expression: {err}") from None


@dataclass(frozen=True)
class SynthParams(_Section):
    """The synthetic demo dataset (same layout and quirks as the real data)."""

    seed: int
    n_train: int
    n_test: int
    min_side: int
    max_side: int
    n_dense: int

    def __post_init__(self) -> None:
        _check(self.n_train >= 1, "synth.n_train must be >= 1")
        _check(self.n_test >= 0, "synth.n_test must be >= 0")
        _check(8 <= self.min_side <= self.max_side, "synth needs 8 <= min_side <= max_side")
        _check(0 <= self.n_dense <= self.n_train, "synth.n_dense must be in [0, n_train]")


@dataclass(frozen=True)
class MapsParams(_Section):
    """Auxiliary target maps."""

    center_sigma: float
    n_previews: int

    def __post_init__(self) -> None:
        _check(self.center_sigma > 0, "maps.center_sigma must be > 0")
        _check(self.n_previews >= 0, "maps.n_previews must be >= 0")


@dataclass(frozen=True)
class ModelParams(_Section):
    """Mask R-CNN architecture and its dense-scene settings."""

    arch: str
    pretrained: str
    trainable_layers: int
    resize: str
    scale: float
    min_size: int
    max_size: int
    anchor_sizes: list[int]
    rpn_pre_nms_top_n_train: int
    rpn_post_nms_top_n_train: int
    rpn_pre_nms_top_n_test: int
    rpn_post_nms_top_n_test: int
    rpn_batch_size_per_image: int
    box_batch_size_per_image: int
    box_detections_per_img: int
    box_score_thresh: float
    box_nms_thresh: float

    def __post_init__(self) -> None:
        _check(self.arch in ARCHS, f"model.arch must be one of {', '.join(ARCHS)}; got {self.arch!r}")
        _check(
            self.resize in ("scale", "min_max"),
            f"model.resize must be 'scale' or 'min_max'; got {self.resize!r}",
        )
        _check(self.scale > 0, "model.scale must be > 0")
        _check(0 < self.min_size <= self.max_size, "model needs 0 < min_size <= max_size")
        _check(0 <= self.trainable_layers <= 5, "model.trainable_layers must be in [0, 5]")
        _check(len(self.anchor_sizes) == 5, "model.anchor_sizes needs 5 sizes, one per FPN level")
        _check(all(a > 0 for a in self.anchor_sizes), "model.anchor_sizes must be positive")
        for key in (
            "rpn_pre_nms_top_n_train",
            "rpn_post_nms_top_n_train",
            "rpn_pre_nms_top_n_test",
            "rpn_post_nms_top_n_test",
            "rpn_batch_size_per_image",
            "box_batch_size_per_image",
            "box_detections_per_img",
        ):
            _check(getattr(self, key) >= 1, f"model.{key} must be >= 1")
        _check(0.0 <= self.box_score_thresh < 1.0, "model.box_score_thresh must be in [0, 1)")
        _check(0.0 < self.box_nms_thresh <= 1.0, "model.box_nms_thresh must be in (0, 1]")


@dataclass(frozen=True)
class AuxParams(_Section):
    """Auxiliary centre/boundary heads: ``loss = L_maskrcnn + w_center·L_center + w_boundary·L_boundary``."""

    enabled: bool
    w_center: float
    w_boundary: float
    hidden_channels: int
    boundary_downsample: str

    def __post_init__(self) -> None:
        _check(self.w_center >= 0, f"aux.w_center must be >= 0; got {self.w_center}")
        _check(self.w_boundary >= 0, f"aux.w_boundary must be >= 0; got {self.w_boundary}")
        _check(self.hidden_channels >= 1, "aux.hidden_channels must be >= 1")
        _check(
            self.boundary_downsample in BOUNDARY_DOWNSAMPLING,
            f"aux.boundary_downsample must be one of {', '.join(BOUNDARY_DOWNSAMPLING)}; "
            f"got {self.boundary_downsample!r}",
        )


@dataclass(frozen=True)
class AugmentParams(_Section):
    """Training augmentation, applied jointly to image, instance masks and maps (validation gets none)."""

    elastic_p: float
    elastic_alpha: float
    elastic_sigma: float
    hflip_p: float
    vflip_p: float
    rotate90_p: float
    stain_p: float
    stain_method: str
    stain_scale: float
    stain_shift: float
    color_p: float
    color_strength: float
    scale_p: float
    scale_min: float
    scale_max: float
    blur_p: float
    jpeg_p: float

    def __post_init__(self) -> None:
        probabilities = ("elastic_p", "hflip_p", "vflip_p", "rotate90_p", "stain_p", "color_p", "scale_p")
        for key in (*probabilities, "blur_p", "jpeg_p"):
            _check(0.0 <= getattr(self, key) <= 1.0, f"augment.{key} must be a probability in [0, 1]")
        _check(0.0 <= self.color_strength <= 0.5, "augment.color_strength must be in [0, 0.5]")
        _check(
            0.25 <= self.scale_min <= self.scale_max <= 4.0,
            "augment needs 0.25 <= scale_min <= scale_max <= 4",
        )
        _check(
            self.stain_method in STAIN_METHODS,
            f"augment.stain_method must be one of {', '.join(STAIN_METHODS)}; got {self.stain_method!r}",
        )
        _check(0.0 <= self.stain_scale <= 0.5, "augment.stain_scale must be in [0, 0.5]")
        _check(0.0 <= self.stain_shift <= 0.3, "augment.stain_shift must be in [0, 0.3]")


BUDGET_SCOPES = ("train", "pipeline")


@dataclass(frozen=True)
class TrainParams(_Section):
    """The optimisation loop."""

    epochs: int
    batch_size: int
    crop_size: int
    lr: float
    weight_decay: float
    grad_clip: float
    workers: int
    seed: int
    device: str
    precision: str
    nproc: int
    sync_bn: bool
    eval_every: int
    train_eval_images: int
    resume: bool
    repeat_threshold: float
    time_budget_min: float
    budget_scope: str

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size must be >= 1")
        _check(self.crop_size >= 32, "train.crop_size must be >= 32")
        _check(self.lr > 0, "train.lr must be > 0")
        _check(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _check(self.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)")
        _check(self.workers >= -1, "train.workers must be >= 0, or -1 for a choice per device")
        _check(self.device in DEVICES, f"train.device must be one of {', '.join(DEVICES)}")
        _check(
            self.precision in PRECISIONS,
            f"train.precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}",
        )
        _check(self.nproc >= 1, "train.nproc must be >= 1")
        _check(self.eval_every >= 1, "train.eval_every must be >= 1")
        _check(self.train_eval_images >= 0, "train.train_eval_images must be >= 0")
        _check(
            0.0 <= self.repeat_threshold <= 1.0 and math.isfinite(self.repeat_threshold),
            "train.repeat_threshold must be in [0, 1] (0 = uniform sampling)",
        )
        _check(
            self.time_budget_min >= 0 and math.isfinite(self.time_budget_min),
            "train.time_budget_min must be >= 0 (minutes; 0 = train.epochs rules)",
        )
        _check(
            self.budget_scope in BUDGET_SCOPES,
            f"train.budget_scope must be one of {', '.join(BUDGET_SCOPES)}; got {self.budget_scope!r}",
        )
        _check(
            self.time_budget_min == 0 or self.nproc == 1,
            "train.time_budget_min needs train.nproc: 1 (a budget across several processes is not supported)",
        )


@dataclass(frozen=True)
class PredictParams(_Section):
    """Inference and post-processing, shared by evaluation, submission and ``cellseg predict``."""

    score_threshold: float
    mask_threshold: float
    max_per_image: int
    tile_size: int
    tile_overlap: int
    batch_size: int
    resolve_overlaps: bool
    tta_views: int
    label_score_threshold: float
    class_score_thresholds: list[float]
    min_kept_fraction: float
    device: str

    def __post_init__(self) -> None:
        _check(0.0 <= self.score_threshold < 1.0, "predict.score_threshold must be in [0, 1)")
        _check(0.0 < self.mask_threshold < 1.0, "predict.mask_threshold must be in (0, 1)")
        _check(self.max_per_image >= 1, "predict.max_per_image must be >= 1")
        _check(self.tile_size >= 64, "predict.tile_size must be >= 64")
        _check(
            0 <= self.tile_overlap < self.tile_size // 2, "predict.tile_overlap must be in [0, tile_size/2)"
        )
        _check(self.batch_size >= 1, "predict.batch_size must be >= 1")
        _check(self.tta_views in (1, 2, 4), "predict.tta_views must be 1 (off), 2 or 4 (flips)")
        _check(0.0 <= self.label_score_threshold < 1.0, "predict.label_score_threshold must be in [0, 1)")
        _check(
            all(0.0 <= v < 1.0 for v in self.class_score_thresholds),
            "predict.class_score_thresholds values must be in [0, 1) (class 1 first)",
        )  # their number, [] or one per class of `classes`: Params checks it
        _check(0.0 <= self.min_kept_fraction <= 1.0, "predict.min_kept_fraction must be in [0, 1]")
        _check(self.device in DEVICES, f"predict.device must be one of {', '.join(DEVICES)}")

    @property
    def label_thresholds(self) -> float | tuple[float, ...]:
        """What label maps keep: ``class_score_thresholds`` (one per class) where given, else
        ``label_score_threshold`` for every class (:class:`cellseg.nuclei.NucleusRule`)."""
        per_class = self.class_score_thresholds
        return tuple(per_class) if per_class else self.label_score_threshold


@dataclass(frozen=True)
class PostprocParams(_Section):
    """Map-guided post-processing (``cellseg.infer.postproc``): each step on its own switch; a model without the
    auxiliary heads gives no maps, and then every step is skipped.

    With steps on and a model with heads, the ``tune`` stage picks ``peak_threshold`` from ``tune.peak_grid``
    by validation PQ; ``recover_threshold`` then keeps its ratio to it (:meth:`at_peak_threshold`).
    """

    peak_threshold: float
    peak_min_distance: int
    boundary_threshold: float
    min_area: int
    split: bool
    trim: bool
    recover: bool
    recover_threshold: float
    recover_radius: int
    recover_neighbours: int
    recover_class: int
    recover_score: float
    rescore: bool
    rescore_weight: float

    def __post_init__(self) -> None:
        for key in ("peak_threshold", "boundary_threshold", "recover_threshold"):
            _check(0.0 < getattr(self, key) < 1.0, f"postproc.{key} must be a probability in (0, 1)")
        _check(self.peak_min_distance >= 1, "postproc.peak_min_distance must be >= 1 (px)")
        _check(self.min_area >= 1, "postproc.min_area must be >= 1 (px)")
        _check(self.recover_radius >= 1, "postproc.recover_radius must be >= 1 (px)")
        _check(self.recover_neighbours >= 0, "postproc.recover_neighbours must be >= 0 (0: no vote)")
        _check(self.recover_class >= 1, "postproc.recover_class must be >= 1 (a class of `classes`)")
        _check(0.0 < self.recover_score <= 1.0, "postproc.recover_score must be in (0, 1]")
        _check(0.0 <= self.rescore_weight <= 1.0, "postproc.rescore_weight must be in [0, 1]")

    @property
    def any_step(self) -> bool:
        return self.split or self.trim or self.recover or self.rescore

    def at_peak_threshold(self, peak_threshold: float) -> PostprocParams:
        """These params with another (tuned) ``peak_threshold``; ``recover_threshold`` keeps its ratio to it.

        A trained head's centre probabilities sit well below 1 and shift with the training, so a recovery
        threshold fixed in probability would drift against the tuned peaks: it scales with them instead,
        ``recover_threshold × peak_threshold / self.peak_threshold``, capped at the largest float below 1 (the
        params allow (0, 1)). At the default ratio 1 every uncovered peak is a recovery candidate.
        """
        if peak_threshold == self.peak_threshold:
            return self
        recover = peak_threshold * (self.recover_threshold / self.peak_threshold)  # ratio 1: exactly the peak
        return replace(self, peak_threshold=peak_threshold, recover_threshold=min(recover, _BELOW_ONE))


@dataclass(frozen=True)
class TuneParams(_Section):
    """The ``tune`` stage's grids: label-score, mask and centre-peak thresholds tried on the validation split."""

    enabled: bool
    score_grid: list[float]
    class_score_grid: list[float]
    mask_grid: list[float]
    peak_grid: list[float]

    def __post_init__(self) -> None:
        for key in ("score_grid", "class_score_grid", "mask_grid", "peak_grid"):
            grid = getattr(self, key)
            _check(len(grid) >= 1 or key == "class_score_grid", f"tune.{key} needs at least one value")
            _check(all(0.0 < v < 1.0 for v in grid), f"tune.{key} values must be in (0, 1)")


@dataclass(frozen=True)
class OodSet:
    """One out-of-domain set of ``evaluate.ood``: annotated images from another lab, scored by the ``ood`` stage
    and never trained or tuned on."""

    images: str  # a folder of images
    annotations: str  # "": the annotation file beside each image; "REGEX=REPLACEMENT": from its relative path
    mpp: float  # the images' µm/px where their files do not record it (0: they must)

    def __post_init__(self) -> None:
        _check(self.mpp == 0 or 0.01 <= self.mpp <= 100.0, "evaluate.ood: mpp must be 0 or in [0.01, 100]")
        if self.annotations:
            _check("=" in self.annotations, "evaluate.ood: annotations must be '' or 'REGEX=REPLACEMENT'")
            try:
                re.compile(self.annotations.split("=", 1)[0])
            except re.error as err:
                raise ParamsError(f"evaluate.ood: annotations' REGEX is not valid: {err}") from None


@dataclass(frozen=True)
class EvaluateParams(_Section):
    """Validation scoring and its pictures, and the out-of-domain sets."""

    n_overlays: int
    confusion_score_threshold: float
    ood: dict[str, OodSet]

    def __post_init__(self) -> None:
        for name in self.ood:
            _check(
                re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) is not None and name != "pooled",
                f"evaluate.ood: {name!r} cannot name a set (letters, digits, _ . -; 'pooled' is the sets' total)",
            )
        _check(self.n_overlays >= 0, "evaluate.n_overlays must be >= 0")
        _check(
            0.0 <= self.confusion_score_threshold < 1.0,
            "evaluate.confusion_score_threshold must be in [0, 1)",
        )


@dataclass(frozen=True)
class SlideParams(_Section):
    """Whole-slide inference (``cellseg slide``, the ``slides`` stage): blocks, tissue detection, outputs."""

    input_dir: str
    block_tiles: int
    tissue_max_side: int
    tissue_min_saturation: int
    tissue_max_saturation: int
    min_tissue_fraction: float
    outputs: list[str]
    retries: int

    def __post_init__(self) -> None:
        _check(self.block_tiles >= 1, "slide.block_tiles must be >= 1")
        _check(self.tissue_max_side >= 16, "slide.tissue_max_side must be >= 16")
        _check(
            0 <= self.tissue_min_saturation <= self.tissue_max_saturation <= 255,
            "slide needs 0 <= tissue_min_saturation <= tissue_max_saturation <= 255",
        )
        _check(0.0 <= self.min_tissue_fraction < 1.0, "slide.min_tissue_fraction must be in [0, 1)")
        _check(
            len(self.outputs) > 0 and all(isinstance(name, str) for name in self.outputs),
            "slide.outputs must list at least one output format (cellseg.outputs.FORMATS), e.g. [geojson, csv]",
        )
        _check(self.retries >= 0, "slide.retries must be >= 0")


UNKNOWN_CLASS_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class ImportParams(_Section):
    """``cellseg import`` and the import stage: annotated images and slides into the raw training layout."""

    input_dir: str
    tile_size: int
    region_classes: list[str]
    class_map: dict[str, str]
    default_class: str
    unknown_classes: str
    max_region_mpx: float

    def __post_init__(self) -> None:
        _check(self.tile_size >= 32, "import.tile_size must be >= 32 (pixels at data.mpp)")
        _check(
            self.unknown_classes in UNKNOWN_CLASS_POLICIES,
            f"import.unknown_classes must be one of {', '.join(UNKNOWN_CLASS_POLICIES)}",
        )
        _check(self.max_region_mpx > 0, "import.max_region_mpx must be > 0")


@dataclass(frozen=True)
class Params:
    """Everything in ``params.yaml``."""

    data: DataParams
    classes: list[str]  # the class names in order: class k of the label files and the model is classes[k-1]
    synth: SynthParams
    maps: MapsParams
    model: ModelParams
    aux: AuxParams
    augment: AugmentParams
    train: TrainParams
    predict: PredictParams
    postproc: PostprocParams
    tune: TuneParams
    evaluate: EvaluateParams
    slide: SlideParams
    import_: ImportParams = field(metadata={"key": "import"})  # `import` is a Python keyword

    def __post_init__(self) -> None:
        check_classes(self.classes)
        n = len(self.classes)
        _check(
            len(self.predict.class_score_thresholds) in (0, n),
            f"predict.class_score_thresholds must be [] or {n} values, one per name of `classes` (class 1 "
            f"first); got {len(self.predict.class_score_thresholds)}",
        )
        _check(
            self.postproc.recover_class <= n,
            f"postproc.recover_class must be in 1..{n} (`classes` has {n} names); got {self.postproc.recover_class}",
        )
        _check(
            min(self.tune.score_grid) >= self.predict.score_threshold,
            "tune.score_grid values must be >= predict.score_threshold (lower-scored detections are not kept)",
        )
        _check(
            self.predict.score_threshold >= self.model.box_score_thresh,
            f"predict.score_threshold ({self.predict.score_threshold}) is below model.box_score_thresh "
            f"({self.model.box_score_thresh}), which the model applies first: lower model.box_score_thresh too",
        )

    _from_file = False  # (not a field) set by load_params: reads of the top-level values are then traced

    def __getattribute__(self, name: str) -> Any:
        if name in _TOP_LEVEL_VALUES and _tracing[0] and not _quiet[0]:
            if object.__getattribute__(self, "_from_file"):
                _reads.add(_TOP_LEVEL_VALUES[name])
        return object.__getattribute__(self, name)

    def to_dict(self) -> dict[str, Any]:
        with _untraced():
            values = dataclasses.asdict(self)
            return {_key(f): values[f.name] for f in dataclasses.fields(self)}


def check_classes(names: Any, where: str = "classes") -> tuple[str, ...]:
    """The class names of ``classes`` (params.yaml, or a checkpoint's), checked: 1 to :data:`MAX_CLASSES`
    unique, non-empty names without surrounding whitespace or control characters."""
    _check(
        isinstance(names, list | tuple) and all(isinstance(n, str) for n in names),
        f"{where} must be a list of class names, got {names!r:.80}",
    )
    _check(1 <= len(names) <= MAX_CLASSES, f"{where} must name 1 to {MAX_CLASSES} classes; got {len(names)}")
    for name in names:
        _check(
            bool(name) and name == name.strip() and name.isprintable(),
            f"{where}: {name!r} is not a class name (non-empty, no surrounding spaces, no control characters)",
        )
        _check(
            name.lower() not in RESERVED_CLASS_NAMES,
            f"{where}: {name!r} is reserved (the model's background class); name the class otherwise",
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    _check(not repeated, f"{where}: repeated name(s) {', '.join(repeated)}; each class needs its own name")
    return tuple(names)


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Load and check ``params.yaml``. ``overrides`` maps dotted keys (``"train.epochs"``) to new values."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise ParamsError(f"{path}: not found (run from the project root)") from err
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: invalid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ParamsError(
            f"{path}: expected a mapping of sections (data, model, train, ...), got {raw!r:.60}"
        )
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for depth, key in enumerate(parents):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                where = ".".join(parents[: depth + 1])
                raise ParamsError(f"{path}: cannot set {dotted}: {where} is {node!r}, not a mapping")
        node[leaf] = value
    try:
        with _untraced():
            params = _from_dict(Params, raw, "")
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
    _start_trace()
    return params


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ParamsError(f"{where or 'top level'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {_key(f): f.name for f in dataclasses.fields(cls)}  # params.yaml key -> attribute
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(f"unknown key(s) {', '.join(_join(where, k) for k in unknown)}")
    missing = [k for k in fields if k not in data]
    if missing:
        raise ParamsError(f"missing key(s) {', '.join(_join(where, k) for k in missing)}")
    kwargs = {}
    for yaml_key, name in fields.items():
        key, kind = _join(where, yaml_key), hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _from_dict(kind, data[yaml_key], key)
        else:
            kwargs[name] = _coerce(data[yaml_key], kind, key)
    section = cls(**kwargs)
    if issubclass(cls, _Section) or cls is Params:
        object.__setattr__(section, "_from_file", True)
    return section


def _key(f: dataclasses.Field) -> str:
    """A field's key in params.yaml: its name, or ``metadata["key"]`` where the name cannot be (``import``)."""
    return f.metadata.get("key", f.name)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check ``value`` against a simple type (bool, int, float, str, list[...]); ints are accepted as floats."""
    origin = typing.get_origin(kind)
    if origin is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise ParamsError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_kind, item = typing.get_args(kind)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ParamsError(f"{key} must be a mapping, got {value!r}")
        if dataclasses.is_dataclass(item):
            return {
                _coerce(k, key_kind, f"{key} key"): _from_dict(item, v, f"{key}.{k}")
                for k, v in value.items()
            }
        return {_coerce(k, key_kind, f"{key} key"): _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported union type for {key}")
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):
            raise ParamsError(f"{key} must be a finite number, got {value!r}")
    elif kind is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"unsupported parameter type {kind} for {key}")
    if not ok:
        raise ParamsError(f"{key} must be {kind.__name__}, got {value!r}")
    return value


_TOP_LEVEL_VALUES: dict[str, str] = {}
"""Params' fields that are values, not sections (``classes``): attribute -> params.yaml key, traced as a key."""
for _field in dataclasses.fields(Params):
    _kind = typing.get_type_hints(Params)[_field.name]
    if dataclasses.is_dataclass(_kind):
        _kind._section = _key(_field)
    else:
        _TOP_LEVEL_VALUES[_field.name] = _key(_field)
