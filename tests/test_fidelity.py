"""The paper's algorithm as the authors run it: pair selection, on-policy rounds, prompt passes, resume."""

import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import assert_same_run, tiny_spo_args
from spo.config import SPOConfig, load_config
from spo.methods.spo import epoch_prompts
from spo.resampler import pair_gap
from spo.trainer import Trainer


# ------------------------------------------------------------------ pair selection, hand-worked


@pytest.mark.parametrize("scores, best_worst, kway", [
    # K = 2: both rules are the 2-way softmax gap, tanh(Δs/2)
    ([1.0, 0.0], math.tanh(0.5), math.tanh(0.5)),
    # K = 4, spread 0.5: best vs worst keeps it at threshold 0.2 (0.2449); the K-way softmax does not (0.1201)
    ([0.5, 0.0, 0.25, 0.25], math.tanh(0.25),
     (math.exp(0.5) - 1) / (math.exp(0.5) + 1 + 2 * math.exp(0.25))),
    # K = 8: the K-way gap shrinks with K, the authors' rule does not
    ([2.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], math.tanh(1.0),
     (math.exp(2) - 1) / (math.exp(2) + 1 + 6 * math.e)),
])
def test_pair_gap_by_hand(scores, best_worst, kway):
    s = torch.tensor([scores])
    assert pair_gap(s, "best_worst").item() == pytest.approx(best_worst, rel=1e-6)
    assert pair_gap(s, "kway").item() == pytest.approx(kway, rel=1e-6)
    assert pair_gap(s.flip(-1), "best_worst").item() == pytest.approx(best_worst, rel=1e-6)  # order-free


def test_threshold_0_3_keeps_score_gaps_above_0_62_under_the_authors_rule():
    gaps = torch.tensor([[0.61, 0.0], [0.63, 0.0]])
    assert (pair_gap(gaps) > 0.3).tolist() == [False, True]  # 2·atanh(0.3) = 0.6190


# ------------------------------------------------------------------ prompts: shuffled passes


def test_epochs_walk_shuffled_passes_without_replacement():
    n, per = 10, 4
    seen = [epoch_prompts(n, per, e, seed=0) for e in range(5)]  # 20 draws = 2 whole passes
    flat = sum(seen, [])
    assert all(len(s) == per for s in seen)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # each pass is shuffled afresh
    assert epoch_prompts(n, n, 0, seed=0) == flat[:10]


