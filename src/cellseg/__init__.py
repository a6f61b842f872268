"""cellseg: a reproducible DVC pipeline for instance segmentation of cell classes in H&E images."""

DEFAULT_CLASSES = ("class1", "class2", "class3", "class4")
"""The class names of a checkpoint saved before ``classes`` was a setting (the four of the original data). The
classes themselves are params.yaml's ``classes`` when training, and the checkpoint's when predicting."""

MAP_NAMES = ("center", "boundary")
"""The auxiliary maps: targets of the maps stage, outputs of the heads, keys of their npz files."""

__version__ = "0.1.0"


class CellsegError(Exception):
    """Base of the errors a user can fix (bad input, bad params, missing weights): the message says how."""
