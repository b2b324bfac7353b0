"""The latent step judge: it learns a prompt-dependent preference from noisy latents, saves and loads exactly,
and with model.judge=latent the resampler calls the network for b rows per diverted step instead of b·K."""

import json

import pytest
import torch
from click.testing import CliRunner

from spo.models import Diffusion, load_pipeline
from spo.errors import SPOError
from spo.preference.judges import load_latent_judge
from spo.preference.latent_judge import LatentJudgeConfig, LatentJudgeEnsemble, LatentStepJudge
from spo.preference.train_latent_judge import EncodedPairs, _optimise, _pair_loss, pair_scores
from spo.resampler import resample
from conftest import tiny_spo_args


@pytest.fixture(scope="module")
def diffusion(tiny_world):
    return Diffusion(load_pipeline(tiny_world / "sd"))


@pytest.fixture(scope="module")
def tiny_latent_judge(tiny_world, tmp_path_factory):
    """A latent judge for the tiny world from a few steps of the real `spo train-latent-judge`."""
    from spo.cli import cli

    out = tmp_path_factory.mktemp("latent-judge")
    result = CliRunner().invoke(cli, [
        "train-latent-judge", "--config", "latent_judge_world", f"data.dataset={tiny_world / 'preference'}",
        f"model.diffusion_model={tiny_world / 'sd'}", "model.widths=[8,16]", "model.cond_dim=16",
        "model.embed_dim=16", "train.max_steps=3", "train.batch_size=4", f"log.output_dir={out}"])
    assert result.exit_code == 0, result.output
    assert (out / "config.yaml").is_file() and (out / "train_report.json").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # the last step is always logged
    return out / "latent_judge"


def _synthetic_pairs(n: int, generator: torch.Generator, shape=(4, 16, 16), text_dim: int = 32) -> EncodedPairs:
    """Pairs whose preference hides in the latent AND depends on the prompt: each image's latent has channel p
    shifted by s and channel 1 − p by −s, where p is the prompt; the image with the larger s wins. Under prompt 0
    "brighter channel 0, darker channel 1" wins, under prompt 1 the opposite, so a judge blind to the text
    scores 50% in expectation."""
    text = torch.randn(2, 3, text_dim, generator=generator)
    prompt = torch.randint(2, (n,), generator=generator)
    lat0, lat1 = torch.randn(n, *shape, generator=generator), torch.randn(n, *shape, generator=generator)
    shift0, shift1 = torch.randn(n, generator=generator), torch.randn(n, generator=generator)
    rows = torch.arange(n)
    for latents, shift in ((lat0, shift0), (lat1, shift1)):
        latents[rows, prompt] += shift[:, None, None]
        latents[rows, 1 - prompt] -= shift[:, None, None]
    first_wins = (shift0 > shift1).float()
    labels = torch.stack([first_wins, 1 - first_wins], -1)
    return EncodedPairs(lat0, lat1, text, prompt, labels, torch.ones(n))


def _accuracy(judge, diffusion, pairs, t_value: int, seed: int = 1) -> float:
    index = torch.arange(len(pairs))
    with torch.no_grad():
        s0, s1 = pair_scores(judge, diffusion, pairs, index, torch.full((len(pairs),), t_value),
                             torch.Generator().manual_seed(seed))
    return ((s0 > s1).float() == pairs.labels[:, 0]).float().mean().item()


def test_the_judge_learns_a_prompt_dependent_preference_from_noisy_latents(diffusion, tmp_path):
    gen = torch.Generator().manual_seed(0)
    train, held_out = _synthetic_pairs(512, gen), _synthetic_pairs(256, gen)
    held_out.text = train.text  # the same two prompts, fresh images
    torch.manual_seed(0)
    judge = LatentStepJudge(LatentJudgeConfig(text_dim=32, text_tokens=3, widths=[16, 16], cond_dim=32, embed_dim=16))
    before = {t: _accuracy(judge, diffusion, held_out, t) for t in (0, 250)}
    cfg = dict(max_steps=150, batch_size=64, learning_rate=3e-3, weight_decay=0.0, lr_warmup_steps=10,
               max_grad_norm=1.0, t_min=0, t_max=999, seed=0)
    tr = type("T", (), cfg)()
    _optimise(judge, _pair_loss(judge, diffusion, train, tr), tr, 50, tmp_path / "metrics.jsonl", log=lambda m: None)
    after = {t: _accuracy(judge, diffusion, held_out, t) for t in (0, 250)}
    assert after[0] > 0.85 and after[250] > 0.75, (before, after)
    assert after[0] > max(before.values()) + 0.2  # it was learnt, not given by the initial weights
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]


