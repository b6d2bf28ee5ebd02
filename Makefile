# Two commands on a fresh machine: `make demo` and `make test` (both install what is missing).
# A machine that already has torch and triton (a GPU machine) keeps them; a CPU machine gets
# the CPU build of torch (never the multi-GB CUDA one) and the triton of the GPU machines.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_CPU ?= torch==2.13.0+cpu
TRITON ?= triton==3.6.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: install demo test test-full test-triton-versions test-triton-latest bench tune

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_CPU)" \
		|| $(PIP) install "$(TORCH_CPU)" --index-url $(TORCH_CPU_INDEX)
	@$(PYTHON) -c "import triton" 2>/dev/null || $(PIP) install "$(TRITON)"
	@$(PYTHON) -c "import numpy, pytest, pytest_timeout, matplotlib, hypothesis" 2>/dev/null \
		|| $(PIP) install numpy pytest pytest-timeout matplotlib hypothesis
	@# CPU machines run the kernels in Triton's interpreter: pyproject's `cpu` extra (numpy < 2.4
	@# for Triton 3.6's interpreter).
	@$(PYTHON) -c "import torch; raise SystemExit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
		|| { unmet="$$($(PYTHON) scripts/requirements.py --unmet cpu)"; [ -z "$$unmet" ] || $(PIP) install $$unmet; }
	@$(PYTHON) -c "import importlib.util as u, sys; sys.exit(u.find_spec('moe_ep') is None)" 2>/dev/null \
		|| $(PIP) install --no-deps --no-build-isolation -e .

demo: install
	$(PYTHON) -m moe_ep.demo

test: install
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

# Every multi-rank test on 2, 3 and 4 CPU ranks (CI runs most on 2: tests/conftest.py).
test-full: install
	MOE_EP_CPU_WORLDS=2,3,4 $(PYTHON) -m pytest -q $(PYTEST_ARGS)

# The CPU contract subset under Triton 3.6, 3.8 and 3.9, one venv each (scripts/test_triton_versions.sh).
test-triton-versions:
	PYTHON=$(PYTHON) TORCH_CPU="$(TORCH_CPU)" TORCH_CPU_INDEX=$(TORCH_CPU_INDEX) scripts/test_triton_versions.sh

# CI's second lane: the same subset under the current Triton release, in a venv over the installed
# torch (only Triton is downloaded).
test-triton-latest: install
	PYTHON=$(PYTHON) VENV_SYSTEM_SITE=1 TRITON_VERSIONS=3.9.0 VENV_ROOT=$${VENV_ROOT:-/tmp/moe_ep-ci-venvs} \
		scripts/test_triton_versions.sh

bench: install
	$(PYTHON) benchmarks/bench_ep.py

tune: install
	$(PYTHON) -m moe_ep.tune

# The vLLM / SGLang adapters against the frameworks themselves (not in `make test`: each lane
# builds a venv of about 10 GB). The venvs live under $(INTEGRATIONS_VENVS) (outside the repo) and
# are reused; moe_ep is installed into them in editable mode (its plugin entry points).
INTEGRATIONS_VENVS ?= /tmp
VLLM_VERSION ?= 0.33.0
SGLANG_VERSION ?= 0.5.23

.PHONY: test-integrations test-integrations-vllm test-integrations-sglang

test-integrations: test-integrations-vllm test-integrations-sglang

test-integrations-vllm:
	./tests/integrations/run_lane.sh $(INTEGRATIONS_VENVS)/venv-vllm vllm==$(VLLM_VERSION) tests/integrations/test_vllm.py $(PYTEST_ARGS)

test-integrations-sglang:
	./tests/integrations/run_lane.sh $(INTEGRATIONS_VENVS)/venv-sglang sglang==$(SGLANG_VERSION) tests/integrations/test_sglang.py $(PYTEST_ARGS)
