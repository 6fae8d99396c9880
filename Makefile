# The README's two commands: `make demo` and `make test`. Both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed-stamp
DEMO_DIR ?= demo

.PHONY: install test demo bench bench-gpu bench-gpu-detector clean

# A venv without pip (python3 -m venv fails at ensurepip on a Debian without python3-venv, leaving bin/python behind)
# is made again, whole, once python3-venv is there.
$(VENV)/bin/pip:
	python3 -m venv --clear $(VENV)

$(INSTALLED): setup.py | $(VENV)/bin/pip
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(INSTALLED)

# The 15 slowest tests are listed after the run: the suite must stay under 20 minutes on 2 cores (CI).
test: $(INSTALLED)
	$(PY) -m pytest -q --durations=15 tests

demo: $(INSTALLED)
	$(PY) launch/demo.py --out $(DEMO_DIR)

bench: $(INSTALLED)
	$(PY) -m bench.shards --out bench/results
	$(PY) -m bench.loader --out bench/results
	$(PY) -m bench.train --device cpu --batch 32 --steps 8 --warmup 2 --out bench/results
	$(PY) -m bench.step --device cpu --size 64 --batch 32 --warmup 2 --steps 5 --out bench/results
	$(PY) -m bench.blends --device cpu --size 64 --batch 32 --out bench/results
	$(PY) -m bench.detector --minutes 4 --out bench/results

# On a GPU machine, after bench/gpu-stage.sh (see its header): one call, at most 10 minutes. Through the
# device tool, give OUT=$$OUT: only what lands there comes back.
OUT ?= bench/results
bench-gpu:
	bench/gpu.sh $(OUT)/gpu

# On a GPU machine, after bench/gpu-stage.sh prepare CELEBA_SHARDS CELEBDF_SHARDS: the detector, one call.
bench-gpu-detector:
	bench/gpu-detector.sh $(OUT)/gpu-detector

clean:
	rm -rf $(DEMO_DIR) bench/results .pytest_cache
