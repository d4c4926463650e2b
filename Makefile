# SAMTok monorepo. `make demo` and `make test` do all set-up on a fresh clone.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SAMTOK := $(VENV)/bin/samtok
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

# torch must come from the CPU wheel on this machine; the constraints file is inherited by
# pip's build subprocesses only through the environment.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Nothing in this project may reach a model hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

# Artefacts of each stage of the embedded default (built on demand by later stages).
SYNTH_OUT  := runs/synth
SYNTH_DONE := $(SYNTH_OUT)/DONE
TOK_DONE   := runs/tokenizer/final/model.safetensors
PRETOK_DONE:= runs/pretok/DONE
SFT_DONE   := runs/sft/final/DONE
RL_DONE    := runs/rl/final/DONE

.PHONY: help install install-browser test test-fast demo synth train-tokenizer pretokenize pretrain sft vision-check binding-check rl eval serve bench tensorboard clean distclean

help:
	@echo "make demo             install if needed, then run the whole pipeline on the embedded synthetic default"
	@echo "make test             install if needed, then run the test suite (CI runs this)"
	@echo "make install          create .venv/ and install samtok (editable) with its test extras"
	@echo "make synth            generate the synthetic data set into $(SYNTH_OUT)/ (+ preview.png)"
	@echo "make train-tokenizer  train the mask tokenizer (configs/tokenizer/tiny.yaml) -> runs/tokenizer/final/"
	@echo "make pretokenize      turn every synthetic mask into its two codes -> runs/pretok/"
	@echo "make pretrain         optional grounding pretraining of the tiny VLM -> runs/pretrain/final/ (sft: init_from=...)"
	@echo "make sft              supervised fine-tuning of the tiny QwenVL-SAMTok -> runs/sft/final/"
	@echo "make vision-check     does the image reach the tiny model? image-only questions vs the best constant answer"
	@echo "make binding-check    does it find the object a colour word names among 2-3? vs a random object (~13 min)"
	@echo "make rl               GRPO from runs/sft/final/ -> runs/rl/final/"
	@echo "make eval             evaluate tokenizer, SFT and RL models -> runs/eval/summary.md"
	@echo "make serve            the web demo (Tokenize, Detokenize, Chat) on http://127.0.0.1:7860/"
	@echo "make bench            run the benchmarks under bench/ and refresh docs/benchmarks.md"
	@echo "make tensorboard      TensorBoard on runs/"
	@echo "make clean            remove runs/ and caches (keeps .venv/); make distclean also removes .venv/"
	@echo "Extra arguments for a stage: make sft ARGS='trainer.max_steps=100'"

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q setuptools wheel torch==2.13.0
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q --no-deps --no-build-isolation sam2==1.1.0
	$(PY) -m pip install -q -e '.[test,serve]'
	@$(MAKE) --no-print-directory install-browser
	@touch $@

install: $(STAMP)

# Debian's Chromium for the browser tests (Playwright drives it; nothing is downloaded by Playwright).
install-browser:
	@if [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1; then \
	  echo "chromium: $$(chromium --version 2>/dev/null | head -n 1)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the browser tests (apt-get)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	    || echo "warning: apt-get could not install chromium: the browser tests will be skipped"; \
	else \
	  echo "note: chromium is not installed and apt-get is not usable here (it needs root): the browser tests will be skipped; install Debian's chromium (apt-get install chromium) or set SAMTOK_CHROMIUM to run them"; \
	fi

test: install
	$(PY) -m pytest $(if $(filter true,$(CI)),-m "not gpu",) $(ARGS)

demo: install
	$(SAMTOK) demo $(ARGS)

synth: install
	$(SAMTOK) synth --config configs/synth/default.yaml out_dir=$(SYNTH_OUT) preview=true $(ARGS)
$(SYNTH_DONE):
	$(MAKE) synth

train-tokenizer: install | $(SYNTH_DONE)
	$(SAMTOK) train-tokenizer --config configs/tokenizer/tiny.yaml $(ARGS)
$(TOK_DONE):
	$(MAKE) train-tokenizer

pretokenize: install | $(SYNTH_DONE) $(TOK_DONE)
	$(SAMTOK) pretokenize --tokenizer runs/tokenizer/final --data configs/data/synth_mixture.yaml --out runs/pretok $(ARGS)
$(PRETOK_DONE):
	$(MAKE) pretokenize

# Optional: SFT continues from it with `make sft ARGS='init_from=runs/pretrain/final'` (docs/sft.md).
pretrain: install | $(PRETOK_DONE)
	$(SAMTOK) pretrain --config configs/scene_qa/pretrain.yaml $(ARGS)

sft: install | $(PRETOK_DONE)
	$(SAMTOK) sft --config configs/sft/tiny.yaml $(ARGS)
$(SFT_DONE):
	$(MAKE) sft

rl: install | $(SFT_DONE)
	$(SAMTOK) rl --config configs/rl/tiny.yaml $(ARGS)
$(RL_DONE):
	$(MAKE) rl

eval: install | $(TOK_DONE) $(SFT_DONE) $(RL_DONE)
	$(SAMTOK) eval --config configs/eval/tiny.yaml $(ARGS)

vision-check: install
	$(SAMTOK) vision-check --config configs/scene_qa/vision_check.yaml $(ARGS)

# Can the tiny model find THE object a phrase names among several? (~13 min; docs/sft.md)
binding-check: install
	$(SAMTOK) vision-check --config configs/scene_qa/binding.yaml $(ARGS)

serve: install
	$(SAMTOK) serve $(ARGS)

bench: install
	$(PY) bench/run_all.py $(ARGS)

tensorboard: install
	$(VENV)/bin/tensorboard --logdir runs --bind_all

clean:
	rm -rf runs .pytest_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
