"""Annotated images and slides into the raw training layout (``cellseg import``, the import stage).

``pairs`` finds each image's annotation file, ``classes`` turns the annotation's class names into the model's,
``regions`` cuts training tiles inside the annotated regions, ``rasterise`` fills the nuclei's polygons into label
images, and ``run`` writes ``RAW/train/<sample>/`` and ``RAW/import.json`` all at once or not at all.
"""
