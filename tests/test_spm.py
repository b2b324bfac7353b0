"""The step-aware preference model: zero-init equality, training scope, files, maths, data, CLI."""

import io
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from spo.preference.spm import StepAwareCLIP, timestep_features
from spo.preference.train_spm import pickscore_loss, set_trainable


@pytest.fixture(scope="module")
def random_clip_dir(tmp_path_factory):
    """A tiny random CLIPModel + tokenizer + processor in a folder: the path PickScore_v1 takes."""
    from transformers import CLIPProcessor

    from spo.world import architecture
    from spo.world.tokenizer import write_tokenizer

    d = tmp_path_factory.mktemp("clip")
    tok = write_tokenizer(d)
    torch.manual_seed(0)
    architecture.clip_model(tok, tiny=True).save_pretrained(d)
    CLIPProcessor(image_processor=architecture.clip_image_processor(), tokenizer=tok).save_pretrained(d)
    return d


def _perturb(spm, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in spm.conditioning.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_zero_initialised_spm_scores_exactly_like_its_clip(random_clip_dir):
    from transformers import CLIPModel

    spm = StepAwareCLIP.from_base(random_clip_dir).eval()
    clip = CLIPModel.from_pretrained(random_clip_dir).eval()
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    captions = ["a red circle", "a blue square above a yellow triangle", "", "a photo", "a small green diamond"]
    ids = spm.tokenize(captions)
    with torch.no_grad():
        expected = clip(input_ids=ids, pixel_values=images).logits_per_image.diag()  # processor range is [-1, 1] here
        for t in (torch.zeros(5), torch.tensor([0, 10, 500, 900, 999]), torch.randint(0, 1000, (5,))):
            torch.testing.assert_close(spm(images, captions, t), expected, rtol=1e-5, atol=1e-5)


def test_images_of_any_size_are_resized_on_tensors(random_clip_dir):
    spm = StepAwareCLIP.from_base(random_clip_dir).eval()
    big = torch.rand(2, 3, 64, 96) * 2 - 1
    pixels = spm.preprocess(big)
    assert pixels.shape == (2, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(spm(big, ["a red circle"] * 2, torch.tensor([3, 700]))).all()


def test_conditioning_changes_scores_once_trained_and_depends_on_t(random_clip_dir):
    spm = StepAwareCLIP.from_base(random_clip_dir).eval()
    _perturb(spm)
    images = torch.rand(1, 3, 32, 32).repeat(2, 1, 1, 1) * 2 - 1
    with torch.no_grad():
        s = spm(images, ["a red circle"] * 2, torch.tensor([0, 900]))
    assert not torch.allclose(s[0], s[1])


def test_timestep_features_are_sinusoids():
    f = timestep_features(torch.tensor([0.0, 1.0]), 8)
    torch.testing.assert_close(f[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-np.log(10000.0) * torch.arange(4) / 4)
    torch.testing.assert_close(f[1], torch.cat([torch.cos(freqs), torch.sin(freqs)]))


@pytest.mark.parametrize("which", ["conditioning", "vision", "all"])
def test_only_the_intended_parameters_train(random_clip_dir, which):
    spm = StepAwareCLIP.from_base(random_clip_dir)
    trainable = set(set_trainable(spm, which))
    before = {n: p.detach().clone() for n, p in spm.named_parameters()}
    opt = torch.optim.AdamW([p for p in spm.parameters() if p.requires_grad], lr=1e-2)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    for _ in range(3):  # the MLP before a zero-initialised layer only gets gradient from the second step on
        s0 = spm(images[:2], ["a red circle", "a blue square"], torch.tensor([100, 800]))
        s1 = spm(images[2:], ["a red circle", "a blue square"], torch.tensor([100, 800]))
        loss = pickscore_loss(s0, s1, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in spm.named_parameters():
        moved = not torch.equal(p.detach(), before[name])
        if name in trainable:
            assert moved, f"{name} should train ({which})"
        else:
            assert not moved, f"{name} should be frozen ({which})"
    prefixes = {"conditioning": ("conditioning.",), "vision": ("conditioning.", "clip.vision_model.", "clip.visual_projection.")}
    if which in prefixes:
        assert all(n.startswith(prefixes[which]) for n in trainable)
    else:
        assert any(n.startswith("clip.text_model.") for n in trainable)


def test_save_then_load_gives_identical_scores(random_clip_dir, tmp_path):
    spm = StepAwareCLIP.from_base(random_clip_dir).eval()
    _perturb(spm)
    spm.save_pretrained(tmp_path / "spm")
    again = StepAwareCLIP.from_pretrained(tmp_path / "spm").eval()
    cfg = json.loads((tmp_path / "spm" / "spm_config.json").read_text())
    assert cfg["base_model"] == str(random_clip_dir) and cfg["time_conditioned"] is True
    images, t = torch.rand(3, 3, 32, 32) * 2 - 1, torch.tensor([0, 400, 999])
    with torch.no_grad():
        torch.testing.assert_close(again(images, ["a red circle"] * 3, t), spm(images, ["a red circle"] * 3, t),
                                   rtol=0, atol=0)


def test_plain_variant_has_no_conditioning_and_ignores_t(random_clip_dir, tmp_path):
    spm = StepAwareCLIP.from_base(random_clip_dir, time_conditioned=False).eval()
    assert spm.conditioning is None
    spm.save_pretrained(tmp_path / "plain")
    again = StepAwareCLIP.from_pretrained(tmp_path / "plain")
    assert again.conditioning is None
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(spm(x, ["a red circle"] * 2, torch.tensor([0, 0])), spm(x, ["a red circle"] * 2, torch.tensor([900, 900])))


def test_a_plain_clip_loads_as_a_step_unaware_scorer(random_clip_dir, tmp_path):
    """The "naive" ablation: model.spm may name a plain CLIP/PickScore, which then ignores t."""
    from spo.preference.judges import load_scorer_model

    plain = load_scorer_model(random_clip_dir).eval()
    assert plain.conditioning is None
    trained = StepAwareCLIP.from_base(random_clip_dir).eval()
    trained.save_pretrained(tmp_path / "spm")
    assert load_scorer_model(tmp_path / "spm").conditioning is not None
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(plain(x, ["a red circle"] * 2, torch.tensor([0, 900])),
                                   trained(x, ["a red circle"] * 2, torch.tensor([0, 0])))


def test_loading_something_that_is_not_an_spm_says_so(random_clip_dir):
    from spo.errors import SPOError

    with pytest.raises(SPOError, match="not a saved step-aware preference model"):
        StepAwareCLIP.from_pretrained(random_clip_dir)


# ------------------------------------------------------------------ maths


def test_noising_and_x0_prediction_match_hand_computed_ddim():
    from spo.sampling import add_noise, predict_x0
    from spo.world.architecture import scheduler

    sched = scheduler()
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1, 501, 951])
    ac = sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    x_t_hand = ac.sqrt() * x0.double() + (1 - ac).sqrt() * noise.double()
    x_t = add_noise(sched, x0, noise, t)
    torch.testing.assert_close(x_t.double(), x_t_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_t, sched.add_noise(x0, noise, t))
    x0_hand = (x_t.double() - (1 - ac).sqrt() * eps.double()) / ac.sqrt()
    torch.testing.assert_close(predict_x0(sched, x_t, eps, t).double(), x0_hand, rtol=1e-5, atol=1e-5)
    for i, ti in enumerate(t.tolist()):  # and exactly what diffusers' DDIM step reports as pred_original_sample
        ref = sched.step(eps[i : i + 1], ti, x_t[i : i + 1], eta=0.0).pred_original_sample
        torch.testing.assert_close(predict_x0(sched, x_t[i : i + 1], eps[i : i + 1], t[i : i + 1]), ref, rtol=1e-5, atol=1e-5)


def test_pickscore_loss_matches_hand_computation_and_handles_ties():
    s0 = torch.tensor([2.0, 0.5, 1.0], requires_grad=True)
    s1 = torch.tensor([1.0, 0.5, 3.0], requires_grad=True)
    labels = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5]])
    loss = pickscore_loss(s0, s1, labels)
    hand = (np.log1p(np.exp(-1.0)) + np.log(2) + (0.5 * np.log1p(np.exp(2.0)) + 0.5 * np.log1p(np.exp(-2.0)))) / 3
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    loss.backward()
    assert s0.grad[1].item() == pytest.approx(0.0, abs=1e-7)  # a tie at equal scores is already optimal
    assert s0.grad[0].item() < 0 and s1.grad[0].item() > 0  # the preferred image's score is pushed up
    assert s0.grad[2].item() < 0  # a tie pulls the lower score up
    w = torch.tensor([1.0, 0.0, 0.0])
    assert pickscore_loss(s0, s1, labels, w).item() == pytest.approx(np.log1p(np.exp(-1.0)), rel=1e-6)


