"""benchmarks/epoch_vs_authors.py: the authors' epoch structure samples the same pairs and computes the same loss as
ours, does the work its structure implies (4 UNet calls per minibatch, a deep-copied reference), and --quick writes
its report."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "epoch_vs_authors.py"
# --quick: one round of B prompts, N DDIM steps diverted from D, K candidates, threshold 0, training batch T
B, N, D, K, T, INNER = 2, 6, 2, 4, 4, 2


@pytest.fixture(scope="module")
def eva():
    return load_benchmark("epoch_vs_authors")


def test_the_authors_pair_rule_is_our_pair_gap(eva):
    from spo.resampler import pair_gap

    scores = torch.randn(K, 50, generator=torch.Generator().manual_seed(0)) * 0.4  # their (K, b) layout
    best, worst, gap, valid = eva._keep(scores, 0.3)
    assert torch.equal(best, scores.argmax(0)) and torch.equal(worst, scores.argmin(0))
    assert torch.allclose(gap, pair_gap(scores.T), atol=1e-6)
    assert torch.equal(valid, gap > 0.3) and 0 < int(valid.sum()) < 50


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("epoch_vs_authors")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list(out.glob("*.tmp*"))
    return json.loads((out / "epoch_vs_authors.json").read_text()), (out / "epoch_vs_authors.md").read_text()


def test_the_authors_structure_samples_the_same_pairs_and_computes_the_same_loss(report):
    r, _ = report
    v = r["verify"]
    assert v["ok"]
    s = v["sampling"]
    assert s["pairs_ours"] == s["pairs_authors"] == s["matched"] == B * (N - D)  # threshold 0: every set a pair
    assert s["latent_max_abs_diff"] < 1e-5 and s["score_max_abs_diff"] < 1e-4 and s["timesteps_equal"]
    loss = v["loss"]
    assert 0.005 < loss["log_ratio_abs_max"] < 0.1 and loss["clipped_fraction"] == 0  # a real, unclipped gradient
    assert loss["grad_nonzero"] == loss["grad_numel"] > 0
    for name in ("authors", "throughput_4call"):
        assert loss[f"loss_rel_diff_{name}"] < 1e-5 and loss[f"grad_rel_diff_{name}"] < 1e-4


def test_each_variant_does_the_work_its_structure_implies(report):
    r, _ = report
    runs = r["runs"]
    assert {v: len(x) for v, x in runs.items()} == {"ours": 1, "authors": 1, "ours_latent": 1, "ours_x0_latent": 1,
                                                    "ours_x0_onpolicy": 1, "ours_tiny_decoder": 1}
    ours, authors, latent = runs["ours"][0], runs["authors"][0], runs["ours_latent"][0]
    pairs = B * (N - D)
    passes = INNER * pairs  # pairs seen in training, CFG doubles each row
    sampling_pixel = 2 * B * (D + 1) + 2 * B * K * (N - D - 1)  # plain steps on b rows, then scoring calls on b*K
    sampling_latent = 2 * B * (D + 1) + 2 * B * (N - D - 1)  # the latent judge: the next call on the chosen rows only
    for run in (ours, authors, latent):
        assert run["pairs_sampled"] == run["pairs_trained"] == pairs
        assert run["optimizer_steps"] == INNER * math.ceil(pairs / T)
        assert run["judge_rows"] == B * K * (N - D)
        assert run["epoch_seconds"] > 0 and run["sampling_seconds"] > 0 and run["training_seconds"] > 0
        assert run["epoch_seconds"] == pytest.approx(run["sampling_seconds"] + run["training_seconds"], abs=0.25)
        assert run["peak_over_baseline_bytes"] > 0
    # ours: one policy call (graph) + one reference call (adapters off) per minibatch; authors: two of each
    assert (ours["unet_rows_graph"], ours["unet_rows_no_graph"]) == (2 * passes, sampling_pixel + 2 * passes)
    assert (authors["unet_rows_graph"], authors["unet_rows_no_graph"]) == (4 * passes, sampling_pixel + 4 * passes)
    assert (latent["unet_rows_graph"], latent["unet_rows_no_graph"]) == (2 * passes, sampling_latent + 2 * passes)
    assert ours["decoded_images"] == authors["decoded_images"] == B * K * (N - D) and latent["decoded_images"] == 0
    assert authors["reference_bytes"] > 0 and ours["reference_bytes"] == latent["reference_bytes"] == 0
    x0, tiny = runs["ours_x0_latent"][0], runs["ours_tiny_decoder"][0]  # the scoring call stays in both
    assert x0["unet_rows_no_graph"] == tiny["unet_rows_no_graph"] == ours["unet_rows_no_graph"]
    for x0 in (runs["ours_x0_latent"][0], runs["ours_x0_onpolicy"][0]):
        assert x0["decoded_images"] == 0 and x0["judge_rows"] == B * K * (N - D)
    # same LoRA init, same pairs, same minibatches: the two pixel-judge epochs train alike
    assert ours["lora_fingerprint"] == authors["lora_fingerprint"]
    assert ours["loss"] == pytest.approx(authors["loss"], rel=1e-4)


def test_the_report_gives_ratios_the_copied_structure_and_the_run(report):
    r, text = report
    for key in ("ours/authors", "ours_latent/authors", "ours_x0_latent/authors", "ours_x0_onpolicy/authors",
                "ours_tiny_decoder/authors"):
        for phase in ("epoch_seconds", "sampling_seconds", "training_seconds"):
            rat = r["ratios"][key][phase]
            assert 0 < rat["min"] <= rat["median"] <= rat["max"]
    a, o = r["runs"]["authors"][0], r["runs"]["ours"][0]
    assert r["ratios"]["ours/authors"]["epoch_seconds"]["median"] == pytest.approx(
        o["epoch_seconds"] / a["epoch_seconds"])
    m = r["machine"]
    assert m["torch_threads"] == 1 and m["torch"] == torch.__version__ and len(m["load_average_before"]) == 3
    assert r["config"]["num_steps"] == N and r["config"]["prompts_per_round"] == B and r["quick"]
    assert "--quick" in r["command"] and "OMP_NUM_THREADS=1" in r["command"]
    for needle in ("## What the re-implementation copies from the authors' structure", "train_spo.py",
                   "multi_sample_pipeline.py", "ddim_with_logprob.py", "compare_funcs.py",
                   "| ours (pixel SPM) |", "| authors' structure (pixel SPM) |", "| ours, model.judge=latent (noisy latents",
                   "| ours_latent/authors |", "not for quoting", "## Run"):
        assert needle in text, needle
