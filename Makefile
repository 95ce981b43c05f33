# Two commands do everything: `make run` (set up, then predict on the example photo with the bundled
# model) and `make test` (set up, then the tests). `make demo` trains and evaluates a small model.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SAMPLE := examples/fer2013-sample
DEMO   := runs/demo

.PHONY: setup run demo test test-minimum clean

# `make run` installs what photo prediction needs (ONNX Runtime and YuNet: no TensorFlow, no OpenCV);
# `make test` and `make demo` add every extra and the development tools to the same .venv.
$(VENV)/.installed-predict: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-all: pyproject.toml
	$(PYTHON) -m venv $(VENV)
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
	$(PYTHON) -m venv $(VENV)-minimum
	$(VENV)-minimum/bin/pip install --quiet uv
	$(VENV)-minimum/bin/uv pip install --quiet --python $(VENV)-minimum/bin/python --resolution lowest-direct -e ".[evaluate,video,train,serve,heic,dev]"
	touch $@

test-minimum: $(VENV)-minimum/.installed
	$(VENV)-minimum/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VENV)-minimum runs build src/*.egg-info .pytest_cache