def test_prompt_weights_make_each_prompt_count_equally():
    from spo.preference.data import prompt_weights

    w = prompt_weights(["a", "a", "a", "b"])
    assert w[:3].sum() == pytest.approx(w[3])
    assert w.mean() == pytest.approx(1.0)


# ------------------------------------------------------------------ data


def _jpeg(arr, mode="RGB", fmt="JPEG"):
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def test_collator_skips_and_counts_bad_rows_without_crashing():
    from spo.preference.data import PairCollator

    ok = _jpeg(np.zeros((32, 32, 3), np.uint8))
    rows = [
        dict(caption="a red circle", jpg_0=ok, jpg_1=ok, label_0=1.0, label_1=0.0),
        dict(caption="a red circle", jpg_0=b"not an image", jpg_1=ok, label_0=1.0, label_1=0.0),
        dict(caption="a red circle", jpg_0=_jpeg(np.zeros((32, 32, 3), np.uint8), "L"), jpg_1=_jpeg(np.zeros((48, 40, 4), np.uint8), "RGBA", "PNG"), label_0=0.5, label_1=0.5),
        dict(caption="", jpg_0=ok, jpg_1=ok, label_0=0.0, label_1=1.0),
        dict(caption="word " * 200, jpg_0=ok, jpg_1=ok, label_0=0.0, label_1=1.0),
        dict(caption="a red circle", jpg_0=ok, jpg_1=ok, label_0=float("nan"), label_1=None),
        dict(caption=None, jpg_0=ok, jpg_1=ok, label_0=0.3, label_1=0.3),
    ]
    collate = PairCollator(resolution=32)
    batch = collate(rows)
    counts = collate.report.summary()
    assert batch["img0"].shape == (4, 3, 32, 32) and batch["img1"].shape == (4, 3, 32, 32)
    assert counts["pairs used"] == 4 and counts["rows seen"] == 7
    assert counts["skipped: undecodable image"] == 1 and counts["skipped: no label"] == 2
    assert counts["converted: L image to RGB"] == 1 and counts["converted: RGBA image to RGB"] == 1
    assert counts["resized: image not at model resolution"] == 1
    assert counts["empty caption (kept, unconditional)"] == 1 and counts["long caption (truncated by the tokenizer)"] == 1
    assert collate([rows[1]]) is None


