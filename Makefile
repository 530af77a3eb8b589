# Set-up and everyday commands. Every target builds its own virtual environment from the checkout.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= edge,train,test
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

SHARED ?= ../shared/data
TRAIN := $(VENV)/bin/hematovision-train

.PHONY: test demo venv clean bench reference crosslab

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

# pytest's exit code 5 (no tests collected) is a failure here, not a pass.
test: $(STAMP)
	$(PY) -m pytest -q -rs; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

demo: $(STAMP)
	$(VENV)/bin/hematovision-edge count samples/bccd/BCCD/JPEGImages --specimen-id demo-samples --report out/demo
	@echo "reports written to out/demo"

# Reproduce the reference bundle from scratch (needs ../shared/data; about an hour on 2 cores): both
# labs' cells (BCCD fields where the device's segmenter finds each cell; PBC single-cell images located
# the same way), eight classes (platelet as the reject class), cross-lab augmentation and per-crop
# colour standardisation (the leave-one-lab-out winners, `make crosslab`). Held out as the test split:
# the BCCD fields behind Kaggle's TEST images, and a seeded 15% of PBC's cells (train/pbc_test_cells.csv).
ALL_CLASSES := neutrophil,lymphocyte,monocyte,eosinophil,basophil,ig,erythroblast,platelet
reference: $(STAMP)
	$(TRAIN) fit --bccd $(SHARED)/bccd --cells $(SHARED)/pbc --centres segmenter --classes $(ALL_CLASSES) \
	    --test-fields train/kaggle_test_origins.csv --test-fields train/pbc_test_cells.csv \
	    --backbone efficientnet_lite0 --weights imagenet --augment crosslab --colour reinhard \
	    --head-lr 3e-3 --head-epochs 4 --finetune-lr 2e-4 --finetune-epochs 20 \
	    --finetune-fraction 1.0 --patience 5 --out runs/reference
	$(TRAIN) evaluate runs/reference
	$(VENV)/bin/hematovision-export runs/reference --out models/reference

# Cross-lab figures (needs ../shared/data; resumable): leave-one-lab-out in both directions, the
# reference bundle per lab, TXL-PBC class shares; written to benchmarks/results/crosslab.json.
crosslab: result-crosslab

# Benchmarks print their figures (not tests); they need a bundle and, for some, ../shared/data.
bench: $(STAMP)
	$(PY) benchmarks/bench_pipeline.py
	$(PY) benchmarks/bench_detection.py
	$(PY) benchmarks/bench_kaggle_pipeline.py
	$(PY) benchmarks/bench_backbones.py

# The README's "Measured results" tables come from the JSON files committed in $(RESULTS), one per
# benchmark, each naming the commit, cores and date it was measured on (benchmarks/provenance.py).
#   make results                            rebuilds the tables from those files alone: no venv, no data,
#                                           nothing measured; a file not there reads "not measured (run: ...)"
#   make results RERUN="kaggle detection"   first reruns those benchmarks into $(RESULTS), then the tables
#   make results RERUN=all                  reruns every benchmark (hours; needs ../shared/data)
#   make result-kaggle                      reruns one benchmark, leaves the README alone
# Names: $(BENCHMARKS). cv summarises every finished cross-validation (runs/cv_*/, `make cv`) without
# training; crosslab trains (`make crosslab`). The benchmarks measure models/reference: `make reference`
# first when it changes. daemon replays for DAEMON_MINUTES (30). Commit the JSON files with the README.
RESULTS ?= benchmarks/results
RERUN ?=
DAEMON_MINUTES ?= 30
BENCHMARKS := kaggle detection backbones pipeline scan daemon faults crosslab flags adapt cv web
RERUN_NAMES = $(if $(filter all,$(RERUN)),$(BENCHMARKS),$(RERUN))
.PHONY: results cv $(addprefix result-,$(BENCHMARKS))

results: $(if $(RERUN),$(STAMP))
	$(if $(filter-out all $(BENCHMARKS),$(RERUN)),$(error RERUN: unknown '$(filter-out all $(BENCHMARKS),$(RERUN))'; one or more of: all $(BENCHMARKS)))
	@set -e; for name in $(RERUN_NAMES); do $(MAKE) --no-print-directory result-$$name; done
	$(PYTHON) benchmarks/results_table.py --results $(RESULTS) --readme README.md

