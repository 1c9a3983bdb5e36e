# Two commands: `make demo` and `make test`. Both create .venv and install everything first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
EMOJI := data/emoji/captions_train.json
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast install data lint clean

# Optional Debian data packages (Fashion-MNIST for zero-shot evaluation, Tux Paint stamps for image+audio):
# installed when we are root on a Debian-like system, otherwise skipped with a note.
define apt_optional
	-@if [ ! -d $(2) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y --no-install-recommends $(1) >/dev/null 2>&1 || \
		 (apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends $(1) >/dev/null 2>&1)) \
		|| echo "note: $(1) not installed; $(3)"; fi
endef

install: $(VENV)/.installed

# torch first, from the CPU wheel, so that no CUDA build is pulled in; constraints.txt then pins it.
# aisfx (the pretrained sound CNN) without its pins of numpy 1.23 and librosa 0.9: the model code and
# checkpoint we use import only torch, numpy and tqdm (a dependency of transformers), all installed before.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,flower,tracking]'
	$(BIN)/pip install --quiet --no-deps aisfx==0.1.2
	$(call apt_optional,dataset-fashion-mnist,/usr/share/datasets/fashion-mnist,zero-shot evaluation will be skipped)
	$(call apt_optional,tuxpaint-stamps-default,/usr/share/tuxpaint/stamps,Tux Paint tests will be skipped)
	touch $@

data: $(EMOJI)

$(EMOJI): $(VENV)/.installed
	$(BIN)/fedmml data prepare emoji --out data/emoji

demo: install data
	$(BIN)/fedmml compare --tuned emoji --out runs/demo --overwrite

# One worker per core (pytest-xdist), each test file on one worker so that its module fixtures are built once.
# (One worker more was measured slower: 20.3 min against 19.2; the suite is CPU-bound.)
test: install data
	$(BIN)/python -m pytest -q -n auto --dist loadfile

# The tests not marked slow (no Flower runtimes, no long end-to-end runs): a minute or two while developing.
test-fast: install data
	$(BIN)/python -m pytest -q -n auto --dist loadfile -m "not slow"

lint: install
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/ruff format --check src tests scripts benchmarks

clean:
	rm -rf $(VENV) runs .cache