def test_rounds_of_one_epoch_give_disjoint_prompt_shards_to_the_processes(tiny_world, tiny_spm, tmp_path):
    cfg = load_config(SPOConfig, None, tiny_spo_args(tiny_world, tiny_spm, tmp_path / "r", "sample.batches_per_epoch=0",
                                                      "sample.batch_size=3"))
    from spo.methods.spo import SPO

    m = SPO(cfg)
    m.prompts = [f"p{i}" for i in range(20)]
    assert m.rounds_per_epoch(2) == 3  # 20 prompts // (3 per process x 2 processes)
    shards = [[p for r in range(3) for p in m.round_prompts(0, r, rank, 2)] for rank in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and len(set(shards[0]) | set(shards[1])) == 18


# ------------------------------------------------------------------ on-policy, mid-epoch checkpoints


def _trainer(world, spm, out, *extra, **kw):
    cfg = load_config(SPOConfig, None, tiny_spo_args(world, spm, out, *extra))
    return Trainer(cfg, log=lambda m: None, **kw).setup()


def _die_after(run, checkpoint: str) -> None:
    """Throw away everything a finished run wrote after `checkpoint`, as if it had died right there."""
    import shutil

    for p in (run / "checkpoints").iterdir():
        if p.name != checkpoint:
            shutil.rmtree(p)
    shutil.rmtree(run / "lora")
    (run / "metrics.jsonl").unlink()


def test_each_round_samples_with_the_policy_updated_by_the_previous_round(tiny_world, tiny_spm, tmp_path, monkeypatch):
    tr = _trainer(tiny_world, tiny_spm, tmp_path / "r", "sample.batches_per_epoch=3", "train.num_epochs=1")
    seen = []
    real = tr.method.sample

    def spy(trainer, epoch, rnd=0):
        seen.append((rnd, trainer.global_step, [p.detach().clone() for p in trainer.trainable]))
        return real(trainer, epoch, rnd)

    monkeypatch.setattr(tr.method, "sample", spy)
    tr.train()
    assert [r for r, _, _ in seen] == [0, 1, 2]
    assert seen[0][1] < seen[1][1] < seen[2][1]  # optimizer steps happened between the rounds
    assert not torch.equal(seen[0][2][0], seen[2][2][0])  # and round 3 sampled with moved weights


def test_a_run_resumed_from_a_mid_epoch_checkpoint_equals_the_uninterrupted_run(tiny_world, tiny_spm, tmp_path):
    extra = ("sample.batches_per_epoch=3", "train.num_epochs=2", "log.checkpointing_steps=1",
             "log.checkpoints_total_limit=20")
    full = tmp_path / "full"
    _trainer(tiny_world, tiny_spm, full, *extra).train()
    names = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert "epoch-0-round-2" in names and "epoch-1" in names  # step checkpoints inside the first epoch

    part = tmp_path / "part"
    tr = _trainer(tiny_world, tiny_spm, part, *extra)
    tr.train()
    _die_after(part, "epoch-0-round-2")
    resumed = _trainer(tiny_world, tiny_spm, part, *extra, resume="latest")
    assert (resumed.epoch, resumed.position) == (0, 2)
    resumed.train()
    assert_same_run(part, full)


def test_sigint_stops_at_a_safe_point_with_a_checkpoint_and_resume_finishes_identically(tiny_world, tiny_spm, tmp_path):
    args = tiny_spo_args(tiny_world, tiny_spm, tmp_path / "x", "sample.batches_per_epoch=4", "train.num_epochs=2")
    full, part = tmp_path / "full", tmp_path / "part"
    run = lambda out, *more: [sys.executable, "-m", "spo.cli", "train", *args, f"log.output_dir={out}", *more]  # noqa: E731
    assert subprocess.run(run(full), capture_output=True, timeout=600).returncode == 0
    proc = subprocess.Popen(run(part), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (part / "config.yaml").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode in (0, 130), err
    if proc.returncode == 0:  # the run finished before the signal arrived: nothing to check
        pytest.skip("run ended before SIGINT")
    assert "stop requested" in err and not (part / "lora").exists() and any((part / "checkpoints").iterdir())
    done = subprocess.run(run(part, "--resume", "latest"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert_same_run(part, full)


# ------------------------------------------------------------------ ablation switches


def test_continuation_from_the_winner_or_the_loser(tiny_world, tiny_spm):
    from spo.models import Diffusion, load_pipeline
    from spo.resampler import resample

    d = Diffusion(load_pipeline(tiny_world / "sd"))
    picks = {}

    def judge(images, captions, t):
        return images.mean(dim=(1, 2, 3))

    for how in ("best", "worst"):
        r = resample(d, judge, ["a red circle"] * 3, 4, 5.0, 1.0, 3, 0.0, 1, torch.Generator().manual_seed(0),
                     continuation=how)
        picks[how] = [st.chosen_rank_counts for st in r.stats]
    assert all(c[0] == 3 for c in picks["best"])  # rank 0 = the best candidate, chosen for all 3 prompts
    assert all(c[-1] == 3 for c in picks["worst"])


def test_a_registry_scorer_judges_steps(tiny_world, tiny_spm, tmp_path):
    """The oracle row: the world's true utility on the x0-predictions as the step judge."""
    tr = _trainer(tiny_world, tiny_spm, tmp_path / "o", "model.spm=scorer:world-utility", "train.num_epochs=1")
    pairs, stats, _ = tr.method.sample(tr, 0)
    assert stats and all(0 <= st.score_sum / st.candidates <= 1 for st in stats)


@pytest.fixture
def fresh_accelerate_state():
    """One process holds one mixed-precision setting: start it afresh, and leave it afresh for the next test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_a_bf16_autocast_run_resumes_exactly_from_a_mid_epoch_checkpoint(tiny_world, tiny_spm, tmp_path,
                                                                          fresh_accelerate_state):
    """Mixed precision (bf16 autocast on CPU; frozen weights in bf16, LoRA in fp32) resumes exactly too."""
    extra = ("sample.batches_per_epoch=2", "train.num_epochs=1", "log.checkpointing_steps=1",
             "log.checkpoints_total_limit=20", "train.mixed_precision=bf16")
    full, part = tmp_path / "full", tmp_path / "part"
    tr = _trainer(tiny_world, tiny_spm, full, *extra)
    assert tr.diffusion.pipe.text_encoder.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in tr.trainable)
    tr.train()
    _trainer(tiny_world, tiny_spm, part, *extra).train()
    _die_after(part, "epoch-0-round-1")
    resumed = _trainer(tiny_world, tiny_spm, part, *extra, resume="latest")
    assert resumed.position == 1
    resumed.train()
    assert_same_run(part, full)


# ------------------------------------------------------------------ nothing wrong finishes quietly


def test_non_finite_weights_are_never_saved(tiny_world, tiny_spm, tmp_path):
    from spo.errors import SPOError

    tr = _trainer(tiny_world, tiny_spm, tmp_path / "nan", "train.num_epochs=1")
    with torch.no_grad():
        tr.trainable[0].fill_(float("nan"))
    with pytest.raises(SPOError, match="refusing to save"):
        tr.save_checkpoint()
    assert not (tmp_path / "nan" / "checkpoints" / "epoch-0").exists()


def test_a_diverged_policy_that_samples_nan_stops_with_a_clear_error(tiny_world, tiny_spm, tmp_path):
    from spo.errors import SPOError

    tr = _trainer(tiny_world, tiny_spm, tmp_path / "div", "sample.batches_per_epoch=4", "train.num_epochs=1",
                  "train.max_nonfinite_in_a_row=2")
    with torch.no_grad():
        tr.trainable[0].fill_(float("nan"))  # the LoRA weights are NaN: every sampled latent is NaN
    with pytest.raises(SPOError, match="sampled NaN/inf latents"):
        tr.train()
    assert not (tmp_path / "div" / "lora").exists()


def test_a_failed_overwrite_leaves_the_old_run_intact(tiny_world, tiny_spm, tmp_path):
    out = tmp_path / "run"
    _trainer(tiny_world, tiny_spm, out, "train.num_epochs=1").train()
    before = sorted(p.name for p in out.rglob("*"))
    cfg = load_config(SPOConfig, None, tiny_spo_args(tiny_world, tiny_spm, out, "train.num_epochs=1",
                                                      f"model.pretrained={tmp_path / 'typo'}"))
    with pytest.raises(Exception, match="typo"):
        Trainer(cfg, overwrite=True, log=lambda m: None).setup()
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing deleted before the new run could load


def test_resume_truncates_the_metrics_of_epochs_after_the_checkpoint(tiny_world, tiny_spm, tmp_path):
    import shutil

    out = tmp_path / "run"
    _trainer(tiny_world, tiny_spm, out, "train.num_epochs=2", "log.checkpoints_total_limit=5").train()
    shutil.rmtree(out / "checkpoints" / "epoch-2")
    shutil.rmtree(out / "lora")
    _trainer(tiny_world, tiny_spm, out, "train.num_epochs=2", resume="latest").train()
    epochs = [__import__("json").loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_train_spm_stops_on_persistent_non_finite_losses_and_saves_nothing(tiny_world, tmp_path, monkeypatch):
    import spo.preference.train_spm as train_module
    from spo.config import SPMTrainConfig
    from spo.errors import SPOError

    monkeypatch.setattr(train_module, "pickscore_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    cfg = load_config(SPMTrainConfig, None, [
        f"data.dataset={tiny_world / 'preference'}", f"model.diffusion_model={tiny_world / 'sd'}",
        f"model.base={tiny_world / 'pickscore'}", f"log.output_dir={tmp_path / 'spm'}", "train.max_steps=3",
        "train.batch_size=2", "log.report_to=none"])
    with pytest.raises(SPOError, match="non-finite losses in a row"):
        train_module.train_spm(cfg, log=lambda m: None)
    assert not (tmp_path / "spm" / "spm").exists()