def test_save_and_load_give_identical_scores(tmp_path):
    torch.manual_seed(0)
    judge = LatentStepJudge(LatentJudgeConfig(text_dim=32, text_tokens=5, widths=[8, 16], cond_dim=16, embed_dim=8))
    for p in judge.parameters():  # FiLM layers start at zero: move every weight so that all of them are checked
        torch.nn.init.normal_(p, std=0.1)
    judge.save_pretrained(tmp_path / "j")
    again = LatentStepJudge.from_pretrained(tmp_path / "j")
    x, text, t = torch.randn(3, 4, 16, 16), torch.randn(3, 5, 32), torch.tensor([0, 400, 999])
    with torch.no_grad():
        assert torch.equal(judge(x, text, t), again(x, text, t))
    assert again.config == judge.config


def test_a_judge_for_other_latents_is_refused_in_one_line(tiny_latent_judge, diffusion):
    from spo.errors import SPOError
    from spo.preference.judges import load_latent_judge
    from spo.preference.latent_judge import check_compatible

    judge = load_latent_judge(str(tiny_latent_judge), "cpu", diffusion)  # its own model: accepted
    with pytest.raises(SPOError, match="FLUX gives 16 and"):
        check_compatible(judge, 16, judge.config.text_dim, "FLUX")


class _RowCounter:
    """Counts the network's rows per call (after the CFG doubling) and the timesteps the judge was asked about."""

    def __init__(self, diffusion, judge):
        self.rows, self.judged_t = [], []
        self.hook = diffusion.unet.register_forward_pre_hook(lambda m, args: self.rows.append(len(args[0])))
        self.judge = judge

    def __call__(self, latents, cond, t):
        self.judged_t += t.tolist()
        return self.judge(latents, cond, t)


def test_with_a_latent_judge_the_network_runs_b_rows_per_diverted_step_not_b_times_k(diffusion, tiny_latent_judge):
    from spo.preference.judges import load_latent_judge

    b, k, steps, divert = 2, 4, 5, 2
    judge = load_latent_judge(str(tiny_latent_judge), "cpu", diffusion)
    run = dict(num_steps=steps, guidance=5.0, eta=1.0, num_candidates=k, threshold=0.0, divert_start_step=divert)
    latent = _RowCounter(diffusion, judge)
    result = resample(diffusion, latent, ["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0),
                      judge_input="latents", **run)
    latent.hook.remove()
    pixel = _RowCounter(diffusion, lambda images, captions, t: images.mean(dim=(1, 2, 3)))
    resample(diffusion, lambda images, captions, t: images.mean(dim=(1, 2, 3)), ["a red circle", "a blue square"],
             generator=torch.Generator().manual_seed(0), **run)
    pixel.hook.remove()
    cfg = 2  # classifier-free guidance doubles every call
    assert latent.rows == [cfg * b] * steps  # one call per step, for the b continued trajectories only
    assert pixel.rows == [cfg * b] * (divert + 1) + [cfg * b * k] * (steps - divert - 1)  # K per diverted step
    sched_t = [t for t, _ in diffusion.schedule(steps)]
    assert latent.judged_t == [float(t) for t in sched_t[divert + 1:] for _ in range(b * k)] + [0.0] * (b * k)
    assert len(result.pairs) == b * (steps - divert)  # threshold 0: a pair per diverted step, as with any judge


@pytest.mark.parametrize("members", [1, 2])
def test_spo_trains_an_epoch_with_the_latent_judge(tiny_world, tiny_spm, tiny_latent_judge, tmp_path, members):
    from spo.cli import cli

    out = tmp_path / "run"
    judges = ",".join([str(tiny_latent_judge)] * members)  # 2: an ensemble, given as comma-separated judges
    args = tiny_spo_args(tiny_world, tiny_spm, out, "model.judge=latent", f"model.latent_judge={judges}",
                         "train.num_epochs=1")
    result = CliRunner().invoke(cli, ["train", *args])
    assert result.exit_code == 0, result.output
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)


