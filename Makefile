# Two commands do all the set-up on a fresh machine:  `make compare`  and  `make test`.
PYTHON ?= python3
# torch first: a bare `torch` requirement would pull the CUDA build and several GB of packages
TORCH_VERSION ?= 2.13.0
DEMO_DIR ?= runs/demo
COMPARE_DIR ?= runs/compare
SCALING_DIR ?= runs/scaling
RECALL_DIR ?= runs/recall

.PHONY: install compare scaling demo test test-slow bench recall gpu-check clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==$(TORCH_VERSION)"
	@$(PYTHON) -m pip install -q -e ".[test,hf,tasks,sweep,eval]"

# The main job: one representative of every family trained on Python's own stdlib sources for
# the same training FLOPs, then validation loss, associative recall (MQAR), speed and cache size
# side by side in $(COMPARE_DIR)/report.md (about 7 minutes on 2 CPU cores of an AMD EPYC).
compare: install
	$(PYTHON) -m speedlm compare --out $(COMPARE_DIR)

# A scaling study: four families at four budgets, two seeds each, the first model sized for 20
# tokens per parameter at each budget; means with 95% intervals, a fitted L = E + A C^-alpha per
# model and its prediction at 1e13 FLOPs, in $(SCALING_DIR)/sweep.md (about 19 minutes on 2 CPU cores).
scaling: install
	$(PYTHON) -m speedlm compare --presets transformer-tiny,sliding-window-tiny,hgrn-tiny,mamba2-tiny \
		--budgets 2.5e11,5e11,1e12,2e12 --seeds 2 --no-mqar --contexts 1024,4096 --target-budget 1e13 --out $(SCALING_DIR)

# Train a tiny model on the embedded corpus (Python's own stdlib sources) for a few minutes,
# evaluate it, and generate from it through the KV cache. Each run starts a fresh $(DEMO_DIR).
demo: install
	rm -rf $(DEMO_DIR)
	$(PYTHON) -m speedlm train --preset transformer-tiny --steps 2000 --batch-size 16 --seq-len 256 \
		--eval-every 500 --save-every 1000 --out $(DEMO_DIR)
	$(PYTHON) -m speedlm eval --checkpoint $(DEMO_DIR)
	$(PYTHON) -m speedlm generate --checkpoint $(DEMO_DIR) --prompt "def main(" --max-new-tokens 200 --temperature 0.8 --top-k 40 --seed 0

test: install
	$(PYTHON) -m pytest -n 2 -q

test-slow: install
	$(PYTHON) -m pytest -n 2 -q -m slow

bench: install
	$(PYTHON) -m speedlm bench speed --presets transformer-tiny,sliding-window-tiny,linear-attention-tiny \
		--lengths 128,256,512,1024,2048

# Associative recall by Zoology's protocol: eight architectures x widths 48, 64, the best of two
# learning rates, accuracy against state size in $(RECALL_DIR)/bench_recall.md and .png
# (25 minutes on 2 CPU cores of an AMD EPYC).
recall: install
	$(PYTHON) -m speedlm bench recall --workers 2 --out $(RECALL_DIR)

# On a GPU machine (10 minutes on one H100): tests/gpu (every CUDA backend against its float64
# reference), bench speed --device cuda on one base preset per family to 16k, and the GPU section
# of BENCHMARKS.md rewritten with the numbers (src/speedlm/bench/gpu_check.py).
gpu-check: install
	$(PYTHON) -m speedlm.bench.gpu_check

clean:
	rm -rf runs .pytest_cache
