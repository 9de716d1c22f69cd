# bt_pipeline: every target works on a fresh machine that has only python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# DATA_DIR holds kaggle_3m/ (the folder Kaggle's archive unpacks to).
DATA_DIR ?= data
SHARED_LGG ?= ../shared/lgg
KAGGLE_ROOT := $(DATA_DIR)/kaggle_3m
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONUNBUFFERED := 1

# make tune: the reference budget by default, every number overridable.
TRIALS ?= 20
EPOCHS ?= 20
EXECUTIONS ?= 2
# make tune: how many top encoder blocks a gate trial may fine-tune (0 = frozen trunk, features
# cached; 1 costs hours at the reference budget on 2 cores).
FINE_TUNE_CHOICES ?= 0
WORKERS ?= 2
ORACLE_PORT ?= 8000
# The recipe of the U-Net that ships (training/cross_validation.py), chosen on the
# cross-validation: `make cv CV_RECIPE=...` scores any recipe. `skull_strip` continues each of
# `four_cycles`' models with skull-stripped slices, which continue `longer_standardised`'s,
# `longer`'s and `fixed`'s (all committed in reports/cv/*/models/), so from scratch it needs
# `make cv` and `bt cv --all` for `fixed`, `longer`, `longer_standardised` and `four_cycles`
# first; then `make cv CV_RECIPE=skull_strip`, `make fold-gates`, `make train-unet`, `make gate`.
UNET_RECIPE ?= skull_strip
CV_RECIPE ?= baseline
# make experiments: epochs per table (the reference study used 100 and 30) and the scale.
EXP_EPOCHS_LR_BN ?= 12
EXP_EPOCHS_BATCH ?= 8
EXP_EPOCHS_OPTIONS ?= 15
EXP_IMAGE_SIZE ?= 64
EXP_BASE_FILTERS ?= 8

.PHONY: install data manifest brain-masks external eda test test-quick test-slow lint tune cv-gates fold-gates gate tune-classifier stage1-choice fit-gap tune-distributed \
        train-unet postprocess cv demo screenshot evaluate roundtrip radiogenomics experiments bench bench-loader \
        bench-infer bench-cluster bench-widths quality-check docs docs-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,cluster]"
	touch $@

data: install
	@if [ -d "$(SHARED_LGG)" ]; then \
		$(PY) $(SHARED_LGG)/unpack.py $(DATA_DIR); \
	elif [ -d "$(KAGGLE_ROOT)" ]; then \
		echo "data present in $(KAGGLE_ROOT)"; \
	else \
		echo "The LGG MRI segmentation dataset is not here. To get it:"; \
		echo "  1. Download it from Kaggle: https://www.kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation"; \
		echo "     (or: kaggle datasets download -d mateuszbuda/lgg-mri-segmentation)"; \
		echo "  2. Unzip it so that $(KAGGLE_ROOT)/TCGA_CS_4941_19960909/ exists"; \
		echo "     (or unzip anywhere and pass DATA_DIR=<folder holding kaggle_3m>)."; \
		exit 1; \
	fi

manifest: install
	$(PY) -m bt_pipeline manifest --data-dir $(KAGGLE_ROOT) --out data_manifest.csv

# A brain mask for every patient (committed): the skull-strip augmentation and the stripped
# cross-validation read them.
brain-masks: install
	$(PY) -m bt_pipeline brain-masks --data-dir $(KAGGLE_ROOT)

eda: install
	$(PY) -m bt_pipeline eda --data-dir $(KAGGLE_ROOT) --out reports/eda

test: install
	$(PY) -m pytest

# The inner loop: unit tests only (integration tests: kill/resume, distributed tuner, experiments).
test-quick: install
	$(PY) -m pytest -m "not slow and not integration"

test-slow: install
	$(PY) -m pytest -m slow

lint: install
	$(VENV)/bin/ruff check bt_pipeline tests

