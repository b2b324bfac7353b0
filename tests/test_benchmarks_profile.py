"""benchmarks/epoch_profile.py: the components of one SPO epoch add up to it, and every one the epoch uses is counted."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "epoch_profile.py"

# a seconds-long epoch on the tiny world: one round of B prompts, N steps diverted from D, K candidates
B, N, D, K, TRAIN_BATCH = 2, 4, 1, 4, 2


@pytest.fixture(scope="module")
def prof():
    return load_benchmark("epoch_profile")


def test_nested_timers_count_only_their_own_time(prof):
    p = prof.Profiler()
    inner = p.wrap(lambda: time.sleep(0.03), "inner")
    outer = p.wrap(lambda: (time.sleep(0.02), inner()), "outer")
    outer()
    assert p.wall["inner"] == pytest.approx(0.03, abs=0.015)
    assert p.wall["outer"] == pytest.approx(0.02, abs=0.015)  # not 0.05: the inner timer's time is subtracted
    assert dict(p.calls) == {"inner": 1, "outer": 1}


@pytest.fixture(scope="module")
def report(tiny_world, tiny_spm, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--setting", "world", "--device", "cpu", "--pretrained", str(tiny_world / "sd"),
         "--spm", str(tiny_spm), "--out", str(out), "--override", f"sample.num_steps={N}",
         f"sample.divert_start_step={D}", f"sample.batch_size={B}", f"sample.num_candidates={K}",
         "sample.threshold=0", f"train.batch_size={TRAIN_BATCH}"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "profile_world.json").read_text()), (out / "profile.md").read_text()


def test_components_add_up_to_the_epoch(report):
    r, _ = report
    c, epoch = r["components"], r["epoch_seconds"]
    assert "unattributed_network" not in c  # every network call had a known call site
    measured = sum(v["seconds"] for name, v in c.items() if name != "other")
    assert measured <= epoch + 1e-3  # exclusive timers: nothing counted twice
    assert 0 <= c["other"]["seconds"] < 0.25 * epoch  # and the timers cover the epoch
    assert sum(v["seconds"] for v in c.values()) == pytest.approx(epoch, abs=2e-3 * len(c))
    assert sum(v["share"] for v in c.values()) == pytest.approx(1, abs=1e-3 * len(c))
    # the sampling phase by these timers agrees with the SPO method's own clock around sample + pool
    assert r["phases"]["sampling"] == pytest.approx(r["method_seconds"]["sample"], rel=0.1, abs=0.05)


def test_every_component_the_epoch_uses_is_counted(report):
    r, _ = report
    c = r["components"]
    pairs = B * (N - D)  # threshold 0: every diverted step of every prompt gives a pair
    assert r["pairs_sampled"] == r["pairs_trained"] == pairs
    minibatches = 2 * math.ceil(pairs / TRAIN_BATCH)  # configs/world.yaml: inner_epochs 2
    expected = {  # (calls, rows) from the resampler's and the trainer's structure, not from the profiler
        "sampling_network": (D + 1, B * 2 * (D + 1)),  # x_T's call, then one per plain step; CFG doubles rows
        "scoring_network": (N - D - 1, B * K * 2 * (N - D - 1)),  # the last step's candidates are final latents
        "vae_decode": (N - D, B * K * (N - D)),
        "judge_image": (N - D, B * K * (N - D)),
        "judge_text": (N - D, B * K * (N - D)),
        "judge_other": (N - D, B * K * (N - D)),
        "text_encoding_sampling": (1, B),
        "text_encoding_training": (minibatches, 2 * pairs),
        "data_to_device": (minibatches, 2 * pairs),
        "train_reference_forward": (minibatches, 2 * 2 * pairs),
        "train_policy_forward": (minibatches, 2 * 2 * pairs),
        "train_backward": (minibatches, 0),
        "optimizer_step": (minibatches, 0),
    }
    for name, (calls, rows) in expected.items():
        assert (c[name]["calls"], c[name]["rows"]) == (calls, rows), name
        assert c[name]["seconds"] > 0, name
    assert r["diverted_steps"] == N - D and r["candidate_images"] == B * K * (N - D)
    # the trainer's forward hooks on the network saw exactly the rows the timers saw
    rows = r["network_rows"]
    assert (rows["timed_no_grad"], rows["timed_grad"]) == (rows["hooks_no_grad"], rows["hooks_grad"])
    assert rows["timed_no_grad"] == sum(expected[n][1] for n in ("sampling_network", "scoring_network",
                                                                  "train_reference_forward"))


def test_the_report_states_machine_command_and_threads(report):
    r, text = report
    assert r["machine"]["threads"] == 1 and r["machine"]["device"] == "cpu"
    assert "**1 torch thread(s)**" in text and "--setting world" in text
    for name in ("scoring_network", "vae_decode", "judge_image", "text_encoding_training", "other"):
        assert f"| {name} |" in text
    assert "Per diverted step" in text
