"""A trained model as one object: the network, its tuned thresholds, its training params and its provenance.

StarDist keeps ``thresholds.json`` in the model folder and loads it with the weights; so does cellseg. Every
command that predicts opens its model with :func:`open_model` and gets, from one place, what decides its
outputs: the network (its own architecture, from the checkpoint), ``predict.*`` and ``postproc.*`` of
params.yaml with the tuned thresholds applied, the rule from detections to nuclei they imply, the resolution and
classes it was trained with, and the provenance record written beside every result.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from cellseg import CellsegError
from cellseg.model.checkpoint import checkpoint_classes, load_trained_model
from cellseg.model.maskrcnn import CellMaskRCNN
from cellseg.model.thresholds import thresholds_beside, tuned_postproc_params, tuned_predict_params
from cellseg.nuclei import NucleusRule
from cellseg.params import Params, PostprocParams, PredictParams, as_dict
from cellseg.provenance import provenance

BESIDE = "beside"
"""``open_model(thresholds=BESIDE)``: ``thresholds.json`` next to the checkpoint when there is one."""


class ModelBundle:
    """A checkpoint opened for inference, with the settings that decide its outputs.

    ``predict`` and ``postproc`` are params.yaml's sections with the tuned thresholds applied, computed when
    first used (a command reads only the settings it uses: DVC's params lists stay exact). ``class_names`` are
    the checkpoint's (not params.yaml's ``classes``): the model predicts class ids 1..len(class_names)."""

    def __init__(
        self,
        network: CellMaskRCNN,
        checkpoint: Path,
        state: dict,
        params: Params,
        thresholds_file: Path | None,
    ) -> None:
        self.network, self.checkpoint, self.state = network, checkpoint, state
        self.thresholds_file = thresholds_file  # where the tuned thresholds come from (None: params.yaml's)
        self._params = params
        self.class_names = checkpoint_classes(state, checkpoint)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @cached_property
    def predict(self) -> PredictParams:
        predict = tuned_predict_params(self._params.predict, self.thresholds_file, self.num_classes)
        per_class = as_dict(predict)["class_score_thresholds"]  # a check, not a read of the key
        if per_class and len(per_class) != self.num_classes:
            raise CellsegError(
                f"predict.class_score_thresholds has {len(per_class)} values, but {self.checkpoint} has "
                f"{self.num_classes} classes ({', '.join(self.class_names)}): give one value per class, or []"
            )
        return predict

    @cached_property
    def postproc(self) -> PostprocParams:
        postproc = tuned_postproc_params(self._params.postproc, self.thresholds_file)
        recover_class = as_dict(postproc)["recover_class"]  # a check, not a read of the key
        if recover_class > self.num_classes:
            raise CellsegError(
                f"postproc.recover_class is {recover_class}, but {self.checkpoint} has {self.num_classes} "
                f"classes ({', '.join(self.class_names)}): choose one of 1..{self.num_classes}"
            )
        return postproc

    @property
    def rule(self) -> NucleusRule:
        """How this model's detections become nuclei (:mod:`cellseg.nuclei`)."""
        return NucleusRule.of(self.predict)

    @property
    def trained_params(self) -> dict:
        return self.state.get("params") or {}

    @property
    def records_mpp(self) -> bool:
        """Whether the checkpoint records its training resolution (older ones do not)."""
        return self.trained_params.get("data", {}).get("mpp") is not None

    @property
    def mpp(self) -> float:
        """The resolution the model was trained at (``data.mpp`` saved in the checkpoint), in µm/px; params.yaml's
        for a checkpoint older than the setting (:attr:`records_mpp`: the commands that rescale warn)."""
        return float(self.trained_params["data"]["mpp"] if self.records_mpp else self._params.data.mpp)

    def provenance(self, postproc: bool = True, **settings) -> dict:
        """The record written beside a result: the checkpoint (path, sha256, size, epochs, training params),
        the cellseg version, the thresholds file and the inference settings (``postproc``: with the map-guided
        steps' settings, for the outputs that apply them), plus ``settings``."""
        record = {
            **provenance(self.checkpoint, self.state),
            "thresholds": str(self.thresholds_file) if self.thresholds_file else None,
            "predict": as_dict(self.predict),
        }
        if postproc:
            record["postproc"] = as_dict(self.postproc)
        return {**record, **settings}

    def describe_thresholds(self) -> str:
        """One line: the thresholds in use and where they came from."""
        per_class = self.predict.class_score_thresholds
        scores = f"per class {per_class}" if per_class else str(self.predict.label_score_threshold)
        peaks = f", centre peaks > {self.postproc.peak_threshold}" if self.postproc.any_step else ""
        return (
            f"thresholds: score >= {scores}, mask > {self.predict.mask_threshold}{peaks} "
            f"({self.thresholds_file or 'params.yaml'})"
        )


def open_model(
    checkpoint: str | Path,
    params: Params,
    device: torch.device | str = "cpu",
    thresholds: str | Path | None = BESIDE,
) -> ModelBundle:
    """Open ``checkpoint`` for inference on ``device`` with ``params`` (params.yaml).

    ``thresholds``: :data:`BESIDE` (the default) takes ``thresholds.json`` next to the checkpoint when there is
    one; a path must be a thresholds file; ``None`` keeps params.yaml's own values (the tune stage, which writes
    them). A checkpoint that is not a cellseg model, or unsafe to load, is an error before any other work.
    """
    checkpoint = Path(checkpoint)
    network, state = load_trained_model(checkpoint, torch.device(device))
    if thresholds == BESIDE:
        thresholds = thresholds_beside(checkpoint)
    path = Path(thresholds) if thresholds is not None else None
    bundle = ModelBundle(network, checkpoint, state, params, path)
    _ = bundle.predict  # a bad thresholds file is an error now, before any work
    return bundle