class _BrightnessJudge(torch.nn.Module):
    """A stand-in base model for relabelling: prefers the brighter image, strongly."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(10.0))

    def forward(self, images, captions, t):
        return self.scale * images.mean(dim=(1, 2, 3))


def test_relabelling_never_turns_an_invalid_row_into_a_label_or_a_tie():
    """Labels 0/0 (or none) stay invalid, to be skipped and counted; valid rows take the judge's labels."""
    import datasets

    from spo.preference.data import PairCollator
    from spo.preference.train_spm import _relabel

    bright, dark = _jpeg(np.full((32, 32, 3), 255, np.uint8)), _jpeg(np.zeros((32, 32, 3), np.uint8))
    ds = datasets.Dataset.from_dict(dict(
        caption=["both zero", "judge disagrees", "no label", "same images"],
        jpg_0=[bright, dark, bright, dark], jpg_1=[dark, bright, dark, dark],
        label_0=[0.0, 1.0, None, 1.0], label_1=[0.0, 0.0, None, 0.0]))
    for ties, kept in (("tie", [(0.0, 0.0), (0.0, 1.0), (None, None), (0.5, 0.5)]),
                       ("drop", [(0.0, 0.0), (0.0, 1.0), (None, None)])):
        out = _relabel(ds, _BrightnessJudge(), 32, threshold=0.1, ties=ties)
        assert list(zip(out["label_0"], out["label_1"])) == kept
    collate = PairCollator(resolution=32)
    collate(list(_relabel(ds, _BrightnessJudge(), 32, threshold=0.1, ties="tie")))
    counts = collate.report.summary()
    assert counts["skipped: no label"] == 2 and counts["pairs used"] == 2


