"""Map-guided post-processing: the auxiliary heads' centre and boundary maps refine Mask R-CNN's detections.

Mask R-CNN judges each cell inside its own box; the heads see the whole image, and the methods that separate
touching nuclei best (HoVer-Net's marker-controlled watershed, DCAN's contour-aware fusion, StarDist's centre
proposals) use such maps after the forward pass. The steps, each switched by ``postproc.*``, run in this order:

- **split**: a mask holding two or more centre peaks is cut by a watershed on the boundary map, one marker per
  peak (two merged cells become two);
- **trim**: a pixel on the predicted boundary that two masks claim stays only in the one whose centre is
  nearer (in units of each one's equivalent radius): a mask that runs over its neighbour's edge is cut back;
- **recover**: a strong centre peak that no mask covers becomes a cell: the region around it bounded by the
  boundary map (within ``recover_radius``), classed by a vote of the nearest detections;
- **rescore**: ``score ← (1 − w)·score + w·e``, with ``e`` the centre evidence inside the mask: a detection
  without a centre loses score, one with a clear centre gains.

Centre evidence is ``min(1, c / peak_threshold)`` for a centre probability ``c``: a peak that counts as a
centre is full evidence. A trained head's probabilities sit well below 1 (on consep-dev after 6 epochs their
maximum was about 0.25), and how far below depends on the training, so the scores follow the tuned peak
threshold rather than the raw probability.

Cost: the peaks are found once per image (one maximum filter); every other step works on box-local crops, so
the work grows with the cells' area, not with cells × image area (``cellseg.bench.postproc`` measures it).
Without maps (a model without heads) :func:`refine` returns the detections unchanged.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from cellseg.infer.prob_maps import ProbMaps
from cellseg.instances import Instances, crop_to_box
from cellseg.params import PostprocParams


def refine(inst: Instances, maps: ProbMaps | None, params: PostprocParams) -> Instances:
    """Apply the switched-on steps; a no-op without maps (no heads) or with every step off."""
    if maps is None or not params.any_step:
        return inst
    if maps.shape != (inst.height, inst.width):
        raise ValueError(f"maps of shape {maps.shape} for an image of {inst.height}×{inst.width}")
    peaks = find_peaks(maps.center, params.peak_threshold, params.peak_min_distance)
    if params.split:
        inst = split_merged(inst, maps, peaks, params.min_area)
    if params.trim:
        inst = trim_boundaries(inst, maps, params.boundary_threshold)
    if params.recover:
        inst = recover_missed(inst, maps, peaks, params)
    if params.rescore:
        inst = rescore(inst, maps.center, params.rescore_weight, params.peak_threshold)
    return inst


# ------------------------------------------------------------------------------------------------ the peaks
def find_peaks(center: np.ndarray, threshold: float, min_distance: int) -> np.ndarray:
    """``(K, 2)`` (row, col) of the centre map's local maxima above ``threshold`` (strictly: skimage's rule), strongest first."""
    peaks = peak_local_max(
        center, min_distance=min_distance, threshold_abs=threshold, exclude_border=False
    ).reshape(-1, 2)
    return peaks[np.argsort(-center[peaks[:, 0], peaks[:, 1]], kind="stable")]


def peak_image(peaks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``H×W`` int32: peak ``k`` (0-based in ``peaks``) marked as ``k + 1``, 0 elsewhere."""
    ids = np.zeros(shape, np.int32)
    ids[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    return ids


def _window(offset: np.ndarray, crop: np.ndarray) -> tuple[slice, slice]:
    y0, x0 = int(offset[0]), int(offset[1])
    return slice(y0, y0 + crop.shape[0]), slice(x0, x0 + crop.shape[1])


def _tight(mask: np.ndarray, y0: int, x0: int) -> tuple[tuple[int, int], np.ndarray]:
    """``((y0, x0), crop)`` of a non-empty mask cut to its bounding box."""
    tight = crop_to_box(mask, y0, x0)
    assert tight is not None, "callers pass non-empty masks"
    return tight


def _rebuild(inst: Instances, labels: list, scores: list, offsets: list, crops: list) -> Instances:
    n = len(crops)
    return Instances(
        inst.height,
        inst.width,
        np.asarray(labels, np.int64).reshape(n),
        np.asarray(scores, np.float32).reshape(n),
        np.asarray(offsets, np.int64).reshape(n, 2),
        crops,
    )


# ------------------------------------------------------------------------------------------------ the steps
def split_merged(inst: Instances, maps: ProbMaps, peaks: np.ndarray, min_area: int) -> Instances:
    """Cut each mask holding two or more centre peaks by a watershed on the boundary map, one marker per peak.

    A part smaller than ``min_area`` loses its marker and the cut is redone without it; a mask left with a
    single marker stays whole. The parts keep the detection's class and score, in its place in the order.
    """
    ids = peak_image(peaks, maps.shape)
    labels, scores, offsets, crops = [], [], [], []
    for i, crop in enumerate(inst.crops):
        window = _window(inst.offsets[i], crop)
        parts = _watershed_parts(crop, ids[window], maps.boundary[window], min_area)
        pieces = [_tight(part, window[0].start, window[1].start) for part in parts] or [
            (tuple(inst.offsets[i]), crop)
        ]
        for offset, piece in pieces:
            labels.append(inst.labels[i])
            scores.append(inst.scores[i])
            offsets.append(offset)
            crops.append(piece)
    return _rebuild(inst, labels, scores, offsets, crops)


def _watershed_parts(
    crop: np.ndarray, peak_ids: np.ndarray, boundary: np.ndarray, min_area: int
) -> list[np.ndarray]:
    """The parts of ``crop`` around its peaks, each at least ``min_area``; [] when fewer than two remain."""
    markers = np.where(crop, peak_ids, 0)
    while np.count_nonzero(markers) >= 2:
        regions = watershed(boundary, markers, mask=crop)
        present = np.unique(markers[markers > 0])
        areas = ndimage.sum_labels(np.ones_like(regions), regions, present)
        small = present[areas < min_area]
        if small.size == 0:
            return [regions == k for k in present]
        markers[np.isin(markers, small)] = 0
    return []


def instance_centres(inst: Instances, center: np.ndarray) -> np.ndarray:
    """``(N, 2)`` float: the position of each mask's highest centre probability (its predicted centre)."""
    out = np.zeros((len(inst), 2), np.float64)
    for i, crop in enumerate(inst.crops):
        values = np.where(crop, center[_window(inst.offsets[i], crop)], -1.0)
        r, c = np.unravel_index(int(np.argmax(values)), crop.shape)
        out[i] = (inst.offsets[i][0] + r, inst.offsets[i][1] + c)
    return out


def _overlapping_boxes(inst: Instances) -> list[np.ndarray]:
    """Per instance, the other instances whose crop rectangles intersect its own."""
    y0, x0 = inst.offsets[:, 0], inst.offsets[:, 1]
    shapes = np.asarray([c.shape for c in inst.crops], np.int64).reshape(-1, 2)
    y1, x1 = y0 + shapes[:, 0], x0 + shapes[:, 1]
    order = np.argsort(x0, kind="stable")  # sweep along x: only boxes starting before x1 can intersect
    starts = x0[order]
    out = []
    for i in range(len(inst)):
        candidates = order[: np.searchsorted(starts, x1[i], side="left")]
        hit = candidates[(x1[candidates] > x0[i]) & (y0[candidates] < y1[i]) & (y1[candidates] > y0[i])]
        out.append(hit[hit != i])
    return out


def trim_boundaries(inst: Instances, maps: ProbMaps, threshold: float) -> Instances:
    """Give each pixel on the boundary map (``≥ threshold``) that two masks claim to the one whose centre is
    nearer; the other loses it.

    "Nearer" is measured in units of each instance's equivalent radius ``sqrt(area / π)``, so the interface
    of a large and a small cell does not drift into the large one. Pixels claimed by one mask only are never
    touched (on exact, touching masks this step changes nothing). Instances left empty are dropped.
    """
    if len(inst) < 2:
        return inst
    centres = instance_centres(inst, maps.center)
    radii = np.sqrt(np.maximum(inst.areas(), 1) / np.pi)
    on_boundary = maps.boundary >= threshold
    crops = [c.copy() for c in inst.crops]
    for i, neighbours in enumerate(_overlapping_boxes(inst)):
        if neighbours.size == 0:
            continue
        window = _window(inst.offsets[i], crops[i])
        ys, xs = np.nonzero(crops[i] & on_boundary[window])
        if ys.size == 0:
            continue
        ys, xs = ys + window[0].start, xs + window[1].start
        best = np.hypot(ys - centres[i, 0], xs - centres[i, 1]) / radii[i]
        owner = np.full(ys.size, i)
        for j in neighbours:
            (jy, jx), (jh, jw) = inst.offsets[j], crops[j].shape
            inside = (ys >= jy) & (ys < jy + jh) & (xs >= jx) & (xs < jx + jw)
            if not inside.any():
                continue
            inside[inside] = crops[j][ys[inside] - jy, xs[inside] - jx]  # contested: j claims it too
            distance = np.hypot(ys - centres[j, 0], xs - centres[j, 1]) / radii[j]
            nearer = inside & (distance < best)
            best[nearer], owner[nearer] = distance[nearer], j
        moved = owner != i  # each moved pixel already belongs to its new owner
        crops[i][ys[moved] - window[0].start, xs[moved] - window[1].start] = False
    trimmed = Instances(inst.height, inst.width, inst.labels, inst.scores, inst.offsets, crops)
    return trimmed.select(np.array([c.any() for c in crops], bool))


def recover_missed(inst: Instances, maps: ProbMaps, peaks: np.ndarray, params: PostprocParams) -> Instances:
    """Add a cell at every centre peak ``≥ recover_threshold`` that no mask covers.

    Its mask is the region around the peak where the boundary map stays below ``boundary_threshold`` (a
    watershed shared with the other recovered peaks nearby, so two of them split their region), within
    ``recover_radius`` of the peak, outside every existing mask, then grown by one pixel into the boundary
    band (the boundary target marks a cell's own edge pixels). Cells under ``min_area`` are dropped.
    """
    covered = np.zeros((inst.height, inst.width), bool)
    for offset, crop in zip(inst.offsets, inst.crops, strict=True):
        covered[_window(offset, crop)] |= crop
    strong = peaks[maps.center[peaks[:, 0], peaks[:, 1]] >= params.recover_threshold]
    strong = strong[~covered[strong[:, 0], strong[:, 1]]]
    if strong.size == 0:
        return inst
    free = (maps.boundary < params.boundary_threshold) & ~covered
    markers = peak_image(strong, maps.shape)
    radius = params.recover_radius
    det_centres = (inst.offsets + np.asarray([c.shape for c in inst.crops]).reshape(-1, 2) / 2.0).reshape(
        -1, 2
    )
    labels, scores, offsets, crops = (
        list(inst.labels),
        list(inst.scores),
        list(inst.offsets),
        list(inst.crops),
    )
    for k, (py, px) in enumerate(strong, start=1):
        wy = slice(max(py - radius, 0), min(py + radius + 1, inst.height))
        wx = slice(max(px - radius, 0), min(px + radius + 1, inst.width))
        yy, xx = np.ogrid[wy, wx]
        disc = (yy - py) ** 2 + (xx - px) ** 2 <= radius**2
        allowed = free[wy, wx] & disc & ~covered[wy, wx]
        if not allowed[py - wy.start, px - wx.start]:
            continue
        regions = watershed(maps.boundary[wy, wx], np.where(allowed, markers[wy, wx], 0), mask=allowed)
        region = ndimage.binary_dilation(regions == k) & disc & ~covered[wy, wx]
        if region.sum() < params.min_area:
            continue
        covered[wy, wx] |= region
        offset, crop = _tight(region, wy.start, wx.start)
        labels.append(_vote(inst.labels, det_centres, (py, px), params))
        scores.append(params.recover_score * centre_evidence(maps.center[py, px], params.peak_threshold))
        offsets.append(offset)
        crops.append(crop)
    return _rebuild(inst, labels, scores, offsets, crops)


def _vote(labels: np.ndarray, centres: np.ndarray, point: tuple[int, int], params: PostprocParams) -> int:
    """The most frequent class among the ``recover_neighbours`` nearest detections (ties: the nearest's)."""
    k = min(params.recover_neighbours, len(labels))
    if k == 0:
        return params.recover_class
    distance = np.hypot(centres[:, 0] - point[0], centres[:, 1] - point[1])
    nearest = np.argsort(distance, kind="stable")[:k]
    counts = np.bincount(labels[nearest])
    winners = np.flatnonzero(counts == counts.max())
    return int(next(labels[j] for j in nearest if labels[j] in winners))


def centre_evidence(center: np.ndarray | float, peak_threshold: float) -> np.ndarray:
    """``min(1, c / peak_threshold)``: 1 from the probability at which a maximum counts as a centre."""
    return np.minimum(np.asarray(center, np.float32) / np.float32(peak_threshold), np.float32(1.0))


def rescore(inst: Instances, center: np.ndarray, weight: float, peak_threshold: float) -> Instances:
    """``score ← (1 − weight)·score + weight·e``, ``e`` the highest centre evidence inside the mask."""
    if len(inst) == 0:
        return inst
    peak = np.asarray(
        [
            center[_window(o, c)][c].max() if c.any() else 0.0
            for o, c in zip(inst.offsets, inst.crops, strict=True)
        ],
        np.float32,
    )
    evidence = centre_evidence(peak, peak_threshold)
    scores = ((1.0 - weight) * inst.scores + weight * evidence).astype(np.float32)
    return Instances(inst.height, inst.width, inst.labels, scores, inst.offsets, inst.crops)