def _synthetic_sets(n: int, generator: torch.Generator, k: int = 4, shape=(4, 16, 16), text_dim: int = 32):
    """Sibling sets as the resampler draws them (one x_t-like centre, K small perturbations) whose teacher score is
    prompt-dependent: + the mean of channel p − the mean of channel 1 − p, p the prompt. A judge blind to the text,
    or untrained, picks the teacher's best 1/K of the time."""
    from spo.preference.train_latent_judge import CandidateSets

    text = torch.randn(2, 3, text_dim, generator=generator)
    prompt = torch.randint(2, (n,), generator=generator)
    centre = torch.randn(n, 1, *shape, generator=generator)
    latents = centre + 0.5 * torch.randn(n, k, *shape, generator=generator)
    rows = torch.arange(n)
    scores = 4 * (latents[rows, :, prompt].mean((-2, -1)) - latents[rows, :, 1 - prompt].mean((-2, -1)))
    return CandidateSets(latents, torch.randint(0, 1000, (n,), generator=generator).float(), text, prompt, scores)


def test_distillation_learns_the_teachers_choices_among_siblings(tmp_path):
    from spo.preference.train_latent_judge import _agreement, _distill_loss

    gen = torch.Generator().manual_seed(0)
    train, held_out = _synthetic_sets(512, gen), _synthetic_sets(256, gen)
    held_out.text = train.text
    torch.manual_seed(0)
    judge = LatentStepJudge(LatentJudgeConfig(text_dim=32, text_tokens=3, widths=[16, 16], cond_dim=32, embed_dim=16))
    before = _agreement(judge, held_out, 0.1)
    cfg = dict(max_steps=150, batch_size=32, learning_rate=3e-3, weight_decay=0.0, lr_warmup_steps=10,
               max_grad_norm=1.0, seed=0)
    tr = type("T", (), cfg)()
    _optimise(judge, _distill_loss(judge, train, tr), tr, 50, tmp_path / "metrics.jsonl", log=lambda m: None)
    after = _agreement(judge, held_out, 0.1)
    assert after["same_best"] > 0.7 and after["pair_order"] > 0.85, (before, after)
    assert after["same_best"] > before["same_best"] + 0.3


@pytest.fixture(scope="module")
def tiny_policy_lora(tiny_world, tiny_spm, tmp_path_factory):
    """The LoRA of a one-epoch SPO run on the tiny world: a tuned policy for an on-policy distillation round."""
    from spo.cli import cli

    out = tmp_path_factory.mktemp("policy")
    result = CliRunner().invoke(cli, ["train", *tiny_spo_args(tiny_world, tiny_spm, out, "train.num_epochs=1")])
    assert result.exit_code == 0, result.output
    return out / "lora"


def test_a_policy_lora_changes_the_model_inside_the_round_and_is_unloaded_after(diffusion, tiny_policy_lora):
    from spo.preference.train_latent_judge import policy_lora

    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    cond, uncond = diffusion.encode_prompts(["a red circle", "a blue square"])
    with torch.no_grad():
        before = diffusion.guided_output(x, t, cond, uncond, 5.0)
        with policy_lora(diffusion, str(tiny_policy_lora)):
            inside = diffusion.guided_output(x, t, cond, uncond, 5.0)
        after = diffusion.guided_output(x, t, cond, uncond, 5.0)
    assert not torch.allclose(inside, before)  # the tuned policy draws the sets
    assert torch.equal(after, before)  # and the base model is back for everything after


def test_a_missing_policy_folder_is_refused_in_one_line(diffusion, tmp_path):
    from spo.preference.train_latent_judge import policy_lora

    with pytest.raises(SPOError, match="not a LoRA folder"):
        with policy_lora(diffusion, str(tmp_path / "nope")):
            pass


