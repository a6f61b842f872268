# Two commands for a fresh machine with Python 3.11, make and git:
#   make demo   set up .venv and run the whole pipeline (dvc repro) on the embedded synthetic dataset
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stage commands call `python`: put the venv first on PATH for dvc and everything it starts.
RUN := PATH="$(CURDIR)/$(BIN):$$PATH"


.PHONY: setup demo test test-fast lint bench clean-venv real-cpu real-cpu-args gpu-check

# The real-data recipe for a 2-core CPU (tuned on consep-dev; README "Real data on a CPU"): one `dvc exp run`
# of BUDGET minutes of wall time in all (prepare to submit): the train stage plans its steps to fit what the
# other stages leave (train.budget_scope=pipeline; src/cellseg/train/budget.py), whatever the CPU.
RAW ?= data/raw
BUDGET ?= 30
EXTRA ?=  # more overrides, e.g. EXTRA='-S train.seed=1'
REAL_CPU = -S 'data.raw_dir=$(RAW)' -S "data.group_regex='^(train_[0-9]+)_'" \
  -S model.scale=2.0 -S train.crop_size=128 -S augment.hflip_p=0.5 -S augment.vflip_p=0.5 -S augment.rotate90_p=0.5 \
  -S train.repeat_threshold=1.0 -S train.precision=bf16 -S train.time_budget_min=$(BUDGET) \
  -S train.budget_scope=pipeline -S train.eval_every=100000 \
  -S train.train_eval_images=0 -S model.rpn_pre_nms_top_n_train=600 -S model.rpn_post_nms_top_n_train=300 \
  $(OOD_SETS)
# The out-of-domain sets of other labs (issue 31; ../shared's READMEs), scored by the ood stages into
# metrics/ood.json after the budgeted stages (on top of BUDGET: the train stage does not read evaluate.ood).
# Without SHARED the recipe keeps the demo's set.
SHARED ?= $(abspath ../shared)
OOD_SHARED = -S '~evaluate.ood.demo_slide' \
  -S "+evaluate.ood.monuseg={images: $(SHARED)/datasets/monuseg-train, annotations: '', mpp: 0.25}" \
  -S "+evaluate.ood.tnbc={images: $(SHARED)/datasets/tnbc, annotations: '^Slide_(\d+)/=GT_\1/', mpp: 0.25}" \
  -S "+evaluate.ood.a9k0_2={images: $(SHARED)/fixtures/slides, annotations: '', mpp: 0}"
OOD_SETS = $(if $(wildcard $(SHARED)/datasets/monuseg-train),$(OOD_SHARED))

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install --disable-pip-version-check --no-deps -e .
	touch $@

demo: setup
	$(RUN) dvc repro

test: setup
	$(RUN) pytest

test-fast: setup
	$(RUN) pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .

# Every benchmark prints its figures and a ratio against a baseline measured in the same run.
# `cellseg bench inference` measures the demo's trained model, so bench runs the demo first (a no-op when it is up to date).
bench: demo
	$(RUN) cellseg bench

# Targets evaluate, submit and ood_summary: the demo's slide stages (synth_slides, slides) say nothing about the
# real data.
real-cpu: setup
	$(RUN) dvc exp run $(REAL_CPU) $(EXTRA) evaluate submit ood_summary

# The recipe's overrides alone (experiments/real_cpu_seeds.sh runs them in a scratch clone).
real-cpu-args:
	@printf "%s " $(REAL_CPU); echo

# For a machine lent with a GPU, at most 8 minutes: bench train on CUDA (fp32 vs bf16, R50-FPN-v2, 512-px crops),
# a 2-process NCCL smoke test when 2 GPUs exist, a short real-data run when GPU_RAW exists. Fails without a GPU.
GPU_RAW ?= ../shared/datasets/consep-dev
gpu-check: setup
	$(RUN) experiments/gpu_check.sh $(GPU_RAW)

clean-venv:
	rm -rf $(VENV)
