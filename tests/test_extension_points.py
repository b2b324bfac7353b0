"""The seams the architecture promises: a new method and a new model family plug in without library edits."""

import torch
from torch import nn

from conftest import tiny_spo_args
from spo.config import SPOConfig, load_config
from spo.methods import METHODS, register_method
from spo.methods.spo import pair_loss, transition_inputs
from spo.models import Conditioning
from spo.resampler import resample
from spo.sampling import gaussian_log_prob
from spo.trainer import Trainer


# ------------------------------------------------------------------ a third method, defined here


class PullTowardsReference:
    """A toy method: random latents, loss = squared distance of the policy's output from reference + 0.1."""

    def __init__(self, cfg):
        self.cfg, self.batches_seen = cfg, 0

    def load_data(self, trainer):
        trainer.dataset_size = 4

    def load_models(self, trainer):
        pass

    def batches(self, trainer, epoch, start=0):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(2):
            x = torch.randn((2, 4, 16, 16), generator=g)
            t = torch.tensor([500, 100])
            cond, uncond = trainer.diffusion.encode_prompts(["a red circle", "a blue square"])
            self.batches_seen += 1
            yield x, t, cond, uncond

    def loss(self, trainer, batch):
        x, t, cond, uncond = batch
        ref = trainer.reference_output(x, t, cond, uncond, 1.0)
        out = trainer.diffusion.guided_output(x, t, cond, uncond, 1.0, model=trainer.unet)
        return ((out - ref - 0.1) ** 2).mean(), {"toy": 1.0}

    def epoch_metrics(self):
        return {"batches_seen": self.batches_seen}


def test_a_method_registered_from_outside_the_library_trains(tiny_world, tiny_spm, tmp_path):
    register_method("toy", PullTowardsReference)
    try:
        cfg = load_config(SPOConfig, None, tiny_spo_args(tiny_world, tiny_spm, tmp_path / "toy", "method=toy",
                                                          "train.num_epochs=1"))
        tr = Trainer(cfg, log=lambda m: None).setup()
        before = [p.detach().clone() for p in tr.trainable]
        tr.train()
        assert tr.method.batches_seen == 2 and tr.global_step == 2
        assert all(not torch.equal(a, b.detach()) for a, b in zip(before, tr.trainable))
        assert (tmp_path / "toy" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    finally:
        METHODS.pop("toy")


# ------------------------------------------------------------------ a model family, defined here


class TinyDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.text = nn.Linear(3, 2)

    def forward(self, x, t, embeds):
        return self.conv(x) + self.text(embeds.mean(1))[:, :, None, None] * (t.float()[:, None, None, None] / 1000)


class StubFamily:
    """A made-up family: 2-channel 4x4 latents, a Gaussian step x -> x - 0.2·out with std 0.1·(t/1000)."""

    def __init__(self):
        self.denoiser = TinyDenoiser()
        self.device = torch.device("cpu")

    def encode_prompts(self, prompts):
        emb = torch.stack([torch.full((5, 3), float(len(p)) / 10) for p in prompts])
        return Conditioning(emb), Conditioning(torch.zeros_like(emb))

    def guided_output(self, x, t, cond, uncond, guidance, model=None):
        model = model or self.denoiser
        out_c, out_u = model(x, t, cond.embeds), model(x, t, uncond.embeds)
        return out_u + guidance * (out_c - out_u)

    def schedule(self, num_steps):
        ts = torch.linspace(900, 100, num_steps).long().tolist()
        return list(zip(ts, ts[1:] + [-1]))

    def initial_latents(self, batch, generator):
        return torch.randn((batch, 2, 4, 4), generator=generator)

    def transition(self, out, t, t_prev, x, eta):
        std = (0.1 * t.float() / 1000).view(-1, 1, 1, 1).expand_as(x)
        return x - 0.2 * out, std, x - out

    def x0_images(self, x, t, cond, uncond, guidance, model=None):
        out = self.guided_output(x, t, cond, uncond, guidance, model)
        return self.decode(x - out), out

    def decode(self, latents):
        return latents.repeat(1, 2, 1, 1)[:, :3].tanh()  # "images" in [-1, 1]


def test_a_stub_model_family_runs_the_resampler_and_the_spo_loss_unchanged():
    fam = StubFamily()
    judge_calls = []

    def judge(images, captions, t):
        judge_calls.append(int(t[0]))
        return images.mean(dim=(1, 2, 3)) * 10

    result = resample(fam, judge, ["a", "bb", "ccc"], num_steps=5, guidance=2.0, eta=1.0, num_candidates=3,
                      threshold=0.0, divert_start_step=1, generator=torch.Generator().manual_seed(0))
    pairs = result.pairs
    assert len(pairs) > 0 and pairs.win.shape[1:] == (2, 4, 4)
    assert set(pairs.timesteps.tolist()) <= {t for t, _ in fam.schedule(5)[1:]}
    assert judge_calls[-1] == 0  # the last candidates are judged as clean samples

    policy = TinyDenoiser()
    policy.load_state_dict(fam.denoiser.state_dict())
    with torch.no_grad():
        policy.conv.bias.add_(0.05)
    cond, uncond = fam.encode_prompts(["a", "bb", "ccc"])
    cond, uncond = cond[pairs.prompt_index], uncond[pairs.prompt_index]
    x, t, t_prev, c, u, _ = transition_inputs(pairs, cond, uncond)
    with torch.no_grad():
        ref = fam.guided_output(x, t, c, u, 2.0)
    loss, info = pair_loss(fam, policy, ref, pairs, cond, uncond, 2.0, 1.0, beta=10.0, eps=0.1)
    loss.backward()
    assert torch.isfinite(loss) and policy.conv.weight.grad.abs().sum() > 0

    # the closed-form log-ratio equals the difference of the two Gaussian log-probs of this family's step
    with torch.no_grad():
        mean_p, std, _ = fam.transition(fam.guided_output(x, t, c, u, 2.0, policy), t, t_prev, x, 1.0)
        mean_r, _, _ = fam.transition(ref, t, t_prev, x, 1.0)
    n = len(pairs)
    direct = gaussian_log_prob(pairs.win.double(), mean_p[:n].double(), std[:n].double()) - \
        gaussian_log_prob(pairs.win.double(), mean_r[:n].double(), std[:n].double())
    torch.testing.assert_close(info["log_ratio_win"].double(), direct, rtol=1e-3, atol=1e-6)
