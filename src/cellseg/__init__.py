"""cellseg: a reproducible DVC pipeline for instance segmentation of four cell classes in H&E images."""

NUM_CLASSES = 4
"""Cell classes (class1..class4); the models add one background class."""

CLASS_NAMES = tuple(f"class{k}" for k in range(1, NUM_CLASSES + 1))

MAP_NAMES = ("center", "boundary")
"""The auxiliary maps: targets of the maps stage, outputs of the heads, keys of their npz files."""

__version__ = "0.1.0"


class CellsegError(Exception):
    """Base of the errors a user can fix (bad input, bad params, missing weights): the message says how."""
