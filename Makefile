# Two commands: `make demo` and `make test`. Each sets up .venv by itself on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned only so that set-up is reproducible; any torch>=2.4 works (override: make TORCH=torch).
TORCH ?= torch==2.13.0

.PHONY: setup demo test world latent-judge-onpolicy clean

$(BIN)/spo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(BIN)/spo

setup: $(BIN)/spo

demo: setup
	$(BIN)/spo demo --out runs/demo --overwrite

test: setup
	$(BIN)/python -m pytest -q

# Rebuild every embedded-world artifact from its seed (about 45 min on 2 CPU cores).
world: setup
	$(BIN)/spo world build --out src/spo/assets/world --force

# Rebuild world:latent_judge_onpolicy (about 30 min on 2 CPU cores): three SPO runs tuned with
# world:latent_judge_distilled (round 1), then a judge distilled on the base model's and those policies' candidate
# sets (configs/latent_judge_onpolicy_world.yaml); copy runs/latent-judge-onpolicy-world/latent_judge to ship it.
latent-judge-onpolicy: setup
	for s in 0 1 2; do $(BIN)/spo train --config world model.judge=latent \
	  model.latent_judge=world:latent_judge_distilled train.seed=$$s train.num_epochs=10 \
	  log.output_dir=runs/latent-judge-round1/seed$$s log.report_to=none --overwrite || exit 1; done
	$(BIN)/spo train-latent-judge --config latent_judge_onpolicy_world --overwrite

clean:
	rm -rf $(VENV) runs .pytest_cache
