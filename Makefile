# Two commands for a newcomer:  make book [PROFILE=smoke|laptop|gpu]   and   make test
PROFILE ?= laptop
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := $(VENV)/.extras
LAB := $(VENV)/.lab

.PHONY: setup setup-extras book test test-fast browser train bench sweep clean-build publish lab

# create or reuse the virtual environment; reinstall when requirements change
$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@command -v npm >/dev/null || echo "note: npm is needed once to vendor the widget JavaScript (apt-get install npm)"
	touch $(STAMP)

# optional extras the tests exercise (TransformerLens export, Hugging Face datasets)
$(EXTRAS): $(STAMP) requirements-extras.txt
	$(PY) -m pip install -q -r requirements-extras.txt
	touch $(EXTRAS)

setup: $(STAMP)
setup-extras: $(EXTRAS)

# headless Chromium from Debian for the site tests (never a browser download)
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	@command -v npm >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null)

# set up, train what the profile needs, execute the chapters with papermill, render the site
book: setup
	$(PY) -m icl_core.book build --profile $(PROFILE) $(BOOK_ARGS)

train: setup
	$(PY) -m icl_core.book train --profile $(PROFILE)

# set up, then run every test (the site test builds the smoke book and opens it in Chromium)
test: setup setup-extras browser
	$(PY) -m pytest -q -ra tests $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

# push a built book (make book, on any machine) to the gh-pages branch of $(PUBLISH_REMOTE):
# the site's files only, with .nojekyll (GitHub Pages serves _static/ as it is); replaces the branch
PUBLISH_REMOTE ?= origin
PUBLISH_BRANCH ?= gh-pages
SITE ?= _build/html
publish: setup
	@test -f $(SITE)/index.html || { echo "error: no $(SITE)/index.html: build the book first (make book)"; exit 1; }
	$(VENV)/bin/ghp-import --no-jekyll --no-history --force --push --remote $(PUBLISH_REMOTE) --branch $(PUBLISH_BRANCH) \
		--message "Publish the book ($$(git rev-parse --short HEAD 2>/dev/null || echo unversioned))" $(SITE)

# JupyterLab (requirements-lab.txt) in .venv, opened on chapters/ with the project's python3 kernel
$(LAB): $(STAMP) requirements-lab.txt
	$(PY) -m pip install -q -r requirements-lab.txt
	touch $(LAB)

lab: $(LAB)
	$(VENV)/bin/jupyter lab --notebook-dir=chapters $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

bench: setup setup-extras
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

clean-build:
	rm -rf _build
