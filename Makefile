# Two commands do everything: `make run` (set up, then predict on the example photo with the bundled
# model) and `make test` (set up, then the tests). `make demo` trains and evaluates a small model.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SAMPLE := examples/fer2013-sample
DEMO   := runs/demo

.PHONY: setup run demo test test-minimum clean

# A virtual environment for $(PYTHON), refused in one line unless it is 3.11 or 3.12, and made anew where
# one for another Python is there (`python -m venv` over it would leave python pointing at the old one).
define new_venv
	@$(PYTHON) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(None if v in ("3.11", "3.12") else f"ferkit needs Python 3.11 or 3.12; $(PYTHON) is {v}: name one, e.g. make $(or $(MAKECMDGOALS),run) PYTHON=python3.11")'
	@if { [ -e $(1)/bin/python ] || [ -L $(1)/bin/python ]; } && [ "$$($(1)/bin/python -c 'import sys; print(sys.version_info[:2])' 2>/dev/null)" != "$$($(PYTHON) -c 'import sys; print(sys.version_info[:2])')" ]; then \
		echo "$(1) is for another Python: made anew for $(PYTHON)"; rm -rf $(1); fi
	$(PYTHON) -m venv $(1)
endef

# `make run` installs what photo prediction needs (ONNX Runtime and YuNet: no TensorFlow, no OpenCV);
# `make test` and `make demo` add every extra and the development tools to the same .venv.
$(VENV)/.installed-predict: pyproject.toml
	$(call new_venv,$(VENV))
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-all: pyproject.toml
	$(call new_venv,$(VENV))
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[all,dev]"
	touch $(VENV)/.installed-predict $@

setup: $(VENV)/.installed-all

run: $(VENV)/.installed-predict
	$(BIN)/ferkit predict examples/people.jpg --out runs/predict

demo: setup
	$(BIN)/ferkit train --model seed-cnn --data $(SAMPLE)/train --val $(SAMPLE)/val \
		--epochs 30 --augment flip,zoom --out $(DEMO) --overwrite
	$(BIN)/ferkit evaluate $(DEMO) --data $(SAMPLE)/val
	$(BIN)/ferkit predict $(SAMPLE)/val/happy/$(shell ls $(SAMPLE)/val/happy | head -n 1) --model $(DEMO) --detector none

# The test files run side by side, one process per core (pytest-xdist); each file stays in one process,
# so a file's shared fixtures (a trained model, a study) are built once.
PYTEST_ARGS ?= -n auto --dist loadfile

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The suite again on the oldest releases pyproject.toml admits (each direct dependency at its floor,
# by uv's lowest-direct resolution), so that the lower bounds stay true. Without the distributed extra:
# JAX needs NumPy 2, which would lift NumPy's floor (its tests skip here and run in `make test`); without
# the ray extra, whose floor is the release `make test` installs (its tests skip here too).
$(VENV)-minimum/.installed: pyproject.toml
	$(call new_venv,$(VENV)-minimum)
	$(VENV)-minimum/bin/pip install --quiet uv
	$(VENV)-minimum/bin/uv pip install --quiet --python $(VENV)-minimum/bin/python --resolution lowest-direct -e ".[evaluate,video,train,serve,heic,dev]"
	touch $@

test-minimum: $(VENV)-minimum/.installed
	$(VENV)-minimum/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VENV)-minimum runs build src/*.egg-info .pytest_cache
