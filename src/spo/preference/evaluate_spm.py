"""Pairwise accuracy of preference models on noisy x0-predictions, per timestep (`spo evaluate-spm`).

For each t, both images of every held-out pair get the same noise, one CFG denoising step and a
decode (shared by all models); each model scores the two x0-predictions; accuracy is the fraction
of decided (non-tie) pairs it orders like the label. A caller (or a plug-in, through
`spo.plugins.spm_references`) can add reference judges scored on the same x0-predictions, and a
label-noise ceiling; the embedded world adds the ground-truth utility as both.

Latent step judges (`latent_judges`) score what they would score in the resampler: the noisy latent x_t
itself, with the same noise at the same t (no guided step, no decode), beside the pixel models' x0-predictions
of that same x_t.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from spo.errors import SPOError
from spo.evaluation import label_accuracy
from spo.files import atomic_write_text

DEFAULT_TIMESTEPS = (0, 250, 500, 750, 950)

# judge(x0-predictions as NCHW in [-1, 1], captions) -> one score per image, higher = preferred
Judge = Callable[[torch.Tensor, list[str]], list[float]]


def build_models(base: str, processor: str, spm_dirs: list[str]) -> dict:
    """The models `spo evaluate-spm` compares, in eval mode: the base CLIP/PickScore used naively (no
    timestep), then each step-aware model; paths may be plug-in names ("world:spm")."""
    from spo.plugins import resolve
    from spo.preference.spm import StepAwareCLIP

    models = {"base (naive)": StepAwareCLIP.from_base(resolve(base), resolve(processor) or None, time_conditioned=False)}
    names = [Path(d).name for d in spm_dirs]
    for d in spm_dirs:
        label = "SPM" if len(spm_dirs) <= 1 else f"SPM {Path(d).name if names.count(Path(d).name) == 1 else d}"
        models[label] = StepAwareCLIP.from_pretrained(resolve(str(d)))
    for m in models.values():
        m.eval()
    return models


def check_timesteps(timesteps, diffusion) -> None:
    n = diffusion.scheduler.config.num_train_timesteps
    if any(not 0 <= t < n for t in timesteps):
        raise SPOError(f"--timesteps must lie in [0, {n})")


def first_pairs(dataset, max_pairs: int | None):
    """The pairs evaluated: the first `max_pairs` (all when None)."""
    return dataset.select(range(min(len(dataset), max_pairs))) if max_pairs else dataset


@torch.no_grad()
def evaluate_spm(models: dict, diffusion, dataset, timesteps=DEFAULT_TIMESTEPS, batch_size: int = 32,
                 guidance: float = 5.0, seed: int = 0, max_pairs: int | None = None,
                 reference_judges: dict[str, Judge] | None = None, ceiling: float | None = None,
                 latent_judges: dict | None = None) -> dict:
    """Accuracy per timestep of every model, reference judge and latent judge. `ceiling` is the accuracy of the
    truth behind the labels on the same pairs (see `first_pairs`), reported beside them as "ceiling_true_utility"."""
    from spo.preference.data import PairCollator
    from spo.preference.noising import noisy_latents, x0_images_of

    rows = first_pairs(dataset, max_pairs)
    reference_judges, latent_judges = reference_judges or {}, latent_judges or {}
    collate = PairCollator(diffusion.resolution)
    batches = [b for b in (collate([rows[j] for j in range(i, min(i + batch_size, len(rows)))])
                           for i in range(0, len(rows), batch_size)) if b is not None]
    labels = torch.cat([b["labels"][:, 0] for b in batches]).numpy()
    result = {"timesteps": list(timesteps), "n_pairs": int(len(labels)), "ties": float((labels == 0.5).mean()),
              "accuracy": {name: [] for name in [*models, *reference_judges, *latent_judges]}}
    if ceiling is not None:
        result["ceiling_true_utility"] = ceiling
    for t_value in timesteps:
        gen = torch.Generator().manual_seed(seed + int(t_value))
        scores = {name: ([], []) for name in result["accuracy"]}
        x0_pairs, captions = [], []  # x0-predictions kept for the reference judges
        for b in batches:
            t = torch.full((len(b["captions"]),), int(t_value), dtype=torch.long)
            x_t, t2 = noisy_latents(diffusion, b["img0"], b["img1"], t, gen)
            x0_0, x0_1 = x0_images_of(diffusion, x_t, t2, b["captions"], guidance)
            for name, judge in latent_judges.items():
                s0, s1 = _latent_pair_scores(judge, diffusion, x_t, b["captions"], t)
                scores[name][0].append(s0), scores[name][1].append(s1)
            for name, model in models.items():
                dev = next(model.parameters()).device
                scores[name][0].append(model(x0_0.to(dev), b["captions"], t.to(dev)).float().cpu())
                scores[name][1].append(model(x0_1.to(dev), b["captions"], t.to(dev)).float().cpu())
            if reference_judges:
                x0_pairs.append((x0_0, x0_1))
                captions += b["captions"]
        for name, judge in reference_judges.items():  # one pass over all pairs (a judge may run in parallel)
            scores[name] = _judge_pairs(judge, x0_pairs, captions)
        for name, (s0, s1) in scores.items():
            result["accuracy"][name].append(label_accuracy(torch.cat(s0).numpy(), torch.cat(s1).numpy(), labels))
    return result


def _latent_pair_scores(judge, diffusion, x_t, captions: list[str], t) -> tuple[torch.Tensor, torch.Tensor]:
    """A latent judge's scores of both halves of the stacked x_t (the noisy latents, no decode)."""
    dev = next(judge.parameters()).device
    cond, _ = diffusion.encode_prompts(captions)
    x0, x1 = x_t.chunk(2)
    score = lambda x: judge(x.to(dev), cond.to(dev), t.to(dev)).float().cpu()  # noqa: E731
    return score(x0), score(x1)


