"""The latent step judge: a small network that scores a NOISY LATENT x_t directly (issue #14), or the latent
x0-prediction of it (`reads="x0"`: the scoring network call stays, the decode and the CLIP tower go).

The pixel SPM needs, for every candidate, a guided network call, a VAE decode and a CLIP image tower;
this judge reads the candidate latent at its own noise level t and the diffusion model's own text
conditioning (`Conditioning.embeds`, (B, L, D)), so it needs neither a decode nor a text model. It works
for every family: SD, SDXL, SD3 and FLUX embeddings differ only in L and D, which the config records.

Architecture: a conv stem, a few GroupNorm ResNet blocks (average-pooled between stages), each modulated
FiLM-style by one conditioning vector = MLP(sinusoidal t) + MLP(attention-pooled text); a global pool;
the score is the dot product of an image projection and a text projection, so it depends on the prompt
as PickScore's does (the text projection's bias carries a prompt-independent quality term).

Saved format (a directory): `latent_judge_config.json` + `latent_judge.safetensors`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spo.errors import SPOError
from spo.preference.spm import timestep_features, zero_linear

LATENT_JUDGE_CONFIG = "latent_judge_config.json"
LATENT_JUDGE_WEIGHTS = "latent_judge.safetensors"
LATENT_JUDGE_ENSEMBLE = "latent_judge_ensemble.json"  # an ensemble directory: {"members": [subdir, ...]}
LATENT_JUDGE_FORMAT = 1
JUDGE_READS = ("noisy", "x0")


@dataclass
class LatentJudgeConfig:
    latent_channels: int = 4  # C of the diffusion model's latents
    text_dim: int = 768  # D of its Conditioning.embeds
    text_tokens: int = 77  # L of its Conditioning.embeds (recorded; the attention pool takes any L)
    widths: list = field(default_factory=lambda: [32, 64, 64])  # channels per stage; 2x average pool between
    blocks_per_stage: int = 1
    cond_dim: int = 128  # the FiLM conditioning vector (t and text)
    embed_dim: int = 64  # the shared image/text space of the final dot product
    freq_dim: int = 128  # sinusoidal features of t
    num_train_timesteps: int = 1000
    diffusion_model: str = ""  # what its latents and embeddings come from, as the user named it ("world:sd")
    # what it scores: "noisy" = a candidate latent at its own noise level t; "x0" = the guided x0-prediction of
    # the candidate at t (the resampler's scoring network call is made, the decode and the CLIP tower are not)
    reads: str = "noisy"
    format: int = LATENT_JUDGE_FORMAT


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class FiLMResBlock(nn.Module):
    """GroupNorm → SiLU → conv, FiLM (scale, shift) from the conditioning vector, → conv, residual.

    The FiLM layer starts at zero, so a fresh block is a plain ResNet block until t and the text matter."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.film = zero_linear(cond_dim, 2 * c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class TextPool(nn.Module):
    """(B, L, D) token embeddings -> (B, D): softmax attention over tokens (a learned score per token),
    then LayerNorm, so that every family's embeddings (CLIP, T5) arrive at one scale."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        weights = self.score(tokens).softmax(dim=1)
        return self.norm((weights * tokens).sum(dim=1))


class LatentStepJudge(nn.Module):
    """`judge(latents (B, C, H, W), text (B, L, D) or a Conditioning, t (B,)) -> scores (B,)`, higher = preferred."""

    def __init__(self, config: LatentJudgeConfig):
        super().__init__()
        self.config = c = config
        self.text_pool = TextPool(c.text_dim)
        self.time_mlp = nn.Sequential(nn.Linear(c.freq_dim, c.cond_dim), nn.SiLU(), nn.Linear(c.cond_dim, c.cond_dim))
        self.text_mlp = nn.Sequential(nn.Linear(c.text_dim, c.cond_dim), nn.SiLU(), nn.Linear(c.cond_dim, c.cond_dim))
        self.stem = nn.Conv2d(c.latent_channels, c.widths[0], 3, padding=1)
        blocks, widths = [], [c.widths[0], *c.widths]
        for stage in range(len(c.widths)):
            for j in range(c.blocks_per_stage):
                blocks.append(FiLMResBlock(widths[stage] if j == 0 else widths[stage + 1], widths[stage + 1],
                                           c.cond_dim))
        self.blocks = nn.ModuleList(blocks)
        self.out_norm = nn.GroupNorm(_groups(c.widths[-1]), c.widths[-1])
        self.image_proj = nn.Linear(c.widths[-1], c.embed_dim)
        self.text_proj = nn.Linear(c.text_dim, c.embed_dim)

    def forward(self, latents: torch.Tensor, text, t: torch.Tensor) -> torch.Tensor:
        embeds = getattr(text, "embeds", text)  # a Conditioning, or its embeddings
        dtype = self.stem.weight.dtype
        text_vec = self.text_pool(embeds.to(dtype))
        t = torch.as_tensor(t, device=latents.device).expand(len(latents))
        cond = F.silu(self.time_mlp(timestep_features(t, self.config.freq_dim).to(dtype)) + self.text_mlp(text_vec))
        h = self.stem(latents.to(dtype))
        for i, block in enumerate(self.blocks):
            if i and i % self.config.blocks_per_stage == 0 and min(h.shape[-2:]) >= 2:
                h = F.avg_pool2d(h, 2)  # a new stage: half the resolution
            h = block(h, cond)
        image = self.image_proj(F.silu(self.out_norm(h)).mean(dim=(2, 3)))
        return (image * self.text_proj(text_vec)).sum(-1) / math.sqrt(self.config.embed_dim)

    # ------------------------------------------------------------ files

    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / LATENT_JUDGE_WEIGHTS))
        (directory / LATENT_JUDGE_CONFIG).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "LatentStepJudge":
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / LATENT_JUDGE_CONFIG).is_file():
            raise SPOError(f"{directory} is not a latent step judge (no {LATENT_JUDGE_CONFIG}); train one with "
                           f"`spo train-latent-judge`")
        try:
            config = LatentJudgeConfig(**json.loads((directory / LATENT_JUDGE_CONFIG).read_text()))
        except (TypeError, ValueError) as exc:
            raise SPOError(f"{directory / LATENT_JUDGE_CONFIG} is not a valid latent judge config ({exc})") from None
        if config.reads not in JUDGE_READS:
            raise SPOError(f"{directory / LATENT_JUDGE_CONFIG}: reads={config.reads!r}; expected one of {JUDGE_READS}")
        if config.format > LATENT_JUDGE_FORMAT:
            raise SPOError(f"{directory} was written by a newer spo (format {config.format}); upgrade spo")
        model = cls(config)
        try:
            model.load_state_dict(load_file(str(directory / LATENT_JUDGE_WEIGHTS)))
        except (OSError, RuntimeError) as exc:
            raise SPOError(f"cannot load {directory / LATENT_JUDGE_WEIGHTS}: {str(exc).splitlines()[0][:200]}") from None
        return model


class LatentJudgeEnsemble(nn.Module):
    """The mean score of several latent judges that read the same input (`reads`, latent channels, text dim).

    Why: two trainings of one distillation recipe, differing only in their random draws, agree with the
    teacher equally well yet steered SPO differently, so averaging draws is the obvious remedy to try. Measured
    on the world it did not help (the mean of two base-only distilled judges: docs/results.md section 2.3;
    their errors on a tuned policy's latents are alike — an on-policy round, `distill.policies`, did help).
    Cost: one judge call per member.

    Saved format (a directory): `latent_judge_ensemble.json` (`{"members": [...]}`) + one judge dir per member.
    """

    def __init__(self, members: list[LatentStepJudge]):
        super().__init__()
        if not members:
            raise SPOError("a latent judge ensemble needs at least one member")
        first = members[0].config
        for m in members[1:]:
            c = m.config
            if (c.reads, c.latent_channels, c.text_dim) != (first.reads, first.latent_channels, first.text_dim):
                raise SPOError(f"latent judge ensemble members must read the same input: reads/channels/text dim "
                               f"{(first.reads, first.latent_channels, first.text_dim)} vs "
                               f"{(c.reads, c.latent_channels, c.text_dim)}")
        self.members = nn.ModuleList(members)

    @property
    def config(self) -> LatentJudgeConfig:
        return self.members[0].config  # what the resampler and compatibility checks read (shared by all members)

    def forward(self, latents: torch.Tensor, text, t: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(latents, text, t) for member in self.members]).mean(0)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        names = [f"member_{i}" for i in range(len(self.members))]
        for name, member in zip(names, self.members):
            member.save_pretrained(directory / name)
        (directory / LATENT_JUDGE_ENSEMBLE).write_text(json.dumps({"members": names}, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "LatentJudgeEnsemble":
        directory = Path(directory)
        try:
            names = json.loads((directory / LATENT_JUDGE_ENSEMBLE).read_text())["members"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SPOError(f"{directory / LATENT_JUDGE_ENSEMBLE} is not a valid latent judge ensemble ({exc})") from None
        return cls([LatentStepJudge.from_pretrained(directory / name) for name in names])


def load_latent_judge_dir(directory: str | Path) -> "LatentStepJudge | LatentJudgeEnsemble":
    """A saved latent judge or ensemble directory (CPU, fp32, as saved)."""
    if (Path(directory) / LATENT_JUDGE_ENSEMBLE).is_file():
        return LatentJudgeEnsemble.from_pretrained(directory)
    return LatentStepJudge.from_pretrained(directory)


def is_latent_judge(directory: str | Path) -> bool:
    return (Path(directory) / LATENT_JUDGE_CONFIG).is_file() or (Path(directory) / LATENT_JUDGE_ENSEMBLE).is_file()


def check_compatible(judge: LatentStepJudge, latent_channels: int, text_dim: int, where: str) -> None:
    """A judge trained on another family's latents or embeddings fails here, in one line, not mid-sampling."""
    c = judge.config
    if (c.latent_channels, c.text_dim) != (latent_channels, text_dim):
        raise SPOError(f"the latent judge expects {c.latent_channels}-channel latents and {c.text_dim}-dim text "
                       f"embeddings (trained on {c.diffusion_model or 'another model'}), but {where} gives "
                       f"{latent_channels} and {text_dim}; train one for it with `spo train-latent-judge`")
