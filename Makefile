# ecsearch: two commands set everything up (see README.md).
#   make demo   create .venv, then run the main job (train, index, serve, query)
#   make test   create .venv, then run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-avx2 venv stop bench proto buf-lint clean

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

# pytest's exit 5 (no test collected) is a failure here, not a success.
NO_TESTS_FAIL := rc=$$?; if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test: $(STAMP)
	$(PY) -m pytest -q; $(NO_TESTS_FAIL)

# The ISA-dependent tests again, as a plain AVX2 machine runs them (torch, oneDNN and
# ecsearch's own CPU-feature probe all capped at AVX2; see engine/cpu_features.py). Where the
# kernel can fault CPUID (the "cpuid_fault" CPU flag), bench/cpuid_avx2.c is preloaded as well,
# so ONNX Runtime, faiss and OpenBLAS, which read CPUID and have no cap, take their AVX2 kernels too.
AVX2_ENV := ECSEARCH_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
AVX2_SO  := $(CURDIR)/$(VENV)/cpuid_avx2.so
test-avx2: $(STAMP)
	@preload=; if grep -qw cpuid_fault /proc/cpuinfo 2>/dev/null && cc -O2 -shared -fPIC -o $(AVX2_SO) bench/cpuid_avx2.c -ldl; \
	then preload=LD_PRELOAD=$(AVX2_SO); echo "CPUID masked to AVX2 for every library ($$preload)"; \
	else echo "no CPUID faulting (or no cc) here: torch, oneDNN and ecsearch capped at AVX2, other libraries unmasked"; fi; \
	env $$preload $(AVX2_ENV) $(PY) -m pytest -q -m isa; $(NO_TESTS_FAIL)

stop: $(STAMP)
	$(PY) -m server.demo --stop

bench: $(STAMP)
	$(PY) bench/bench_encode.py

# Regenerate the gRPC stubs in server/gen from proto/ (committed; tests/test_proto.py checks they are fresh).
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iserver/gen=proto --python_out=. --pyi_out=. --grpc_python_out=. proto/ecsearch/v1/search.proto proto/ecsearch/v1/admin.proto

# Lint the contract with buf (npm package @bufbuild/buf).
buf-lint:
	npm install --silent --prefix var/buf @bufbuild/buf
	var/buf/node_modules/.bin/buf lint proto

clean:
	rm -rf var build *.egg-info
