# Two commands set up everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.muse-installed
TEST_JOBS ?= 2
# Kernel tests run on CPU tensors through the Triton interpreter unless a GPU is present.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
ifeq ($(HAS_GPU),0)
  TEST_ENV := TRITON_INTERPRET=1
endif

.PHONY: venv test test-gpu demo demo-gen kernel-demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py scripts/bootstrap.sh
	bash scripts/bootstrap.sh $(VENV)
	touch $(STAMP)

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_JOBS) $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

# The main job on an embedded default: shards from real photos, the tiny tokenizer through all stages.
demo: $(STAMP)
	$(PY) -m muse.demo

# Generation on the tiny tokenizer of `make demo`: encode the photos, train a tiny SANA, sample a grid.
demo-gen: $(STAMP)
	$(PY) -m muse.gen.demo

# The fused kernels against an fp64 reference (Triton interpreter without a GPU).
kernel-demo: $(STAMP)
	$(TEST_ENV) $(PY) -m muse_kernels.demo

clean:
	rm -rf $(VENV) build *.egg-info demo_out
