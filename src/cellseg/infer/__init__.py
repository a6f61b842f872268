"""Inference: detection on images of any size (tiles, flips), map-guided post-processing, exports."""
