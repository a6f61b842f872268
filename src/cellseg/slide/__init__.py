"""Whole-slide inference: lazy slide reading, tissue detection, blockwise inference on Dask, QuPath exports.

- :mod:`.reader`: open a slide (pyramidal TIFF family through tifffile's zarr store, or a png/jpg), its levels,
  its resolution, region reads; every failure is a :class:`SlideError` naming the file.
- :mod:`.tissue`: a low-resolution picture of the slide and its tissue mask (Otsu on saturation).
- :mod:`.blocks`: the block grid (blocks are groups of the tiled inference's tiles) and the seam rules between
  blocks, which are ``cellseg.infer.tiling``'s.
- :mod:`.run`: the Dask orchestration, per-block result files (resume) and the final assembly.
- :mod:`.export`: GeoJSON for QuPath, the per-nucleus table, the thumbnail and the tissue picture.
"""
