"""The model: Mask R-CNN with auxiliary centre/boundary heads, its mask targets and its checkpoints."""
