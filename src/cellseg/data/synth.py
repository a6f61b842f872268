"""A deterministic synthetic H&E dataset in exactly the raw layout and quirks of the real data.

The demo pipeline must run end to end without the real (non-redistributable) images, so this module paints
plausible H&E tiles: eosin-pink fibrous stroma with pale clefts, and haematoxylin-stained nuclei of four cell
types that differ the way real ones do (size, outline, darkness, chromatin texture, cytoplasm):

- class1, epithelial-like: large, pale, vesicular oval/polygonal nuclei with a dark membrane, in sheets;
- class2, lymphocyte-like: small, round, very dark nuclei, many, in dense touching aggregates;
- class3, neutrophil-like: medium nuclei of 2-4 dark lobes joined by thin bridges, in a pale pink cytoplasm;
- class4, macrophage-like: large, pale, mottled, kidney-shaped or irregular nuclei in foamy cytoplasm.

It is written with :func:`cellseg.data.io.write_image_tif` and :func:`cellseg.data.io.write_label_tif`, so the files carry
every quirk of the real ones: RGBA LZW images, float64 masks, one id counter running across the class files of
an image, absent class files, touching instances that share borders, and rare overlaps between classes.

Everything derives from ``SynthParams.seed``: the same parameters give byte-identical files. Colours come from
stain concentrations through the Beer-Lambert law (optical density per stain), which is what makes the tiles
look like H&E rather than like coloured shapes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import draw

from cellseg.data.io import IMAGE_FILE, TEST_DIR, TEST_MAPPING, class_file, write_image_tif, write_label_tif
from cellseg.fsutil import write_json
from cellseg.params import SynthParams

TYPICAL_SIDE = 290  # median side of an ordinary image, px (real median test image: about 374×464)
DENSE_ABOVE = 150  # a dense image holds more instances than this; any other image at most this many
DENSE_COUNT = (200, 320)  # instances aimed at in a dense image; a few placements fail, > DENSE_ABOVE remain
DENSITY = (1 / 2600, 1 / 1100)  # instances per px² in ordinary images (real sample: 1 per 1190 px²)
MAX_SAME_CLASS_OVERLAP = 0.15  # share of a new nucleus that may cover same-class ones (shared borders)
MAX_AREA_LOSS = 0.25  # share of an existing nucleus a later one may paint over
MAX_TOUCH = 0.10  # share of a new nucleus that may touch other classes (the contested pixels are dropped)
OVERLAP_CHANCE = 0.08  # chance that a larger collision with another class is kept as a true overlap
MAX_OVERLAP = 0.40
MIN_VISIBLE = 0.3  # nuclei cut by the image edge keep at least this share of their area

# optical density per unit of stain (R, G, B): haematoxylin from Ruifrok & Johnston (2001); eosin fitted to the
# pink of typical H&E stroma, RGB about (235, 160, 195), which the pure-eosin vector renders too magenta
HAEMATOXYLIN = np.array([0.650, 0.704, 0.286], np.float32)
EOSIN = np.array([0.150, 0.860, 0.490], np.float32)


@dataclass(frozen=True)
class CellStyle:
    """How one cell type looks and groups. Radii are in px; real nuclei here are 13-25 px across."""

    radius: tuple[float, float]  # nucleus radius (class3: radius of one lobe)
    elongation: tuple[float, float]  # long/short axis ratio
    wobble: float  # amplitude of the outline harmonics: 0 is an ellipse, more is polygonal/irregular
    dent: tuple[float, float]  # depth of a kidney-shaped notch (0: none)
    lobes: tuple[int, int]  # number of lobes (1: one body)
    stain: tuple[float, float]  # haematoxylin concentration: darkness of the nucleus
    tint: float  # eosin in the nucleus: turns it from blue towards purple-pink
    chromatin: tuple[float, float]  # amplitude of the fine and of the coarse chromatin texture
    rim: float  # extra stain on the nuclear membrane (negative: a paler edge that parts touching dark nuclei)
    halo: tuple[float, float, float]  # cytoplasm around the nucleus: reach (px), eosin, haematoxylin
    group: tuple[int, int]  # instances per group
    packed: bool  # groups are touching sheets on a jittered hexagonal lattice, else a loose scatter
    presence: float  # chance that an image holds this class at all
    weight: float  # share of an image's instances when present


STYLES = (
    CellStyle(  # class1, epithelial
        radius=(9.0, 12.5), elongation=(1.1, 1.5), wobble=0.06, dent=(0.0, 0.0), lobes=(1, 1),
        stain=(0.55, 0.75), tint=0.0, chromatin=(0.45, 0.15), rim=0.9, halo=(6.0, 0.65, 0.12),
        group=(4, 22), packed=True, presence=0.70, weight=0.35,
    ),
    CellStyle(  # class2, lymphocyte
        radius=(4.0, 5.8), elongation=(1.0, 1.15), wobble=0.03, dent=(0.0, 0.0), lobes=(1, 1),
        stain=(1.7, 2.1), tint=0.05, chromatin=(0.08, 0.04), rim=-0.15, halo=(1.5, 0.10, 0.05),
        group=(3, 45), packed=True, presence=0.85, weight=0.45,
    ),
    CellStyle(  # class3, neutrophil
        radius=(4.0, 5.0), elongation=(1.0, 1.2), wobble=0.04, dent=(0.0, 0.0), lobes=(2, 4),
        stain=(1.1, 1.35), tint=0.35, chromatin=(0.10, 0.05), rim=0.2, halo=(9.0, 0.20, 0.04),
        group=(1, 5), packed=False, presence=0.45, weight=0.12,
    ),
    CellStyle(  # class4, macrophage
        radius=(10.0, 13.5), elongation=(1.3, 1.8), wobble=0.12, dent=(0.25, 0.45), lobes=(1, 1),
        stain=(0.50, 0.65), tint=0.45, chromatin=(0.25, 0.45), rim=0.5, halo=(9.0, 0.15, 0.08),
        group=(1, 3), packed=False, presence=0.45, weight=0.12,
    ),
)  # fmt: skip
SYNTH_CLASSES = len(STYLES)
"""The generator's classes, one style each: it writes ``class1.tif .. class4.tif`` (params.yaml's default
``classes``), whatever ``classes`` says."""


@dataclass(frozen=True)
class ImageSpec:
    """One image to generate: where it goes, its size, how many instances to aim at and its own seed."""

    split: str  # "train" or "test"
    name: str  # sample folder (train) or file stem (test): a uuid derived from the seed
    height: int
    width: int
    target: int  # instances aimed at; rejected placements make the final count a little lower
    seed: tuple[int, ...]
    image_id: int = 0  # submission id of a test image (1..n_test); 0 for train


# ---------------------------------------------------------------------------------------------------- planning
def plan_dataset(params: SynthParams) -> list[ImageSpec]:
    """Decide every image's size and instance budget up front, so each image can be drawn on its own.

    Train holds ``n_dense`` large dense images and one tiny image; test holds one tiny and one large image;
    the rest are ordinary mid-sized images, as in the real data.
    """
    rng = np.random.default_rng([params.seed, 0])
    specs = []
    for split, n, special in (("train", params.n_train, ["dense"] * params.n_dense + ["tiny"]),
                              ("test", params.n_test, ["tiny", "large"])):  # fmt: skip
        roles = (special + ["ordinary"] * n)[:n]
        roles = [roles[i] for i in rng.permutation(n)]
        for index, role in enumerate(roles):
            height, width, target = _draw_size(rng, role, params)
            name = str(uuid.UUID(bytes=rng.bytes(16), version=4))
            image_id = index + 1 if split == "test" else 0
            specs.append(
                ImageSpec(split, name, height, width, target, (params.seed, len(specs) + 1), image_id)
            )
    return specs


def _draw_size(rng: np.random.Generator, role: str, params: SynthParams) -> tuple[int, int, int]:
    """Height, width and instance target of an image of the given role."""
    lo, hi = params.min_side, params.max_side
    if role == "tiny":
        side = rng.uniform(lo, 1.3 * lo, size=2)
    elif role in ("dense", "large"):
        side = rng.uniform(*((0.45, 0.8) if role == "dense" else (0.85, 1.0)), size=2) * hi
    else:
        aspect = rng.uniform(0.75, 1.33)
        side = TYPICAL_SIDE * np.exp(rng.normal(0.0, 0.25)) * np.array([aspect**0.5, aspect**-0.5])
        side = np.minimum(side, 2 * TYPICAL_SIDE)
    height, width = np.clip(np.round(side), lo, hi).astype(int)
    if role == "dense":
        target = int(rng.integers(*DENSE_COUNT))
    else:
        target = int(np.clip(round(height * width * rng.uniform(*DENSITY)), 1, DENSE_ABOVE))
    return int(height), int(width), target


# --------------------------------------------------------------------------------------------------- shapes
def _outline(rng: np.random.Generator, style: CellStyle, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (dy, dx) of a nucleus outline: an ellipse with harmonic wobble and an optional kidney notch."""
    theta = np.linspace(0.0, 2 * np.pi, 40, endpoint=False)
    k = np.arange(2, 6)[:, None]
    amplitudes = rng.normal(0.0, style.wobble, size=(4, 1)) / np.sqrt(k - 1)
    r = radius * (1.0 + (amplitudes * np.cos(k * theta + rng.uniform(0, 2 * np.pi, size=(4, 1)))).sum(0))
    depth = rng.uniform(*style.dent)
    if depth > 0:  # a notch on a long side gives the bean/kidney shape
        away = np.angle(np.exp(1j * (theta - np.pi / 2)))
        r *= 1.0 - depth * np.exp(-((away / 0.55) ** 2))
    stretch = np.sqrt(rng.uniform(*style.elongation))
    x, y = r * np.cos(theta) * stretch, r * np.sin(theta) / stretch
    angle = rng.uniform(0, np.pi)
    return x * np.sin(angle) + y * np.cos(angle), x * np.cos(angle) - y * np.sin(angle)


