"""Data: raw tifs and npz files, the synthetic demo, the prepare and maps stages, the training dataset."""
