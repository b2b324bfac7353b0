"""Benchmark 1: quality per unit of training compute on the embedded world — SPO vs Diffusion-DPO vs base.

Each method trains with the same model, LoRA and optimizer settings (configs/world.yaml and
configs/world_dpo.yaml); a snapshot every few epochs is evaluated on held-out prompts by the
ground-truth utility (which no method trains on), the world PickScore and the SPM at t=0 (SPO's
training judge). Reported: the curves against compute (UNet forward-equivalents and wall time),
the compute each method needs to reach Diffusion-DPO's best utility, the proxy–truth gap, and
sample diversity.

    python benchmarks/quality_per_compute.py              # full run (~40 min on 2 CPU cores)
    python benchmarks/quality_per_compute.py --quick      # a few minutes; what CI runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from world_runs import (  # noqa: E402
    evaluate_lora, machine, markdown_table, summary_row, train_with_snapshots,
)

ROOT = Path(__file__).resolve().parents[1]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budget: checks that everything runs")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-quality", help="training runs go here")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--every", type=int, default=5, help="snapshot every N epochs")
    p.add_argument("--prompts", type=int, default=128, help="held-out prompts for evaluation")
    p.add_argument("--dpo-betas", default="2000,500", help="Diffusion-DPO beta values; the best one is the baseline")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def runs(args) -> list[tuple[str, str, list[str]]]:
    common = [f"train.num_epochs={args.epochs}", f"train.seed={args.seed}"]
    quick = ["sample.batch_size=4", "dpo.pairs_per_epoch=32"] if args.quick else []
    out = [("SPO", str(ROOT / "configs" / "world.yaml"), common + quick)]
    for beta in args.dpo_betas.split(","):
        out.append((f"Diffusion-DPO β={beta}", str(ROOT / "configs" / "world_dpo.yaml"), common + quick + [f"dpo.beta={beta}"]))
    return out


def compute_to_reach(rows: list[dict], target: float, key: str) -> float | None:
    """Compute of the first snapshot whose mean utility reaches `target` (None if none does)."""
    for r in sorted(rows, key=lambda r: r[key]):
        if r["epoch"] > 0 and r["utility"] >= target:
            return r[key]
    return None


def main(argv=None) -> dict:
    from spo.files import atomic_write_text
    from spo.prompts import load_prompts
    from spo.world import open_world

    args = parse(argv)
    if args.quick:
        args.epochs, args.every, args.prompts, args.dpo_betas = 2, 1, 8, args.dpo_betas.split(",")[0]
    world = open_world()
    prompts = load_prompts("world:test")[: args.prompts]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    base = evaluate_lora(world, None, prompts, diversity_prompts=min(16, len(prompts)))
    base_snap = dict(epoch=0, seconds=0.0, forward_rows=0, train_rows=0)
    rows = [summary_row("base", base_snap, base, base)]
    finals = {}
    for name, config, overrides in runs(args):
        slug = name.split()[0].lower() + ("-" + name.split("=")[1] if "=" in name else "")
        snaps = train_with_snapshots(config, overrides, args.work / slug, args.every, log=lambda m: None)
        for snap in snaps[1:]:
            scores = evaluate_lora(world, snap["lora"], prompts, diversity_prompts=min(16, len(prompts)))
            rows.append(summary_row(name, snap, scores, base))
            finals[name] = scores
            print(f"[quality] {name} epoch {snap['epoch']}: utility {rows[-1]['utility']:.3f}", flush=True)
    result = dict(machine=machine(), seed=args.seed, prompts=f"world:test, first {len(prompts)}", quick=args.quick,
                  sampler=dict(steps=20, guidance=5.0, eta=0.0, seed=10_000), rows=rows,
                  command="python benchmarks/quality_per_compute.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  total_seconds=round(time.time() - started, 1))
    result["reach"] = reach_table(rows)
    stem = "quality_per_compute" + ("_quick" if args.quick else "")
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=2))
    plot(rows, args.out / f"{stem}.png")
    grid(base, finals, prompts, args.out / f"{stem}_samples.png")
    atomic_write_text(args.out / f"{stem}.md", render(result, stem))
    print((args.out / f"{stem}.md").read_text())
    return result


def reach_table(rows: list[dict]) -> dict:
    dpo = [r for r in rows if r["run"].startswith("Diffusion-DPO")]
    spo = [r for r in rows if r["run"] == "SPO"]
    if not dpo or not spo:
        return {}
    best = max(dpo, key=lambda r: r["utility"])
    out = dict(dpo_best_run=best["run"], dpo_best_epoch=best["epoch"], dpo_best_utility=best["utility"])
    for key in ("forward_equivalents", "seconds"):
        spo_cost = compute_to_reach(spo, best["utility"], key)
        dpo_cost = compute_to_reach([r for r in dpo if r["run"] == best["run"]], best["utility"], key)
        out[key] = dict(spo=spo_cost, dpo=dpo_cost,
                        ratio=(dpo_cost / spo_cost) if spo_cost and dpo_cost else None)
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    base = next(r for r in rows if r["run"] == "base")
    for name in dict.fromkeys(r["run"] for r in rows if r["run"] != "base"):
        rs = sorted([r for r in rows if r["run"] == name], key=lambda r: r["epoch"])
        for ax, key, label in ((axes[0], "forward_equivalents", "UNet forward-equivalents"),
                               (axes[1], "seconds", "training wall time (s)")):
            ax.plot([0] + [r[key] for r in rs], [base["utility"]] + [r["utility"] for r in rs], "o-", label=name)
            ax.set_xlabel(label)
            ax.set_ylabel("ground-truth utility (held-out prompts)")
        axes[2].plot([base["effect_utility"]] + [r["effect_utility"] for r in rs],
                     [base["effect_spm"]] + [r["effect_spm"] for r in rs], "o-", label=name)
    lim = axes[2].get_xlim()
    axes[2].plot(lim, lim, "k:", lw=1, label="proxy gain = true gain")
    axes[2].set_xlabel("true gain (utility, base std units)")
    axes[2].set_ylabel("proxy gain (SPM t=0, base std units)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Quality per training compute on the embedded world")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grid(base: dict, finals: dict, prompts: list[str], path: Path) -> None:
    from spo.plots import captioned_grid

    k = min(8, len(prompts))
    images, labels = [], []
    for name, scores in [("base", base), *finals.items()]:
        for i in range(k):
            images.append(scores["images"][i])
            labels.append(f"{name.split()[0]} u={scores['utility'][i]:.2f}: {prompts[i]}")
    captioned_grid(images, labels, path, cols=k, title="same seeds; one row per model (final snapshot); u = true utility")


def render(r: dict, stem: str) -> str:
    cols = [("run", "run", ""), ("epoch", "epoch", "d"), ("train s", "seconds", ".0f"),
            ("UNet fwd-equiv", "forward_equivalents", ",d"), ("utility", "utility", ".3f"),
            ("Δ utility vs base [95% CI]", "utility_gain_ci95", "+.3f"), ("win rate", "win_rate", ".2f"),
            ("world PickScore", "pickscore", ".2f"), ("SPM t=0", "spm_t0", ".2f"), ("diversity", "diversity", ".3f")]
    reach = r.get("reach", {})
    lines = [f"# Quality per compute: SPO vs Diffusion-DPO on the embedded world{' (quick)' if r['quick'] else ''}", "",
             f"Command: `{r['command']}` — {r['total_seconds']:.0f} s in all. Machine: {r['machine']['cpu']}, "
             f"{r['machine']['threads']} threads, torch {r['machine']['torch']}. Seed {r['seed']}; one training run per "
             f"method (no repeats); evaluation on {r['prompts']}, DDIM {r['sampler']['steps']} steps, CFG "
             f"{r['sampler']['guidance']}, seeds {r['sampler']['seed']}+i, the same for every model.", "",
             *markdown_table(r["rows"], cols), "",
             "Compute counts UNet rows (images through the UNet): sampling, scoring and reference rows once, policy rows "
             "trained with gradients three times. Diffusion-DPO's cost of collecting its offline pairs is not counted.", ""]
    if reach:
        fe, sec = reach["forward_equivalents"], reach["seconds"]
        ratio = lambda d: f"{d['ratio']:.1f}×" if d["ratio"] else "not reached"  # noqa: E731
        lines += [f"Diffusion-DPO's best utility: {reach['dpo_best_utility']:.3f} ({reach['dpo_best_run']}, epoch "
                  f"{reach['dpo_best_epoch']}). Compute to reach it — UNet forward-equivalents: SPO {fe['spo']}, "
                  f"Diffusion-DPO {fe['dpo']}, ratio {ratio(fe)}; wall time: SPO {sec['spo']}, Diffusion-DPO "
                  f"{sec['dpo']}, ratio {ratio(sec)}.", ""]
    lines += ["Proxy–truth gap (final snapshots; gains in units of the base model's standard deviation over prompts):", "",
              "| run | true gain (utility) | SPM t=0 gain | world PickScore gain |", "|---|---|---|---|"]
    finals = {}
    for row in r["rows"]:
        if row["run"] != "base":
            finals[row["run"]] = row
    for name, row in finals.items():
        lines.append(f"| {name} | {row['effect_utility']:+.2f} | {row['effect_spm']:+.2f} | {row['effect_pickscore']:+.2f} |")
    lines += ["", f"![curves]({stem}.png)", "", f"![samples]({stem}_samples.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