result-kaggle: $(STAMP)
	$(PY) benchmarks/bench_kaggle_pipeline.py --json $(RESULTS)/kaggle.json
result-detection: $(STAMP)
	$(PY) benchmarks/bench_detection.py --pixel-size lab --json $(RESULTS)/detection.json
result-backbones: $(STAMP)
	$(PY) benchmarks/bench_backbones.py --json $(RESULTS)/backbones.json
result-pipeline: $(STAMP)
	$(PY) benchmarks/bench_pipeline.py --json $(RESULTS)/pipeline.json
result-scan: $(STAMP)
	$(PY) benchmarks/bench_scan.py --runs 4 --json $(RESULTS)/scan.json
result-daemon: $(STAMP)
	$(PY) benchmarks/bench_daemon_memory.py --minutes $(DAEMON_MINUTES) --fps 5 --json $(RESULTS)/daemon.json
# The web page's cost on the frame loop, and the daemon's RSS with the page watched and used (README, "The web page").
result-web: $(STAMP)
	$(PY) benchmarks/bench_web.py --seconds 45 --repeat 3 --json $(RESULTS)/web.json
	$(PY) benchmarks/bench_daemon_memory.py --web --minutes 10 --fps 5 --target 20 --json $(RESULTS)/daemon_web.json
result-faults: $(STAMP)
	$(PY) benchmarks/bench_faults.py --json $(RESULTS)/faults.json
result-crosslab: $(STAMP)
	$(PY) benchmarks/crosslab.py --out runs/crosslab --json $(RESULTS)/crosslab.json
# The reference bundle (its own labs' held-out cells and shifts), then each leave-one-lab-out bundle
# of `make result-crosslab` (a lab it never saw): the flag must fire where accuracy is low.
result-flags: $(STAMP)
	$(PY) benchmarks/bench_flags.py --json $(RESULTS)/flags.json
	@set -e; for d in bccd_to_pbc pbc_to_bccd; do \
	    if [ -f runs/crosslab/$${d}_bundle/bundle.json ]; then \
	        $(PY) benchmarks/bench_flags.py --bundle runs/crosslab/$${d}_bundle --json $(RESULTS)/flags_$$d.json; \
	    fi; \
	done
# Site adaptation's learning curve on each leave-one-lab-out bundle of `make result-crosslab` (the lab it
# never saw, K verified cells per class, several draws), and the command timed on 50 cells per class.
result-adapt: $(STAMP)
	@set -e; for d in bccd_to_pbc pbc_to_bccd; do \
	    if [ -f runs/crosslab/$${d}_bundle/bundle.json ]; then \
	        $(PY) benchmarks/bench_adapt.py --bundle runs/crosslab/$${d}_bundle --json $(RESULTS)/adapt_$$d.json; \
	    else echo "result-adapt: runs/crosslab/$${d}_bundle missing: make result-crosslab first" >&2; exit 1; fi; \
	done
result-cv: $(STAMP)
	@set -e; for d in runs/cv_*/; do \
	    if ls $$d/fold*_bundle/bundle.json >/dev/null 2>&1; then \
	        echo "$(PY) benchmarks/cross_validate.py --summary-only --out $$d"; \
	        $(PY) benchmarks/cross_validate.py --summary-only --out $$d; \
	        cp $$d/summary.json $(RESULTS)/$$(basename $$d).json; \
	    fi; \
	done

# Grouped 5-fold cross-validation of Lite0 as the device sees cells (segmenter centres, stain
# augmentation); hours on 2 cores, resumable: rerun to continue. `make results` summarises it.
cv: $(STAMP)
	$(PY) benchmarks/cross_validate.py --backbone efficientnet_lite0 --bccd $(SHARED)/bccd \
	    --centres segmenter --augment stain --out runs/cv_lite0_seg_stain

clean:
	rm -rf $(VENV) out build *.egg-info
