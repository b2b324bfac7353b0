"""The Diffusion-DPO baseline: loss maths, targets, and an end-to-end run on the tiny world's pairs."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from conftest import assert_same_run, tiny_spo_args
from spo.cli import cli
from spo.config import load_config
from spo.methods.diffusion_dpo import diffusion_dpo_loss, per_sample_mse
from spo.sampling import denoising_target
from spo.sampling import add_noise, predict_x0
from spo.config import SPOConfig
from spo.trainer import SPOTrainer


def test_loss_matches_the_formula_written_out_by_hand():
    pw, pl, rw, rl = torch.tensor([0.30, 0.5]), torch.tensor([0.40, 0.2]), torch.tensor([0.35, 0.5]), torch.tensor([0.38, 0.3])
    beta = 2000.0
    loss, margin = diffusion_dpo_loss(pw, pl, rw, rl, beta)
    by_hand = []
    for i in range(2):
        inside = -0.5 * beta * ((pw[i].item() - rw[i].item()) - (pl[i].item() - rl[i].item()))
        by_hand.append(math.log1p(math.exp(-inside)))
    assert loss.item() == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    assert margin[0] > 0 > margin[1]  # pair 0: the policy denoises the winner better than the reference does


def test_policy_equal_to_reference_gives_log_two():
    e = torch.rand(5)
    loss, margin = diffusion_dpo_loss(e, e.flip(0), e, e.flip(0), 5000.0)
    assert loss.item() == pytest.approx(math.log(2))
    assert torch.all(margin == 0)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_the_target_is_what_recovers_the_clean_latents(kind):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(prediction_type=kind)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    x_t = add_noise(sched, x0, noise, t)
    torch.testing.assert_close(predict_x0(sched, x_t, denoising_target(sched, x0, noise, t), t), x0,
                               rtol=1e-4, atol=1e-4)
    assert per_sample_mse(x0, x0 + 1).tolist() == pytest.approx([1.0, 1.0, 1.0])


def _dpo_args(world, spm, out, *extra):
    return tiny_spo_args(world, spm, out, "method=diffusion-dpo", f"dpo.dataset={world / 'preference'}",
                         "dpo.pairs_per_epoch=5", *extra)


def test_dpo_run_trains_lora_counts_unet_rows_and_resumes_exactly(tiny_world, tiny_spm, tmp_path):
    def run(out, epochs, resume=""):
        cfg = load_config(SPOConfig, None, _dpo_args(tiny_world, tiny_spm, out, f"train.num_epochs={epochs}"))
        return SPOTrainer(cfg, log=lambda m: None, resume=resume).setup()

    full = run(tmp_path / "full", 3)
    unet = full.acc.unwrap_model(full.unet)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    full.train()
    for name, p in unet.named_parameters():
        assert (not torch.equal(p.detach(), before[name])) == ("lora" in name), name
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    trained = sum(r["pairs_trained"] for r in rows)
    assert trained == 15
    # one policy (with gradients) and one reference row for each image of each pair, no CFG in training
    assert rows[-1]["unet_train_rows"] == rows[-1]["unet_forward_rows"] == 2 * trained

    run(tmp_path / "part", 2).train()
    resumed = run(tmp_path / "part", 3, resume="latest")
    resumed.train()
    assert_same_run(tmp_path / "part", tmp_path / "full")


def test_cli_method_flag_runs_the_baseline(tiny_world, tiny_spm, tmp_path):
    args = _dpo_args(tiny_world, tiny_spm, tmp_path / "cli", "train.num_epochs=1")
    args = [a for a in args if a != "method=diffusion-dpo"]
    result = CliRunner().invoke(cli, ["train", "--method", "diffusion-dpo", *args])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "method: diffusion-dpo" in (tmp_path / "cli" / "config.yaml").read_text()


def test_dataset_with_only_ties_is_refused(tiny_world, tiny_spm, tmp_path):
    import datasets

    from spo.errors import SPOError
    from spo.world.preference_data import load_split

    rows = load_split(tiny_world / "preference", "train").to_dict()
    rows["label_0"] = rows["label_1"] = [0.5] * len(rows["label_0"])
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "ties.parquet"))
    cfg = load_config(SPOConfig, None, _dpo_args(tiny_world, tiny_spm, tmp_path / "r", f"dpo.dataset={tmp_path / 'ties.parquet'}"))
    with pytest.raises(SPOError, match="no strictly preferred pairs"):
        SPOTrainer(cfg, log=lambda m: None).setup()
