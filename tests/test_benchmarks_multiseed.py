"""The multi-seed benchmark's quick mode runs end to end, and its seed-and-prompt CI behaves."""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import multiseed  # noqa: E402


def test_two_level_ci_is_wider_when_seeds_disagree():
    rng = np.random.default_rng(0)
    agree = 0.05 + 0.01 * rng.standard_normal((3, 64))
    disagree = agree + np.array([[-0.1], [0.0], [0.1]])  # same prompt noise, seed-level spread added
    lo_a, hi_a = multiseed.seeds_and_prompts_ci(agree)
    lo_d, hi_d = multiseed.seeds_and_prompts_ci(disagree)
    assert lo_a < 0.05 < hi_a and (hi_d - lo_d) > 5 * (hi_a - lo_a)


def test_quick_mode_writes_results(tmp_path):
    multiseed.main(["--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    data = json.loads((tmp_path / "out" / "multiseed_quick.json").read_text())
    assert [r["row"] for r in data["summary"]] == ["spo", "kway-rule"]
    assert all(r["seeds"] == 2 and len(r["per_seed_gain"]) == 2 for r in data["summary"])
    assert len((tmp_path / "out" / "multiseed_quick_runs.jsonl").read_text().splitlines()) == 4
    rel = multiseed.main(["--relative-from", str(tmp_path / "out" / "multiseed_quick_runs.jsonl"),
                          "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "multiseed_quick_runs_vs_spo.md").read_text().count("| kway-rule |") == 1
    assert rel["meta"]["seeds"] == 2


def test_the_flow_recipe_trains_and_judges_the_flow_model(tmp_path):
    """--recipe flow_world.yaml: every row trains world:sd3 and its images come from world:sd3 (a LoRA of the
    SD world applied there is refused, so a mix-up fails here); the trajectory-level row runs."""
    multiseed.main(["--quick", "--recipe", "flow_world.yaml", "--rows", "spo,trajectory", "--every",
                    "1", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    data = json.loads((tmp_path / "out" / "multiseed_quick_flow_world.json").read_text())
    assert data["meta"]["recipe"] == "flow_world.yaml"
    assert [r["row"] for r in data["summary"]] == ["spo", "trajectory"]
    assert [c["epoch"] for c in data["summary"][0]["curve"]] == [1, 2]  # the snapshot was judged on world:sd3 too
    for lora in (tmp_path / "work").glob("*/**/spo_lora.json"):
        assert json.loads(lora.read_text())["family"] == "sd3", lora
