"""Step judges: what scores the resampler's candidates, `judge(images, captions, t) -> scores`.

(A latent step judge, `load_latent_judge`, scores the noisy latents instead: `judge(latents, conditioning, t)`.)

`images` are decoded x0-predictions in [-1, 1] (B, 3, H, W), `t` the timestep they were predicted at.
A step-aware preference model uses t; any image scorer of the registry (`spo.scorers`) can judge too,
blind to t — the paper's "naive" ablation, or, with a ground truth such as the embedded world's
utility, an oracle that separates how good the judge is from how good the algorithm is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from spo.errors import SPOError
from spo.preference.spm import SPM_CONFIG, StepAwareCLIP

SCORER_PREFIX = "scorer:"


class ScorerJudge(torch.nn.Module):
    """A registry scorer (`score(images HxWx3 in [0, 1], prompts)`) as a step judge; ignores t."""

    def __init__(self, scorer):
        super().__init__()
        self.scorer = scorer

    def forward(self, images: torch.Tensor, captions: list[str], t: torch.Tensor) -> torch.Tensor:
        pixels = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        return torch.as_tensor(self.scorer.score(pixels, list(captions)), dtype=torch.float32, device=images.device)


def load_step_judge(spec: str, device) -> torch.nn.Module:
    """`scorer:NAME[=WEIGHTS]` -> a registry scorer as judge; anything else -> an SPM / CLIP (see load_scorer_model)."""
    if spec.startswith(SCORER_PREFIX):
        from spo.scorers import load_scorer

        return ScorerJudge(load_scorer(spec[len(SCORER_PREFIX):], device=str(device)))
    from spo.plugins import resolve

    return load_scorer_model(resolve(spec)).eval().requires_grad_(False).to(device)


def load_latent_judge(spec: str, device, diffusion=None) -> torch.nn.Module:
    """A latent step judge (`spo train-latent-judge`; a dir or a plug-in path such as world:latent_judge), in
    eval mode. Several, comma-separated, make an ensemble that averages their scores (they must read the same
    input). With `diffusion`, a judge trained for another family's latents or text embeddings is refused."""
    from spo.plugins import resolve
    from spo.preference.latent_judge import LatentJudgeEnsemble, check_compatible, load_latent_judge_dir

    specs = [s.strip() for s in spec.split(",") if s.strip()]
    judges = [load_latent_judge_dir(resolve(s)) for s in specs]
    judge = judges[0] if len(judges) == 1 else LatentJudgeEnsemble(
        [m for j in judges for m in (j.members if isinstance(j, LatentJudgeEnsemble) else [j])])
    judge = judge.eval().requires_grad_(False).to(device)
    if diffusion is not None:
        text_dim = diffusion.encode_prompts([""])[0].embeds.shape[-1]
        # the latents the resampler holds (FLUX: unpacked, so not the network's in_channels)
        channels = diffusion.initial_latents(1, torch.Generator().manual_seed(0)).shape[1]
        check_compatible(judge, channels, text_dim, "the diffusion model")
    return judge


def load_scorer_model(path: str | Path, base: str | Path | None = None,
                      processor: str | Path | None = None) -> StepAwareCLIP:
    """A saved SPM, the authors' released SPM, or a plain CLIP/PickScore used as a step-unaware scorer.

    `path` is one of:

    * a directory with `spm_config.json`: an SPM saved by this package (`spo train-spm`);
    * a checkpoint released with the paper (RockeyCoss/SPO), in one of three spellings:
      - `"authors:/path/to/sd-v1-5_step-aware_preference_model.bin"` (the prefix is optional when
        the path is a file);
      - a directory without `config.json` that holds the checkpoint file (named
        `sd-v1-5_step-aware_preference_model.bin`, `sdxl_step-aware_preference_model.bin` or
        `final_ckpt.bin`, or the only `*.bin`/`*.pt`/`*.pth`/`*.safetensors` file there) and,
        optionally, `base/` (a copy of or link to yuvalkirstain/PickScore_v1) and `processor/`
        (laion/CLIP-ViT-H-14-laion2B-s32B-b79K, for the tokenizer and image processor);
    * any other CLIP/PickScore checkpoint (hub id or directory): the paper's "naive" ablation, the
      base preference model judging noisy x0-predictions as if they were clean (no conditioning).

    Authors' layout: one torch pickle (`torch.save`, fp32, written by DeepSpeed's zero_to_fp32) of
    the whole wrapped model's state dict: every CLIP weight (the SPM fine-tunes the whole PickScore,
    text tower included) under `model.` plus `model.t_embedder.mlp.{0,2}.*` (timestep MLP),
    `model.vision_model.encoder.layers.<i>.adaLN_modulation.1.*` (per-block shift/scale/gate) and
    `model.vision_model.adaLN_modulation.1.*` (pooled shift/scale). It holds no config, tokenizer or
    processor: those come from `base` (default: `base/` next to the checkpoint, else the hub's
    yuvalkirstain/PickScore_v1; only its config.json is read) and `processor` (default: `processor/`
    next to the checkpoint, else a local `base` that has a preprocessor_config.json, else
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K), the repositories the authors build it from. `base` and
    `processor` may be "PREFIX:NAME" plug-in paths. Examples:

        load_scorer_model("authors:model_ckpts/sd-v1-5_step-aware_preference_model.bin")  # hub base
        load_scorer_model("model_ckpts/sdxl_step-aware_preference_model.bin", base="/models/PickScore_v1",
                          processor="/models/CLIP-ViT-H-14")
        load_scorer_model("/models/spm_sd15")  # holds the .bin and base/ (and processor/)

    The result (preprocessing="authors") gives the authors' `get_preference_score` to float
    rounding: feed the raw scheduler timestep t in [0, 1000) (0 for the final, clean image), as
    their sampler does. `.save_pretrained(dir)` converts it to this package's format for good.
    Wrong or missing files raise SPOError with a one-line reason and fix.
    """
    from spo.preference import authors_checkpoint as authors

    located = authors.locate(path, base=base, processor=processor)
    if located is not None:
        return authors.load_authors_spm(*located)
    if base is not None or processor is not None:
        raise SPOError(f"{path} is not an authors' SPM checkpoint, so base/processor do not apply; "
                       "pass the checkpoint file (e.g. authors:/path/to/sd-v1-5_step-aware_preference_model.bin)")
    if (Path(path) / SPM_CONFIG).is_file():
        return StepAwareCLIP.from_pretrained(path)
    return StepAwareCLIP.from_base(path, time_conditioned=False)