def test_train_latent_judge_distils_from_a_pixel_judge_on_the_models_own_candidates(tiny_world, tiny_spm,
                                                                                   tiny_policy_lora, tmp_path):
    """The real command on the tiny world: candidate sets drawn by the resampler — from the base model and from a
    tuned policy — scored by the SPM, held-out agreement reports, and an ensemble judge that SPO then loads."""
    from spo.cli import cli

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["a red circle", "a blue square", "two green triangles", "a yellow star"]))
    out = tmp_path / "distilled"
    result = CliRunner().invoke(cli, [
        "train-latent-judge", "--config", "latent_judge_distilled_world", f"distill.teacher={tiny_spm}",
        f"distill.prompts={prompts}", "distill.num_prompts=4", "distill.batch_size=2", "distill.held_out_fraction=0.5",
        f"model.diffusion_model={tiny_world / 'sd'}", "model.init=", "model.widths=[8,16]", "model.cond_dim=16",
        "model.embed_dim=16", "model.ensemble_size=2", "sample.num_steps=4", "sample.divert_start_step=1",
        "train.max_steps=3", "train.batch_size=4", f"log.output_dir={out}", f"distill.policies=[{tiny_policy_lora}]",
        "distill.policy_prompts=2"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "train_report.json").read_text())
    # 2 base prompts + 1 policy prompt trained on, 3 diverted steps each; 2 base and 1 policy prompt held out
    assert report["train_sets"] == (2 + 1) * 3 and report["held_out_sets"] == 2 * 3
    assert report["held_out_policy_sets"] == 1 * 3 and "pair_order" in report["held_out_agreement_on_policy"]
    assert set(report["held_out_agreement"]) >= {"same_best", "same_worst", "pair_order", "kept_same"}
    assert [m["seed"] for m in report["members"]] == [0, 1]  # two members, each with its own draws and agreement
    assert all(set(m["held_out_agreement"]) >= {"same_best", "pair_order"} for m in report["members"])
    assert (out / "metrics_member_1.jsonl").is_file()
    judge = load_latent_judge(str(out / "latent_judge"), "cpu")
    assert isinstance(judge, LatentJudgeEnsemble) and len(judge.members) == 2
    assert judge.config.latent_channels == 4
    first, second = (dict(m.named_parameters())["stem.weight"] for m in judge.members)
    assert not torch.equal(first, second)  # different initial draws, not one judge saved twice


def _random_judge(seed: int, reads: str = "x0") -> LatentStepJudge:
    torch.manual_seed(seed)
    judge = LatentStepJudge(LatentJudgeConfig(text_dim=32, text_tokens=5, widths=[8, 16], cond_dim=16, embed_dim=8,
                                              reads=reads))
    for p in judge.parameters():  # FiLM layers start at zero: move every weight so that all of them matter
        torch.nn.init.normal_(p, std=0.1)
    return judge.eval()


def test_an_ensemble_scores_the_mean_of_its_members_and_saves_exactly(tmp_path):
    members = [_random_judge(0), _random_judge(1), _random_judge(2)]
    ensemble = LatentJudgeEnsemble(members)
    x, text, t = torch.randn(3, 4, 16, 16), torch.randn(3, 5, 32), torch.tensor([0, 400, 999])
    with torch.no_grad():
        expected = torch.stack([m(x, text, t) for m in members]).mean(0)
        assert torch.allclose(ensemble(x, text, t), expected)
        ensemble.save_pretrained(tmp_path / "ens")
        again = load_latent_judge(str(tmp_path / "ens"), "cpu")
        assert torch.equal(again(x, text, t), ensemble(x, text, t))
        # comma-separated judges make the same ensemble; an ensemble inside the list contributes its members
        listed = load_latent_judge(f"{tmp_path / 'ens'},{tmp_path / 'ens'}", "cpu")
        assert len(listed.members) == 6 and torch.allclose(listed(x, text, t), expected)
    assert again.config.reads == "x0"


def test_an_ensemble_of_judges_that_read_different_inputs_is_refused():
    with pytest.raises(SPOError, match="read the same input"):
        LatentJudgeEnsemble([_random_judge(0, "x0"), _random_judge(1, "noisy")])
