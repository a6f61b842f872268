# The ablation base (sourced by abl_run.sh and abl_sweep.sh, so every variant trains at the same budget): the
# make real-cpu recipe at 6 epochs, one evaluation at the end, centre sigma 2 (separate peaks for the map-guided
# steps). Needs RAW: the absolute raw-dataset folder.
BASE=(-S data.raw_dir="$RAW" -S "data.group_regex='^(train_[0-9]+)_'" -S model.scale=2.0 -S train.crop_size=128
  -S augment.hflip_p=0.5 -S augment.vflip_p=0.5 -S augment.rotate90_p=0.5 -S train.repeat_threshold=1.0
  -S train.epochs=6 -S train.eval_every=6 -S train.train_eval_images=0 -S maps.center_sigma=2.0)