def build_latent_judges(paths: list[str]) -> dict:
    """Latent step judges by label, in eval mode; paths may be plug-in names ("world:latent_judge")."""
    from spo.plugins import resolve
    from spo.preference.latent_judge import LatentStepJudge

    names = [Path(p).name for p in paths]
    judges = {}
    for p in paths:
        name = Path(p).name if names.count(Path(p).name) == 1 else p
        label = "latent judge (noisy x_t)" if len(paths) <= 1 else f"latent judge {name}"
        judges[label] = LatentStepJudge.from_pretrained(resolve(str(p))).eval()
    return judges


def _judge_pairs(judge: Judge, x0_pairs: list, captions: list[str]) -> tuple[list, list]:
    if not captions:
        return [], []
    s0 = judge(torch.cat([a for a, _ in x0_pairs]), captions)
    s1 = judge(torch.cat([b for _, b in x0_pairs]), captions)
    return [torch.tensor(s0)], [torch.tensor(s1)]


def write_report(result: dict, out: Path, title: str = "Preference accuracy vs timestep") -> dict[str, Path]:
    """accuracy.json, accuracy.md (table) and accuracy.png (plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "accuracy.json", json.dumps(result, indent=2))
    ts = result["timesteps"]
    lines = ["| model | " + " | ".join(f"t={t}" for t in ts) + " |", "|---|" + "---|" * len(ts)]
    for name, accs in result["accuracy"].items():
        lines.append(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
    if "ceiling_true_utility" in result:
        c = result["ceiling_true_utility"]
        lines.append("| label-noise ceiling (true utility, clean images) | " + " | ".join(f"{c:.3f}" for _ in ts) + " |")
    note = f"\n{result['n_pairs']} held-out pairs ({result['ties']:.0%} ties, excluded from accuracy).\n"
    atomic_write_text(out / "accuracy.md", f"# {title}\n\n" + "\n".join(lines) + "\n" + note)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, accs in result["accuracy"].items():
        ax.plot(ts, accs, marker="o", label=name)
    if "ceiling_true_utility" in result:
        ax.axhline(result["ceiling_true_utility"], color="gray", ls="--", label="label-noise ceiling")
    ax.axhline(0.5, color="black", lw=0.5)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("pairwise accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
    return {k: out / f"accuracy.{k}" for k in ("json", "md", "png")}