# Stage 1 as shipped: a head on the shipped U-Net's encoder, searched (RandomSearch) and
# thresholded on the recipe's cross-validation folds (one gate per fold, beside the fold U-Nets),
# then trained on the shipped U-Net's encoder and shipped. It needs those U-Nets first:
# `make cv CV_RECIPE=$(UNET_RECIPE)`, `make train-unet`, then `make tune`.
tune: install
	$(PY) -m bt_pipeline tune --gate --recipe $(UNET_RECIPE) --data-dir $(KAGGLE_ROOT) \
		--trials $(TRIALS) --epochs $(EPOCHS) --executions $(EXECUTIONS) \
		--fine-tune-choices $(FINE_TUNE_CHOICES) --out-dir tuning/gate --work-dir tuning/work/gate \
		--ship-to bt_pipeline/weights/classifier.keras

# A candidate recipe's fold gates, searched as `make tune` searches (same Keras Tuner project, so
# a later `make tune` on it reruns no trial), before it has an all-patient U-Net: what its
# cross-validation's pipeline column needs to be held out. Ships nothing.
cv-gates: install
	$(PY) -m bt_pipeline tune --gate --folds-only --recipe $(CV_RECIPE) --data-dir $(KAGGLE_ROOT) \
		--trials $(TRIALS) --epochs $(EPOCHS) --executions $(EXECUTIONS) \
		--fine-tune-choices $(FINE_TUNE_CHOICES) --out-dir reports/cv/$(CV_RECIPE)/gate_search \
		--work-dir tuning/work/gate

# The gate without a search: the head a recipe's search chose (GATE_FROM, an earlier gate's
# JSON: its dropout, activation, width, rate and epochs) trained on the recipe's fold U-Nets
# (held-out probabilities, threshold; `fold-gates`), then on the shipped U-Net (`gate`, after
# `make train-unet`). For a recipe that only fine-tunes its predecessor's U-Nets.
GATE_FROM ?= reports/cv/four_cycles/models/gate_fold0.json
fold-gates: install
	$(PY) -m bt_pipeline tune --gate --folds-only --recipe $(UNET_RECIPE) --retrain-from $(GATE_FROM) \
		--data-dir $(KAGGLE_ROOT) --out-dir reports/cv/$(UNET_RECIPE)/gate_search

gate: install
	$(PY) -m bt_pipeline tune --gate --shipped-only --recipe $(UNET_RECIPE) --retrain-from $(GATE_FROM) \
		--data-dir $(KAGGLE_ROOT) --out-dir tuning/gate --ship-to bt_pipeline/weights/classifier.keras

# The from-scratch slice CNN, stage 1 before the gate, kept as an option and as the baseline row:
# RandomSearch on val, the best retrained into runs/classifier/ (not shipped).
tune-classifier: install
	$(PY) -m bt_pipeline tune --data-dir $(KAGGLE_ROOT) --trials $(TRIALS) --epochs $(EPOCHS) \
		--executions $(EXECUTIONS) --ship-to runs/classifier/classifier.keras

# Which stage 1 ships: the encoder gates against the from-scratch CNN (STAGE1_OTHER, by default
# the baseline recipe's copy of it) and against no gate, whole pipeline, on development patients
# neither saw -> reports/cv/$(UNET_RECIPE)/stage1_choice/
STAGE1_OTHER ?= reports/cv/baseline/models/classifier.keras
stage1-choice: install
	$(PY) -m bt_pipeline stage1-choice --data-dir $(KAGGLE_ROOT) --recipe $(UNET_RECIPE) \
		--other $(STAGE1_OTHER)

# How much of the CV's error the shipped models, trained on every development patient, fit.
fit-gap: install
	$(PY) -m bt_pipeline fit-gap --data-dir $(KAGGLE_ROOT)

# A chief (the gRPC oracle) and $(WORKERS) workers on this machine; see README for several.
tune-distributed: install
	WORKERS=$(WORKERS) ORACLE_PORT=$(ORACLE_PORT) PY=$(PY) bash tuning/run_distributed.sh \
		--data-dir $(KAGGLE_ROOT) --trials $(TRIALS) --epochs $(EPOCHS) --executions $(EXECUTIONS)

