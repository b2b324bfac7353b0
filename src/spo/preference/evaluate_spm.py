"""Pairwise accuracy of preference models on noisy x0-predictions, per timestep (`spo evaluate-spm`).

For each t, both images of every held-out pair get the same noise, one CFG denoising step and a
decode (shared by all models); each model scores the two x0-predictions; accuracy is the fraction
of decided (non-tie) pairs it orders like the label. On the embedded world two references are added:
the ground-truth utility of the clean images on the same noisy labels (the label-noise ceiling),
and the utility applied to the x0-predictions themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DEFAULT_TIMESTEPS = (0, 250, 500, 750, 950)


@torch.no_grad()
def evaluate_spm(models: dict, diffusion, dataset, timesteps=DEFAULT_TIMESTEPS, batch_size: int = 32,
                 guidance: float = 5.0, seed: int = 0, max_pairs: int | None = None) -> dict:
    from spo.preference.data import PairCollator
    from spo.preference.train_spm import noisy_x0_images
    from spo.world.labels import label_accuracy

    rows = dataset.select(range(min(len(dataset), max_pairs))) if max_pairs else dataset
    collate = PairCollator(diffusion.resolution)
    batches = [b for b in (collate([rows[j] for j in range(i, min(i + batch_size, len(rows)))])
                           for i in range(0, len(rows), batch_size)) if b is not None]
    labels = torch.cat([b["labels"][:, 0] for b in batches]).numpy()
    has_truth = "utility_0" in rows.column_names
    in_world = has_truth and _all_in_world_grammar(rows["caption"])
    result = {"timesteps": list(timesteps), "n_pairs": int(len(labels)), "ties": float((labels == 0.5).mean()),
              "accuracy": {name: [] for name in models}}
    if has_truth:
        result["ceiling_true_utility"] = label_accuracy(rows["utility_0"], rows["utility_1"], rows["label_0"])
    if in_world:
        result["accuracy"]["utility on x0-prediction"] = []
    for t_value in timesteps:
        gen = torch.Generator().manual_seed(seed + int(t_value))
        scores = {name: ([], []) for name in result["accuracy"]}
        world_images, world_captions = [], []  # x0-predictions to judge with the true utility
        for b in batches:
            t = torch.full((len(b["captions"]),), int(t_value), dtype=torch.long)
            x0_0, x0_1 = noisy_x0_images(diffusion, b["img0"], b["img1"], b["captions"], t, guidance, gen)
            for name, model in models.items():
                dev = next(model.parameters()).device
                scores[name][0].append(model(x0_0.to(dev), b["captions"], t.to(dev)).float().cpu())
                scores[name][1].append(model(x0_1.to(dev), b["captions"], t.to(dev)).float().cpu())
            if in_world:
                world_images.append((x0_0, x0_1))
                world_captions += b["captions"]
        if world_captions:  # one parallel pass over all pairs
            u0 = _utilities(torch.cat([a for a, _ in world_images]), world_captions)
            u1 = _utilities(torch.cat([b for _, b in world_images]), world_captions)
            scores["utility on x0-prediction"] = ([torch.tensor(u0)], [torch.tensor(u1)])
        for name, (s0, s1) in scores.items():
            result["accuracy"][name].append(label_accuracy(torch.cat(s0).numpy(), torch.cat(s1).numpy(), labels))
    return result


def _all_in_world_grammar(captions) -> bool:
    from spo.world.scenes import parse_caption

    return all(parse_caption(c) is not None for c in captions)


def _utilities(images: torch.Tensor, captions: list[str]) -> list[float]:
    from spo.world.build import utilities

    arr = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    if arr.shape[1] != 32:
        return [float("nan")] * len(captions)
    return utilities(arr, captions).tolist()


def write_report(result: dict, out: Path, title: str = "Preference accuracy vs timestep") -> dict[str, Path]:
    """accuracy.json, accuracy.md (table) and accuracy.png (plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(result, indent=2))
    ts = result["timesteps"]
    lines = ["| model | " + " | ".join(f"t={t}" for t in ts) + " |", "|---|" + "---|" * len(ts)]
    for name, accs in result["accuracy"].items():
        lines.append(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
    if "ceiling_true_utility" in result:
        c = result["ceiling_true_utility"]
        lines.append("| label-noise ceiling (true utility, clean images) | " + " | ".join(f"{c:.3f}" for _ in ts) + " |")
    note = f"\n{result['n_pairs']} held-out pairs ({result['ties']:.0%} ties, excluded from accuracy).\n"
    (out / "accuracy.md").write_text(f"# {title}\n\n" + "\n".join(lines) + "\n" + note)

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
