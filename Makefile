# Two entry points for a fresh Debian/Ubuntu machine with Python 3.11:
#   make demo   create .venv, install, then train -> export -> sample on the bundled radiographs
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := runs/demo

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cxr-train check-data data/cxr-sample
	OMP_NUM_THREADS=2 $(BIN)/cxr-train fit --config configs/tiny.yaml --data data/cxr-sample \
	    --out $(DEMO) --set train.steps=200 --set train.sample_every=100
	$(BIN)/cxr-export onnx --ckpt $(DEMO) --out $(DEMO)/tiny.onnx
	$(BIN)/cxr-runtime sample --engine $(DEMO)/tiny.onnx -n 16 --sampler dpmpp-2m --steps 20 \
	    --out $(DEMO)/samples --grid $(DEMO)/samples-grid.png
	@echo "demo done: see $(DEMO)/ (loss log, training grids, checkpoint, tiny.onnx, samples-grid.png)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