# Train the U-Net recipe $(UNET_RECIPE) on every development patient (train + val; about an
# hour on 2 cores in bfloat16 where the CPU has it natively, float32 elsewhere) and ship it,
# then choose its post-processing on that recipe's held-out cross-validation predictions, under
# the intensity rule $(INTENSITY), and write both into its JSON. The shipped gate reads this
# U-Net's encoder: `make tune` after it.
train-unet: install
	$(PY) -m bt_pipeline cv --data-dir $(KAGGLE_ROOT) --recipe $(UNET_RECIPE) --all \
		--ship-to bt_pipeline/weights/unet.keras
	$(MAKE) --no-print-directory postprocess

# Intensity rule the shipped U-Net runs under (docs/training.md, "One intensity scale").
INTENSITY ?= volume_p99
# The recipe that shipped before $(UNET_RECIPE): its CV report is what the shipped recipe's report
# is paired against, patient by patient.
SHIPPED_BEFORE ?= four_cycles
postprocess: install
	$(PY) -m bt_pipeline cv --data-dir $(KAGGLE_ROOT) --recipe $(UNET_RECIPE) --no-train \
		--intensity $(INTENSITY) \
		--against reports/cv/$(SHIPPED_BEFORE)/intensity_$(INTENSITY)/patients.csv \
		--write-postprocessing bt_pipeline/weights/unet.keras

# 5-fold cross-validation over the development patients: trains the missing folds (bfloat16
# where native), scores every fold's held-out patients -> reports/cv/$(CV_RECIPE)/. A killed
# run resumes.
cv: install
	$(PY) -m bt_pipeline cv --data-dir $(KAGGLE_ROOT) --recipe $(CV_RECIPE)

# The reference study's tables (learning rate x batch norm, batch size x learning rate) and
# the next-step options (TV denoising, ensemble, flip TTA) -> reports/experiments/.
experiments: install
	$(PY) -m bt_pipeline experiments --data-dir $(KAGGLE_ROOT) \
		--epochs-lr-bn $(EXP_EPOCHS_LR_BN) --epochs-batch $(EXP_EPOCHS_BATCH) \
		--epochs-options $(EXP_EPOCHS_OPTIONS) --image-size $(EXP_IMAGE_SIZE) \
		--base-filters $(EXP_BASE_FILTERS)

# Every speed figure of README "Speed" in one run (< 5 min on 2 cores): name=value lines and
# reports/bench.json.
bench: install
	@$(PY) -m pip install --quiet -e ".[onnx]" || echo "no ONNX Runtime: its bench rows are left out"
	$(PY) -m bt_pipeline bench --data-dir $(KAGGLE_ROOT)

bench-loader: install
	$(PY) -m bt_pipeline bench-loader --data-dir $(KAGGLE_ROOT)

# BENCH_INFER_FLAGS: e.g. --tta-flips, --precision float32 (passed on to infer)
BENCH_INFER_FLAGS ?=
bench-infer: install
	$(PY) -m bt_pipeline bench-infer --data-dir $(KAGGLE_ROOT) --splits val test $(BENCH_INFER_FLAGS)

# The per-case quality estimate on held-out patients (nested CV, test, the BraTS development
# cases when present), fitted on every fold's held-out cases and shipped beside the U-Net
# -> reports/quality/, bt_pipeline/weights/quality.json.
quality-check: install
	$(PY) -m bt_pipeline quality --data-dir $(KAGGLE_ROOT) --ship-to bt_pipeline/weights/unet.keras \
		$(if $(wildcard external/brats2015_dev),--external external/brats2015_dev)

# The README's and the model card's figures from the committed reports (make docs-check: fail
# where a document differs).
docs: install
	$(PY) -m bt_pipeline docs

docs-check: install
	$(PY) -m bt_pipeline docs --check

