# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv (if missing) and installs everything into it.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NPROC  ?= 2
# Optional extra index for torch's CPU wheels on machines that do not keep them locally.
TORCH_INDEX ?=
# apt-get needs root: sudo when not root.
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

export PYTHONUNBUFFERED := 1

.PHONY: install demo test slurm-test parity clean

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
	$(PY) -m pip install -q -e '.[test]'
	@# The disk KV tier uses DeepSpeed AIO: libaio headers (Debian libaio-dev), op built once.
	@test -e /usr/include/libaio.h || $(SUDO) apt-get install -y -q libaio-dev >/dev/null \
		|| ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q libaio-dev >/dev/null) \
		|| echo "warning: could not install libaio-dev; the disk KV tier (cache.disk_path) will be unavailable"
	@$(PY) -c "from deepspeed.ops.op_builder import AsyncIOBuilder as B; b = B(); \
		b.is_compatible(False) and b.load(verbose=False)" 2>&1 | grep -v "WARNING\|^$$" || true
	@touch $(STAMP)

# The main job: Seesaw P2 -> T2 on two ranks; a small host KV tier makes it switch a few times.
demo: $(STAMP)
	@mkdir -p outputs
	$(VENV)/bin/deepspeed --no_local_rank --num_gpus 2 launch/infer.py plan=p2_t2 \
		cache.host_kv_tokens=64 sampling.max_tokens=48 data.output=outputs/demo.jsonl data.overwrite=true
	@$(PY) -c "import json; [print(f'  {r[\"id\"]:>7}: {(r[\"prompt\"] or \"<chat>\")!r} -> {r[\"text\"]!r}') for r in map(json.loads, open('outputs/demo.jsonl'))]"
	$(VENV)/bin/deepspeed --no_local_rank --num_gpus $(NPROC) --module seesaw_mcore.tools.parity \
		--model models/tiny-llama --layouts T2 P2 --check

test: $(STAMP)
	$(PY) -m pytest -q tests --ignore=tests/slurm

# launch/slurm/infer.sbatch on a local two-node Slurm cluster (network namespaces; root).
slurm-test: $(STAMP)
	@command -v slurmctld >/dev/null && command -v munged >/dev/null \
		|| $(SUDO) apt-get install -y -q slurm-wlm munge >/dev/null \
		|| ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q slurm-wlm munge >/dev/null)
	$(PY) -m pytest -q tests/slurm

clean:
	rm -rf $(VENV) *.egg-info