def _nucleus_pixels(
    rng: np.random.Generator, style: CellStyle, cy: float, cx: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel rows and columns of one nucleus centred near (cy, cx), before clipping to the image."""
    radius = rng.uniform(*style.radius)
    n_lobes = int(rng.integers(style.lobes[0], style.lobes[1] + 1))
    if n_lobes == 1:
        dy, dx = _outline(rng, style, radius)
        return _polygon_pixels(cy + dy, cx + dx)
    # lobes on a bent chain, joined by bridges thinner than a lobe: the segmented neutrophil nucleus
    turns = np.cumsum(rng.uniform(-1.3, 1.3, n_lobes)) + rng.uniform(0, 2 * np.pi)
    steps = radius * rng.uniform(1.3, 1.6, n_lobes)
    ys, xs = np.cumsum(steps * np.sin(turns)), np.cumsum(steps * np.cos(turns))
    ys, xs = ys - ys.mean() + cy, xs - xs.mean() + cx
    parts = [draw.ellipse(y, x, radius * rng.uniform(0.85, 1.15), radius * rng.uniform(0.85, 1.15),
                          rotation=rng.uniform(0, np.pi)) for y, x in zip(ys, xs, strict=True)]  # fmt: skip
    half = radius * 0.3
    for y0, x0, y1, x1 in zip(ys[:-1], xs[:-1], ys[1:], xs[1:], strict=True):
        ny, nx = (x1 - x0, y0 - y1) / np.hypot(y1 - y0, x1 - x0) * half
        corners = np.array([[y0 + ny, y1 + ny, y1 - ny, y0 - ny], [x0 + nx, x1 + nx, x1 - nx, x0 - nx]])
        parts.append(_polygon_pixels(*corners))
    pixels = np.unique(np.concatenate([np.stack(p, 1) for p in parts]), axis=0)
    return pixels[:, 0], pixels[:, 1]


def _polygon_pixels(ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels inside a polygon, negative coordinates included (skimage drops them when no shape is given)."""
    y0, x0 = int(np.floor(ys.min())), int(np.floor(xs.min()))
    rr, cc = draw.polygon(ys - y0, xs - x0)
    return rr + y0, cc + x0


def _group_centres(rng: np.random.Generator, style: CellStyle, n: int, height: int, width: int) -> np.ndarray:
    """Centres (n, 2) of one group: a touching sheet on a jittered hexagonal lattice, or a loose scatter."""
    centre = rng.uniform((0, 0), (height, width))
    mean_radius = np.mean(style.radius) * (1.0 if style.lobes[1] == 1 else 2.2)
    if not style.packed:
        return centre + rng.normal(0.0, 2.5 * mean_radius * np.sqrt(n), size=(n, 2))
    spacing = 2 * mean_radius * 0.93
    k = int(np.ceil(np.sqrt(n))) + 2
    i, j = np.meshgrid(np.arange(-k, k + 1), np.arange(-k, k + 1))
    points = np.stack([j.ravel() * np.sqrt(3) / 2, i.ravel() + 0.5 * j.ravel()], 1) * spacing
    angle = rng.uniform(0, np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = points @ rotation.T
    sheet_shape = np.array([1.0, rng.uniform(1.0, 2.5)])  # elongated sheets and cords, not discs
    order = np.argsort(((points / sheet_shape) ** 2).sum(1) + rng.uniform(0, 0.5 * spacing**2, len(points)))
    return centre + points[order[:n]] + rng.normal(0.0, 0.1 * spacing, size=(n, 2))


# ---------------------------------------------------------------------------------------------------- layout
class _Layout:
    """The instances of one image while they are placed: per-class label rows with provisional ids.

    Provisional ids follow the painting order across all classes; ``top`` holds the id painted last at each
    pixel, which is what the rendered image shows.
    """

    def __init__(self, height: int, width: int, capacity: int) -> None:
        self.labels = np.zeros((SYNTH_CLASSES, height, width), np.int32)
        self.top = np.zeros((height, width), np.int32)
        self.area = np.zeros(capacity + 1, np.int64)
        self.cls = np.zeros(capacity + 1, np.int64)  # class index 1..4 of each provisional id (0: background)
        self.count = 0

    def try_place(self, rng: np.random.Generator, k: int, rr: np.ndarray, cc: np.ndarray) -> bool:
        """Paint a nucleus of class index ``k`` (0-based) unless it collides too much; say whether it was."""
        full_area = len(rr)
        rr, cc = _inside(self.top.shape, rr, cc)
        if len(rr) < max(MIN_VISIBLE * full_area, 6):
            return False
        covered = self.labels[:, rr, cc]
        same = covered[k]
        if np.count_nonzero(same) > MAX_SAME_CLASS_OVERLAP * len(rr):
            return False
        hit_ids, lost = np.unique(same[same > 0], return_counts=True)
        if np.any(lost > MAX_AREA_LOSS * self.area[hit_ids]):
            return False
        other = np.delete(covered, k, axis=0).any(0)
        share = other.mean()
        if share > MAX_TOUCH and not (share <= MAX_OVERLAP and rng.random() < OVERLAP_CHANCE):
            return False
        if 0 < share <= MAX_TOUCH:  # just touching: the other class keeps the contested pixels
            rr, cc = rr[~other], cc[~other]
        self.area[hit_ids] -= lost
        self.paint(k, rr, cc)
        return True

    def paint(self, k: int, rr: np.ndarray, cc: np.ndarray) -> None:
        """Give the next provisional id to pixels (rr, cc) of class index ``k``; it wins where it overlaps."""
        self.count += 1
        self.labels[k, rr, cc] = self.count
        self.top[rr, cc] = self.count
        self.area[self.count], self.cls[self.count] = len(rr), k + 1

    def final_labels(self) -> np.ndarray:
        """Label rows with the real data's ids: one counter running class1 first, ids of vanished nuclei dropped."""
        out = np.zeros_like(self.labels)
        next_id = 1
        for k in range(SYNTH_CLASSES):
            present = np.unique(self.labels[k])
            present = present[present > 0]
            lookup = np.zeros(self.count + 1, np.int32)
            lookup[present] = np.arange(next_id, next_id + len(present))
            out[k] = lookup[self.labels[k]]
            next_id += len(present)
        return out


def _place_instances(rng: np.random.Generator, spec: ImageSpec) -> _Layout:
    """Place groups of nuclei until each present class reaches its share of the target, or attempts run out."""
    present = rng.random(SYNTH_CLASSES) < [s.presence for s in STYLES]
    if not present.any():
        present[rng.choice(SYNTH_CLASSES, p=_normalised([s.weight for s in STYLES]))] = True
    weights = _normalised(
        np.where(present, [s.weight for s in STYLES], 0.0) * rng.uniform(0.5, 1.5, SYNTH_CLASSES)
    )
    wanted = rng.multinomial(spec.target, weights)
    attempts = 3 * wanted.sum() + 20
    layout = _Layout(spec.height, spec.width, attempts)
    placed = np.zeros(SYNTH_CLASSES, np.int64)
    while attempts > 0 and (placed < wanted).any():
        k = int(rng.choice(SYNTH_CLASSES, p=_normalised(np.maximum(wanted - placed, 0))))
        style = STYLES[k]
        n = int(min(rng.integers(style.group[0], style.group[1] + 1), wanted[k] - placed[k], attempts))
        for cy, cx in _group_centres(rng, style, n, spec.height, spec.width):
            placed[k] += layout.try_place(rng, k, *_nucleus_pixels(rng, style, cy, cx))
        attempts -= n
    if layout.count == 0:  # a tiny image whose every try fell off the edge: one nucleus in the middle
        k = int(np.argmax(wanted))
        rr, cc = _nucleus_pixels(rng, STYLES[k], spec.height / 2, spec.width / 2)
        layout.paint(k, *_inside((spec.height, spec.width), rr, cc))
    return layout


def _inside(shape: tuple[int, int], rr: np.ndarray, cc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixels that fall inside an image of ``shape``."""
    keep = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
    return rr[keep], cc[keep]


def _normalised(weights: np.ndarray | list[float]) -> np.ndarray:
    weights = np.asarray(weights, np.float64)
    return weights / weights.sum()


# ------------------------------------------------------------------------------------------------- rendering
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Unit-variance noise that varies over ``cell`` px, made at low resolution and upsampled (fast)."""
    low = rng.standard_normal((shape[0] // cell + 4, shape[1] // cell + 4)).astype(np.float32)
    noise = ndimage.zoom(low, cell, order=3, mode="nearest")[: shape[0], : shape[1]]
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _fine_noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]
) -> np.ndarray:
    """Unit-variance grain a few px wide (chromatin, tissue texture), or streaks when ``sigma`` is a pair."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return noise / (noise.std() + 1e-6)


def _stroma(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Eosin and haematoxylin of the background: wavy collagen fibres, patchy density and pale clefts.

    Fibres and clefts are noise stretched along one axis, then read through a rotated, warped grid so they run
    in a random direction and bend.
    """
    side = int(np.ceil(np.hypot(*shape))) + 16
    fibres = _fine_noise(rng, (side, side), (0.9, rng.uniform(5, 10)))
    # clefts are smooth, so a quarter of the resolution will do
    clefts = _fine_noise(rng, (side // 4 + 2, side // 4 + 2), (0.6, 6.0))
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    yy, xx = yy - shape[0] / 2, xx - shape[1] / 2
    bend = 5.0 * _smooth_noise(rng, shape, 40)
    grid = [
        yy * np.cos(angle) - xx * np.sin(angle) + side / 2 + bend,
        yy * np.sin(angle) + xx * np.cos(angle) + side / 2,
    ]
    fibres = ndimage.map_coordinates(fibres, grid, order=1)
    gaps = np.clip((ndimage.map_coordinates(clefts, [g / 4 for g in grid], order=1) - 1.5) / 0.6, 0.0, 1.0)
    patches = _smooth_noise(rng, shape, 64)
    density = rng.uniform(0.35, 0.5) * np.clip(1.0 + 0.25 * patches + 0.2 * fibres, 0.3, None)
    eosin = density * (1.0 - 0.9 * gaps) * (1.0 + 0.1 * _fine_noise(rng, shape, 1.0))
    haematoxylin = rng.uniform(0.05, 0.1) * np.clip(1.0 + 0.5 * fibres, 0.2, None) * (1.0 - 0.7 * gaps)
    return np.clip(eosin, 0.03, None), haematoxylin


def _per_class(values: Iterable[float]) -> np.ndarray:
    """A lookup table indexed by class (1..4), with 0 for the background."""
    return np.array([0.0, *values], np.float32)


def _render(rng: np.random.Generator, layout: _Layout) -> np.ndarray:
    """The RGB image of a layout: stroma, cytoplasm halos, then textured nuclei with a darker membrane."""
    top, n = layout.top, layout.count
    shape = top.shape
    eosin, haematoxylin = _stroma(rng, shape)
    cls = layout.cls[top]  # 0 = background, 1..4 = class of the visible nucleus

    # cytoplasm: the background near a nucleus takes the colour of that nucleus's cell type
    distance, (iy, ix) = ndimage.distance_transform_edt(top == 0, return_indices=True)
    near = layout.cls[top[iy, ix]]
    reach, halo_eosin, halo_haematoxylin = (_per_class(s.halo[i] for s in STYLES)[near] for i in range(3))
    halo = np.clip(1.0 - distance / np.maximum(reach, 1e-3), 0.0, 1.0) ** 0.7
    halo = ndimage.gaussian_filter(halo.astype(np.float32), 1.0) * (top == 0)
    eosin = eosin * (1 - halo) + halo_eosin * halo * (1 + 0.2 * _fine_noise(rng, shape, 1.0))
    haematoxylin = haematoxylin + halo_haematoxylin * halo

    # nuclei: each its own darkness, chromatin texture, and a membrane wherever the id changes
    low, high = (_per_class(s.stain[i] for s in STYLES)[layout.cls[: n + 1]] for i in (0, 1))
    darkness = rng.uniform(low, high).astype(np.float32)
    fine, coarse = (_per_class(s.chromatin[i] for s in STYLES)[cls] for i in (0, 1))
    chromatin = 1.0 + fine * _fine_noise(rng, shape, 0.8) + coarse * _fine_noise(rng, shape, 2.2)
    cross = ndimage.generate_binary_structure(2, 1)
    edge = (ndimage.grey_dilation(top, footprint=cross) != top) | (
        ndimage.grey_erosion(top, footprint=cross) != top
    )
    membrane = ndimage.gaussian_filter((edge & (top > 0)).astype(np.float32), 0.6)
    rim = _per_class(s.rim for s in STYLES)[cls]
    nucleus = darkness[top] * np.clip(chromatin, 0.2, None) * (1.0 + 2.0 * rim * membrane)
    inside = ndimage.gaussian_filter((top > 0).astype(np.float32), 0.6)
    haematoxylin = haematoxylin * (1 - inside) + ndimage.gaussian_filter(nucleus, 0.6) + 0.1 * inside
    eosin = eosin * (1 - inside) + _per_class(s.tint for s in STYLES)[cls] * inside

    hue = 1.0 + rng.normal(0.0, 0.04, size=(2, 3)).astype(np.float32)  # stain batch variation
    density = haematoxylin[..., None] * HAEMATOXYLIN * hue[0] + eosin[..., None] * EOSIN * hue[1]
    rgb = 255.0 * np.exp(-density) + rng.normal(0.0, 3.0, size=(*shape, 3)).astype(np.float32)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- output
def generate(spec: ImageSpec) -> tuple[np.ndarray, np.ndarray]:
    """One image and its label rows ``(uint8 H×W×3, int32 4×H×W)``, a pure function of ``spec``."""
    rng = np.random.default_rng(spec.seed)
    layout = _place_instances(rng, spec)
    return _render(rng, layout), layout.final_labels()


def write_image(out_dir: str | Path, spec: ImageSpec) -> None:
    """Write one image in the raw layout; a class without instances gets no file, as in the real data."""
    image, labels = generate(spec)
    if spec.split == "test":
        (Path(out_dir) / TEST_DIR).mkdir(parents=True, exist_ok=True)
        write_image_tif(Path(out_dir) / TEST_DIR / f"{spec.name}.tif", image)
        return
    folder = Path(out_dir) / "train" / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    write_image_tif(folder / IMAGE_FILE, image)
    for k, row in enumerate(labels, start=1):
        if row.any():
            write_label_tif(folder / class_file(k), row)


def write_test_mapping(out_dir: str | Path, specs: list[ImageSpec]) -> None:
    """Write ``test_image_name_to_ids.json`` in the real format."""
    rows = [{"file_name": f"{s.name}.tif", "id": s.image_id, "height": s.height, "width": s.width}
            for s in specs if s.split == "test"]  # fmt: skip
    write_json(Path(out_dir) / TEST_MAPPING, rows)


def write_dataset(
    out_dir: str | Path,
    params: SynthParams,
    progress: Callable[[list[ImageSpec]], Iterable[ImageSpec]] = iter,
) -> list[ImageSpec]:
    """Write the whole dataset into ``out_dir`` (wrap the images in ``progress``, e.g. tqdm) and return its plan."""
    specs = plan_dataset(params)
    for spec in progress(specs):
        write_image(out_dir, spec)
    write_test_mapping(out_dir, specs)
    return specs