# Plain infer against infer on a local Ray runtime (1 actor x 2 threads, 2 x 1) on the test
# patients -> reports/bench_cluster.json (docs/cluster.md).
bench-cluster: install
	$(PY) -m bt_pipeline bench-cluster --data-dir $(KAGGLE_ROOT)

# What a wider U-Net would cost at inference (random weights, the shipped design otherwise).
bench-widths: install
	$(PY) -m bt_pipeline bench-widths

# The README's first command: shipped models on the test-split patients of the data directory.
demo: install
	@if [ ! -d "$(KAGGLE_ROOT)" ] && [ -d "$(SHARED_LGG)" ]; then $(MAKE) --no-print-directory data; fi
	@if [ ! -d "$(KAGGLE_ROOT)" ]; then $(MAKE) --no-print-directory data; exit 1; fi
	$(PY) -m bt_pipeline infer $$($(PY) -m bt_pipeline patients --split test \
		--data-dir $(KAGGLE_ROOT)) --out predictions/demo
	@echo "open predictions/demo/report.html"

# docs/viewer.png, report.png, viewer_nifti.png: the viewer and report of one real test patient
# (with ground truth), and the viewer of its FLAIR as a NIfTI case (none), by headless Chromium
# (Debian package chromium; CHROMIUM=... to use another binary).
CHROMIUM ?= chromium
SCREENSHOT_PATIENT ?= TCGA_CS_4941_19960909
SHOT = $(CHROMIUM) --headless --no-sandbox --disable-gpu --no-first-run \
	--disable-background-networking --disable-component-update --disable-sync --hide-scrollbars
screenshot: install
	$(PY) -m bt_pipeline infer $(KAGGLE_ROOT)/$(SCREENSHOT_PATIENT) --out runs/screenshot \
		--spacing 0.94 0.94 3.0 --quiet
	$(PY) -m bt_pipeline infer runs/screenshot/$(SCREENSHOT_PATIENT)/image.nii.gz \
		--out runs/screenshot_nifti --quiet
	$(SHOT) --window-size=1100,790 --screenshot=$(CURDIR)/docs/viewer.png \
		file://$(CURDIR)/runs/screenshot/$(SCREENSHOT_PATIENT)/viewer.html
	$(SHOT) --window-size=1100,790 --screenshot=$(CURDIR)/docs/viewer_nifti.png \
		file://$(CURDIR)/runs/screenshot_nifti/image/viewer.html
	$(SHOT) --window-size=1300,900 --screenshot=$(CURDIR)/docs/report.png \
		file://$(CURDIR)/runs/screenshot/report.html

# The shipped models on the test patients (only reported), with all three sequences and with
# FLAIR alone; the U-Net trained on every development patient, so val is not held out.
evaluate: install
	$(PY) -m bt_pipeline evaluate --data-dir $(KAGGLE_ROOT) --splits test
	$(PY) -m bt_pipeline evaluate --data-dir $(KAGGLE_ROOT) --splits test --flair-only \
		--out reports/evaluation/flair_only

# Labelled BraTS-style cases (folders of CASE_flair, _t1, _t1ce, _seg NIfTI files) through
# the shipped models, whole-tumour Dice per case, all sequences and FLAIR alone
# -> reports/external/<folder name>/ (docs/external.md: the BraTS 2015 development cases).
EXTERNAL_DIR ?= external/brats2015_dev
external: install
	$(PY) -m bt_pipeline external $(EXTERNAL_DIR)

# Test patients written as NIfTI and DICOM (oblique, int16), through infer, masks compared with
# the slice-folder run's -> reports/roundtrip/.
roundtrip: install
	$(PY) -m bt_pipeline roundtrip --data-dir $(KAGGLE_ROOT)

# Shape features of manual and automatic masks against data.csv's genomic subtypes; automatic
# masks from U-Nets that never trained on the patient (CV folds, shipped for test).
radiogenomics: install
	$(PY) -m bt_pipeline radiogenomics --data-dir $(KAGGLE_ROOT) --recipe $(UNET_RECIPE)

clean:
	rm -rf .cache reports runs predictions tuning/work
