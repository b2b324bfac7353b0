"""benchmarks/throughput.py: the two training variants compute the same thing, and --quick writes its report."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def tp():
    return load_benchmark("throughput")


@pytest.fixture(scope="module")
def tiny_setup(tp, tiny_world):
    unet, sched, length = tp.build_unet("world", str(tiny_world / "sd"), torch.float32, "cpu", seed=0)
    batch = tp.make_pairs(unet, sched, length, unet.config.sample_size, batch=3, n_batches=1, seed=0)[0]
    reference = copy.deepcopy(unet).eval()
    tp.add_lora(unet, seed=0)
    return unet, reference, sched, batch


def test_ours_and_straightforward_give_the_same_loss_and_lora_gradients(tp, tiny_setup):
    unet, reference, sched, batch = tiny_setup
    report = tp.check_equivalence(unet, reference, sched, batch, "cpu", seed=0)
    # the LoRA was moved off its init far enough that the loss is not log 2 and nothing is clipped
    assert 0.01 <= report["log_ratio_abs_max"] <= 0.09
    assert report["clipped_fraction"] == 0
    assert abs(report["loss_ours"] - torch.log(torch.tensor(2.0)).item()) > 1e-4
    assert report["loss_rel_diff"] < 1e-5
    assert report["grad_nonzero"] == report["grad_numel"] > 0
    assert report["grad_rel_diff"] < 1e-4
    assert report["grad_max_abs_diff"] <= 1e-4 * report["grad_max_abs"]
    # 3 pairs: ours = 2 CFG-doubled calls (6 rows each), straightforward = 4
    assert report["unet_calls"] == {"ours": 2, "straightforward": 4}
    assert report["unet_rows"] == {"ours": 12, "straightforward": 24}


def test_the_equivalence_check_detects_a_wrong_reference(tp, tiny_setup):
    unet, reference, sched, batch = tiny_setup
    pairs, cond, uncond = tp.to_pairs(batch, "cpu", torch.float32)
    with torch.no_grad():
        good = tp.ours_loss(unet, sched, pairs, cond, uncond).item()
        straight = tp.straightforward_loss(unet, reference, sched, pairs, cond, uncond).item()
        assert straight == pytest.approx(good, rel=1e-5)
        # the policy as its own reference: every ratio is 1 and the loss is log 2
        wrong = tp.straightforward_loss(unet, unet, sched, pairs, cond, uncond).item()
    assert wrong == pytest.approx(0.693147, abs=1e-5)
    assert abs(wrong - good) > 1e-4


def test_quick_mode_writes_the_report_with_two_versus_four_unet_calls(tiny_world, tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--world", str(tiny_world / "sd"), "--batch", "2", "--iters", "1",
         "--warmup", "0", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for suffix in ("md", "png", "json"):
        assert (out / f"throughput.{suffix}").stat().st_size > 0
    assert not list(out.glob("*.tmp*"))
    results = json.loads((out / "throughput.json").read_text())
    assert list(results["models"]) == ["world"]  # --quick leaves the SD1.5-size UNet out
    world = results["models"]["world"]
    for variant, calls in (("ours", 2), ("straightforward", 4)):
        (run,) = world["runs"][variant]
        assert run["steps"] == 1 and run["pairs_per_step"] == 2
        assert run["unet_calls"] == calls  # per pair batch, each call on the CFG-doubled batch
        assert run["unet_rows"] == 2 * calls * 2
        assert run["pairs_per_s"] > 0
    assert world["runs"]["ours"][0]["reference_bytes"] == 0
    assert world["runs"]["straightforward"][0]["reference_bytes"] > 0
    text = (out / "throughput.md").read_text()
    assert "| world | 16x16 | 2 | ours |" in text and "| 2 (4) |" in text and "| 4 (8) |" in text
    assert "--quick" in text and "seed 0" in text and "1 repeat per variant" in text
