# ecsearch: two commands set everything up (see README.md).
#   make demo   create .venv, then run the main job (train, index, serve, query)
#   make test   create .venv, then run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test venv stop bench proto clean

$(STAMP): setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls gigabytes of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m engine.demo

test: $(STAMP)
	$(PY) -m pytest -q

stop: $(STAMP)
	$(PY) -m engine.demo --stop

bench: $(STAMP)
	$(PY) bench/bench_encode.py

clean:
	rm -rf var build *.egg-info
