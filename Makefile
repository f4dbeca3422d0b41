# ecsearch: two commands set everything up (see README.md).
#   make demo   create .venv, then run the main job (train, index, serve, query)
#   make test   create .venv, then run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test venv stop bench proto buf-lint clean

$(STAMP): setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls gigabytes of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m server.demo

test: $(STAMP)
	$(PY) -m pytest -q

stop: $(STAMP)
	$(PY) -m server.demo --stop

bench: $(STAMP)
	$(PY) bench/bench_encode.py

# Regenerate the gRPC stubs in server/gen from proto/ (committed; tests/test_proto.py checks they are fresh).
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iserver/gen=proto --python_out=. --pyi_out=. --grpc_python_out=. proto/ecsearch/v1/search.proto

# Lint the contract with buf (npm package @bufbuild/buf).
buf-lint:
	npm install --silent --prefix var/buf @bufbuild/buf
	var/buf/node_modules/.bin/buf lint proto

clean:
	rm -rf var build *.egg-info