def test_dataset_without_pick_a_pic_columns_is_refused(tmp_path):
    import datasets

    from spo.errors import SPOError
    from spo.preference.data import load_preference_dataset

    datasets.Dataset.from_dict({"caption": ["x"], "image": [b""]}).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(SPOError, match="lacks column"):
        load_preference_dataset(tmp_path / "d.parquet")


# ------------------------------------------------------------------ end to end on the tiny world


def _train(tiny_world, out, *extra):
    from spo.cli import cli

    args = ["train-spm", f"data.dataset={tiny_world / 'preference'}", f"model.diffusion_model={tiny_world / 'sd'}",
            f"model.base={tiny_world / 'pickscore'}", f"log.output_dir={out}", "train.batch_size=4",
            "log.report_to=none", *extra]
    return CliRunner().invoke(cli, args)


def test_train_spm_end_to_end_and_resume(tiny_world, tmp_path):
    out = tmp_path / "run"
    result = _train(tiny_world, out, "train.max_steps=3", "log.checkpointing_steps=2")
    assert result.exit_code == 0, result.output
    assert (out / "spm" / "spm_config.json").is_file() and (out / "config.yaml").is_file()
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"step-2", "step-3"}
    report = json.loads((out / "data_report.json").read_text())
    assert report["steps"] == 3 and report["pairs used"] > 0
    spm = StepAwareCLIP.from_pretrained(out / "spm")
    assert any(p.abs().sum() > 0 for p in spm.conditioning.blocks.parameters())  # the zero-init layers moved

    result = _train(tiny_world, out, "train.max_steps=5", "log.checkpointing_steps=2", "--resume", "latest")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "data_report.json").read_text())["steps"] == 5
    assert (out / "checkpoints" / "step-5").is_dir() and not (out / "checkpoints" / "step-2").exists()


def test_train_spm_relabel_mode_runs(tiny_world, tmp_path):
    result = _train(tiny_world, tmp_path / "relabel", "train.max_steps=1", "data.relabel_threshold=0.0",
                    "model.train_params=conditioning")
    assert result.exit_code == 0, result.output


def test_train_spm_rejects_bad_config(tiny_world, tmp_path):
    result = _train(tiny_world, tmp_path / "bad", "model.train_params=everything")
    assert result.exit_code != 0 and "train_params must be one of" in str(result.exception)
    result = _train(tiny_world, tmp_path / "bad", "train.no_such_field=1")
    assert result.exit_code != 0 and "unknown" in str(result.exception)


def test_evaluate_spm_writes_table_and_plot(tiny_world, tmp_path):
    from spo.cli import cli

    assert _train(tiny_world, tmp_path / "run", "train.max_steps=1").exit_code == 0
    result = CliRunner().invoke(cli, [
        "evaluate-spm", "--spm", str(tmp_path / "run" / "spm"), "--base", str(tiny_world / "pickscore"),
        "--dataset", str(tiny_world / "preference"), "--diffusion-model", str(tiny_world / "sd"),
        "--timesteps", "0,500,950", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    acc = json.loads((tmp_path / "eval" / "accuracy.json").read_text())
    assert acc["timesteps"] == [0, 500, 950]
    assert set(acc["accuracy"]) == {"base (naive)", "SPM", "utility on x0-prediction"}
    assert "ceiling_true_utility" in acc
    assert (tmp_path / "eval" / "accuracy.png").stat().st_size > 0
