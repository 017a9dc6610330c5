# Two entry points for a fresh Debian/Ubuntu machine with Python 3.11:
#   make demo   create .venv, install, then train -> export -> sample on the bundled radiographs,
#               and sample the committed demo model (models/tiny-demo) beside it
#   make test   create .venv, install, run the test suite
# and the recipes of the committed models (CPU, tens of minutes each on 2 cores):
#   make pretrained         models/tiny-demo (+ docs/samples.png, docs/training-steps.png)
#   make pretrained-t1000   models/tiny-t1000 (the T = 1000 model of the sampler accuracy bench)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := runs/demo
# held-out patients for the data-copying test: not bundled (docs/make_heldout.py builds it from a public
# collection, into data/cxr-heldout; a shared copy beside the checkout is used when present; or
# `make demo HELDOUT=DIR`); without it `cxr-runtime eval` runs everything but that test
HELDOUT ?= $(firstword $(wildcard data/cxr-heldout ../shared/data/cxr-heldout))
HELDOUT_FLAG = $(if $(wildcard $(HELDOUT)/*.jpg),--heldout $(HELDOUT))
# the demo's own short run, chosen by measurement (README, "The demo model"): 500 steps of 16 images
# at lr 1e-3 with a short EMA (0.99) reach radiographs; tiny.yaml's 200 x 8 at 2e-4 left texture
DEMO_FIT := --set train.steps=500 --set train.micro_batch=16 --set train.lr=0.001 --set train.warmup_steps=25 \
            --set train.ema_decay=0.99 --set train.save_every=500 --set train.sample_every=0
# the demo model: configs/tiny.yaml, 16 images a step, one thread (as it was made); its step chosen on
# docs/training-steps.png
PRETRAINED      := models/tiny-demo
PRETRAINED_RUN  := runs/pretrained
PRETRAINED_STEP := 00002000
PRETRAINED_FIT  := --set train.micro_batch=16 --set train.save_every=250 --set train.sample_every=500
T1000           := models/tiny-t1000
T1000_RUN       := runs/pretrained-t1000

.PHONY: install demo test clean pretrained pretrained-t1000

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cxr-train check-data data/cxr-sample
	OMP_NUM_THREADS=2 $(BIN)/cxr-train fit --config configs/tiny.yaml --data data/cxr-sample \
	    --out $(DEMO) $(DEMO_FIT)
	$(BIN)/cxr-export onnx --ckpt $(DEMO) --out $(DEMO)/tiny.onnx
	$(BIN)/cxr-runtime sample --engine $(DEMO)/tiny.onnx -n 64 --sampler dpmpp-2m --steps 20 \
	    --out $(DEMO)/samples --grid $(DEMO)/samples-grid.png
	$(BIN)/cxr-runtime sample --engine $(PRETRAINED)/tiny-demo.onnx -n 64 --sampler dpmpp-2m --steps 20 \
	    --out $(DEMO)/pretrained-samples --grid $(DEMO)/pretrained-grid.png
	$(BIN)/cxr-runtime eval data/cxr-sample $(DEMO)/samples $(HELDOUT_FLAG)
	$(BIN)/cxr-runtime eval data/cxr-sample $(DEMO)/pretrained-samples $(HELDOUT_FLAG)
	@$(BIN)/python docs/demo_report.py "this run=$(DEMO)/samples" "committed model=$(DEMO)/pretrained-samples"
	@echo "demo done: $(DEMO)/samples-grid.png from the model trained just now ($(DEMO)/tiny.onnx), "
	@echo "  $(DEMO)/pretrained-grid.png from the committed demo model ($(PRETRAINED)/tiny-demo.onnx, see its README)"

# The committed demo model, rebuilt: 3000 steps (every 250th checkpoint kept, for the step figure),
# step $(PRETRAINED_STEP) exported; its log, config, samples and eval report beside it.
pretrained: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/cxr-train fit --config configs/tiny.yaml --data data/cxr-sample \
	    --out $(PRETRAINED_RUN) --set train.steps=3000 --set train.keep_last=12 $(PRETRAINED_FIT)
	mkdir -p $(PRETRAINED)
	$(BIN)/cxr-export onnx --ckpt $(PRETRAINED_RUN)/checkpoints/step_$(PRETRAINED_STEP).safetensors \
	    --out $(PRETRAINED)/tiny-demo.onnx
	cp $(PRETRAINED_RUN)/config.yaml $(PRETRAINED_RUN)/log.csv $(PRETRAINED)/
	$(BIN)/cxr-runtime sample --engine $(PRETRAINED)/tiny-demo.onnx -n 64 --sampler dpmpp-2m --steps 20 \
	    --out $(PRETRAINED_RUN)/samples --grid $(PRETRAINED)/samples-grid.png
	$(BIN)/cxr-runtime eval data/cxr-sample $(PRETRAINED_RUN)/samples $(HELDOUT_FLAG) --out $(PRETRAINED)/eval
	$(BIN)/python docs/make_figure.py samples --engine $(PRETRAINED)/tiny-demo.onnx
	$(BIN)/python docs/make_figure.py steps --run $(PRETRAINED_RUN) --heldout $(HELDOUT) --show 250 500 750 1000 1500 2000 2500 3000 \
	    --mark $(PRETRAINED_STEP)
	cp $(PRETRAINED_RUN)/steps/series.json $(PRETRAINED)/steps.json

# The T = 1000 variant (same recipe) that the sampler accuracy bench measures beside the demo model.
pretrained-t1000: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/cxr-train fit --config configs/tiny.yaml --data data/cxr-sample \
	    --out $(T1000_RUN) --set diffusion.timesteps=1000 --set train.steps=2000 --set train.micro_batch=16 \
	    --set train.save_every=500 --set train.sample_every=0
	mkdir -p $(T1000)
	$(BIN)/cxr-export onnx --ckpt $(T1000_RUN) --out $(T1000)/tiny-t1000.onnx
	cp $(T1000_RUN)/config.yaml $(T1000_RUN)/log.csv $(T1000)/

test: $(STAMP)
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q

# make gpu-check [OUT=folder]: what a GPU machine must verify, one report OUT/gpu-check.{json,md}
# (bench/gpu_check.py). Installs nothing: the packages are there before it (bench/gpu_check_device.sh).
.PHONY: gpu-check
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m bench gpu-check $(if $(OUT),--out $(OUT))

clean:
	rm -rf $(VENV) runs .pytest_cache
