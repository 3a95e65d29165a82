# Every target creates/updates the Python 3.12 virtual environment it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test lint clean

$(STAMP): setup.py
	@test -x $(PY) || "$$(.ci/python312)" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

# The main job on its embedded default: the CPU toy world.
demo: $(STAMP)
	$(VENV)/bin/copd train

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
