"""SPO training end to end on the tiny world: loss maths, reference, outputs, resume, atomicity, errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from conftest import assert_same_run, tiny_spo_args
from spo.cli import cli
from spo.config import load_config
from spo.errors import SPOError
from spo.resampler import Pairs
from spo.config import SPOConfig
from spo.methods.spo import pair_loss
from spo.trainer import SPOTrainer


def _trainer(world, spm, out, *extra, **kw):
    cfg = load_config(SPOConfig, None, tiny_spo_args(world, spm, out, *extra))
    return SPOTrainer(cfg, log=lambda m: None, **kw).setup()


def _random_pairs(trainer, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    sched = trainer.diffusion.scheduler
    sched.set_timesteps(4)
    shape = (n, 4, 16, 16)
    t = sched.timesteps[torch.randint(len(sched.timesteps), (n,), generator=g)]
    return Pairs(x_t=torch.randn(shape, generator=g), timesteps=t, prev_timesteps=t - 1000 // 4, win=torch.randn(shape, generator=g),
                 lose=torch.randn(shape, generator=g), prompt_index=torch.arange(n), step_index=torch.zeros(n),
                 gap=torch.ones(n))


def test_shared_forward_loss_and_gradients_equal_the_two_forward_computation(tiny_world, tiny_spm, tmp_path):
    from spo.methods.spo import spo_loss
    from spo.models import guided_output
    from spo.sampling import ddim_transition, gaussian_log_prob

    tr = _trainer(tiny_world, tiny_spm, tmp_path / "r")
    with torch.no_grad():  # move the LoRA away from its init so policy and reference differ
        for p in tr.trainable:
            p.add_(0.05 * torch.randn_like(p))
    pairs = _random_pairs(tr)
    cond, uncond = tr.diffusion.encode_prompts(["a red circle", "a blue square", "a small green diamond"])
    cfg = tr.cfg
    ref = tr.reference_output(pairs.x_t, pairs.timesteps, cond, uncond, cfg.sample.guidance_scale)
    loss, _ = pair_loss(tr.diffusion, tr.unet, ref, pairs, cond, uncond, cfg.sample.guidance_scale,
                        cfg.sample.eta, cfg.train.beta, cfg.train.eps)
    loss.backward()
    shared_grads = [p.grad.clone() for p in tr.trainable]
    tr.optimizer.zero_grad()

    # straightforward: policy and reference evaluated separately for the win and for the lose image
    def logp(unet, x_next, reference):
        with torch.set_grad_enabled(not reference):
            if reference:
                out = tr.reference_output(pairs.x_t, pairs.timesteps, cond, uncond, 5.0)
            else:
                out = guided_output(unet, pairs.x_t, pairs.timesteps, cond, uncond, cfg.sample.guidance_scale)
            mean, std, _ = ddim_transition(tr.diffusion.scheduler, out, pairs.timesteps, pairs.prev_timesteps, pairs.x_t,
                                           cfg.sample.eta)
            return gaussian_log_prob(x_next.double(), mean.double(), std.double())

    lw = logp(tr.unet, pairs.win, False) - logp(tr.unet, pairs.win, True)
    ll = logp(tr.unet, pairs.lose, False) - logp(tr.unet, pairs.lose, True)
    loss2, _ = spo_loss(lw, ll, cfg.train.beta, cfg.train.eps)
    loss2.backward()
    assert loss.item() == pytest.approx(loss2.item(), rel=1e-4)
    for g1, p in zip(shared_grads, tr.trainable):
        torch.testing.assert_close(g1, p.grad, rtol=1e-3, atol=1e-4 * p.grad.abs().max().item())


def test_inner_steps_training_runs_and_uses_separate_lose_states(tiny_world, tiny_spm, tmp_path):
    from spo.methods.spo import transition_inputs

    tr = _trainer(tiny_world, tiny_spm, tmp_path / "inner", "sample.inner_steps=1", "train.num_epochs=1")
    pairs, _, prompts = tr.method.sample(tr, 0)
    assert (~pairs.shared).any()
    cond, uncond = tr.diffusion.encode_prompts([prompts[i] for i in pairs.prompt_index.tolist()])
    x, t, _, c, _, extra = transition_inputs(pairs, cond, uncond)
    assert len(x) == len(pairs) + int((~pairs.shared).sum()) == len(c)
    tr.train()
    assert (tmp_path / "inner" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_reference_with_adapters_disabled_equals_the_base_unet(tiny_world, tiny_spm, tmp_path):
    from diffusers import StableDiffusionPipeline

    from spo.models import guided_output

    tr = _trainer(tiny_world, tiny_spm, tmp_path / "r")
    with torch.no_grad():
        for p in tr.trainable:
            p.add_(0.1)
    base = StableDiffusionPipeline.from_pretrained(tiny_world / "sd").unet
    pairs = _random_pairs(tr)
    cond, uncond = tr.diffusion.encode_prompts(["a red circle"] * 3)
    with torch.no_grad():
        expected = guided_output(base, pairs.x_t, pairs.timesteps, cond, uncond, 5.0)
        policy = guided_output(tr.unet, pairs.x_t, pairs.timesteps, cond, uncond, 5.0)
    torch.testing.assert_close(tr.reference_output(pairs.x_t, pairs.timesteps, cond, uncond, 5.0), expected)
    assert not torch.allclose(policy, expected)  # the adapters are back on afterwards


def test_training_moves_every_lora_weight_and_nothing_else(tiny_world, tiny_spm, tmp_path):
    tr = _trainer(tiny_world, tiny_spm, tmp_path / "r")
    unet = tr.acc.unwrap_model(tr.unet)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    tr.train()
    for name, p in unet.named_parameters():
        moved = not torch.equal(p.detach(), before[name])
        assert moved == ("lora" in name), name


def test_lora_output_reloads_in_stock_diffusers_with_identical_images(tiny_world, tiny_spm, tmp_path):
    from diffusers import StableDiffusionPipeline

    tr = _trainer(tiny_world, tiny_spm, tmp_path / "r")
    lora_dir = tr.train()
    kw = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np")
    tr.diffusion.pipe.unet = tr.acc.unwrap_model(tr.unet)
    trained = tr.diffusion.pipe(["a red circle"], generator=torch.Generator().manual_seed(0), **kw).images
    stock = StableDiffusionPipeline.from_pretrained(tiny_world / "sd")
    base = stock(["a red circle"], generator=torch.Generator().manual_seed(0), **kw).images
    stock.load_lora_weights(str(lora_dir))
    reloaded = stock(["a red circle"], generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(torch.from_numpy(reloaded), torch.from_numpy(trained), rtol=0, atol=1e-5)
    assert abs(reloaded - base).max() > 1e-4  # and the LoRA does change the picture


def test_full_finetuning_saves_a_loadable_pipeline(tiny_world, tiny_spm, tmp_path):
    from diffusers import StableDiffusionPipeline

    tr = _trainer(tiny_world, tiny_spm, tmp_path / "full", "model.use_lora=false", "train.num_epochs=1",
                  "train.learning_rate=1e-4")
    out = tr.train()
    pipe = StableDiffusionPipeline.from_pretrained(out)
    changed = any(not torch.equal(a, b) for a, b in zip(
        pipe.unet.state_dict().values(), StableDiffusionPipeline.from_pretrained(tiny_world / "sd").unet.state_dict().values()))
    assert changed


def test_resumed_run_matches_the_uninterrupted_run(tiny_world, tiny_spm, tmp_path):
    full = _trainer(tiny_world, tiny_spm, tmp_path / "full", "train.num_epochs=3")
    full.train()
    part = _trainer(tiny_world, tiny_spm, tmp_path / "part", "train.num_epochs=2")
    part.train()
    resumed = _trainer(tiny_world, tiny_spm, tmp_path / "part", "train.num_epochs=3", resume="latest")
    assert resumed.epoch == 2
    resumed.train()
    assert_same_run(tmp_path / "part", tmp_path / "full")


def test_a_crash_while_saving_leaves_the_previous_checkpoint_usable(tiny_world, tiny_spm, tmp_path, monkeypatch):
    out = tmp_path / "crash"
    tr = _trainer(tiny_world, tiny_spm, out, "train.num_epochs=1")
    tr.train()
    real_save = torch.save

    def failing_save(obj, path, *a, **k):
        if "optimizer" in str(path):
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *a, **k)

    tr2 = _trainer(tiny_world, tiny_spm, out, "train.num_epochs=2", resume="latest")
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        tr2.train()
    monkeypatch.setattr(torch, "save", real_save)
    complete = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "state.json").exists())
    assert complete == ["epoch-1"]
    assert not (out / "checkpoints" / "epoch-2").exists()
    tr3 = _trainer(tiny_world, tiny_spm, out, "train.num_epochs=2", resume="latest")
    assert tr3.epoch == 1
    tr3.train()
    assert (out / "checkpoints" / "epoch-2" / "state.json").exists()


@pytest.mark.parametrize("override, message", [
    ("sample.num_candidates=1", "num_candidates must be >= 2"),
    ("sample.threshold=1.0", "sample.threshold must be < 1"),
    ("sample.threshold=-0.1", "sample.threshold must be >= 0"),
    ("train.learning_rate=inf", "train.learning_rate must be a finite number"),
    ("log.checkpointing_epochs=0", "log.checkpointing_epochs must be >= 1"),
    ("train.beta=abc", "expects float"),
    ("sample.bogus=1", "unknown"),
])
def test_bad_config_values_are_refused(tiny_world, tiny_spm, tmp_path, override, message):
    with pytest.raises(SPOError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(SPOConfig, None, tiny_spo_args(tiny_world, tiny_spm, tmp_path / "x", override))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "spo.cli", *map(str, args)], capture_output=True, text=True, timeout=600)


def test_bad_inputs_fail_clearly_and_overwrite_nothing(tiny_world, tiny_spm, tmp_path):
    args = lambda out, *e: ["train", *tiny_spo_args(tiny_world, tiny_spm, out, "train.num_epochs=1", *e)]  # noqa: E731
    cases = [
        (args(tmp_path / "a", "model.pretrained=/no/such/model"), "could not load a Stable Diffusion pipeline"),
        (args(tmp_path / "b", "sample.num_candidates=1"), "num_candidates must be >= 2"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases.append((args(tmp_path / "c", f"prompts={empty}"), "holds no prompts"))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"caption": 3}]')
    cases.append((args(tmp_path / "d", f"prompts={bad_json}"), "neither a string nor an object"))
    for argv, message in cases:
        proc = _cli(*argv)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, (argv, proc.stderr)

    out = tmp_path / "run"
    assert CliRunner().invoke(cli, args(out)).exit_code == 0
    weights = (out / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    proc = _cli(*args(out, "train.learning_rate=0.5"))
    assert proc.returncode != 0 and "already holds a run" in proc.stderr
    proc = _cli(*args(out, "train.learning_rate=0.5"), "--resume", "latest")
    assert proc.returncode != 0 and "different config" in proc.stderr and "train.learning_rate:" in proc.stderr
    assert (out / "lora" / "pytorch_lora_weights.safetensors").read_bytes() == weights
    assert CliRunner().invoke(cli, [*args(out, "train.learning_rate=0.5"), "--overwrite"]).exit_code == 0


def test_two_process_run_ends_with_identical_weights_and_resumes_in_one_process(tiny_world, tiny_spm, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # accelerate 1.x starts a single process for `--cpu --num_processes 2`; `--multi_gpu` on a machine
    # without GPUs starts two CPU processes (gloo), which is what this test needs.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "spo.cli", "train",
           *tiny_spo_args(tiny_world, tiny_spm, out, "train.num_epochs=1")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fingerprints = {p.read_text() for p in (out / "ranks").glob("rank-*.sha256")}
    assert len(list((out / "ranks").glob("rank-*.sha256"))) == 2 and len(fingerprints) == 1
    result = CliRunner().invoke(cli, ["train", *tiny_spo_args(tiny_world, tiny_spm, out, "train.num_epochs=2"),
                                      "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_non_finite_losses_are_skipped_counted_and_abort_when_they_persist(tiny_world, tiny_spm, tmp_path, monkeypatch):
    import spo.methods.spo as trainer_module

    real = trainer_module.pair_loss
    calls = {"n": 0}

    def sometimes_nan(*a, **k):
        loss, info = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 1 else loss), info

    monkeypatch.setattr(trainer_module, "pair_loss", sometimes_nan)
    tr = _trainer(tiny_world, tiny_spm, tmp_path / "one", "train.num_epochs=1")
    tr.train()
    rows = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["nonfinite_skipped"] == 1 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)

    monkeypatch.setattr(trainer_module, "pair_loss", lambda *a, **k: (torch.tensor(float("inf")), {}))
    tr = _trainer(tiny_world, tiny_spm, tmp_path / "all", "train.num_epochs=1", "train.max_nonfinite_in_a_row=2")
    with pytest.raises(SPOError, match="non-finite losses in a row"):
        tr.train()
