"""Benchmark 2: the paper's ablations on the embedded world, one table each, the same seeds throughout.

1. What labels the pairs: the step-aware SPM; the plain world PickScore applied to noisy
   x0-predictions (no timestep conditioning); trajectory-level labels — each candidate rolled out
   to the final image and the final image's preference propagated to every step (D3PO-style).
2. Candidates per step K ∈ {2, 4, 6}.
3. Selection threshold ∈ {0, 0.1, 0.3, 0.5}.

Every variant is configs/world.yaml with one field changed; each is judged by the ground-truth
utility (held out from training) beside the world PickScore and the SPM.

    python benchmarks/ablations.py            # full run
    python benchmarks/ablations.py --quick    # a few minutes; what CI runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from world_runs import evaluate_lora, machine, markdown_table, summary_row, train_with_snapshots  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = dict(spm="world:spm", K=4, threshold=0.1)  # configs/world.yaml


def variants(num_steps: int = 20, divert: int = 4) -> dict[str, list[tuple[str, list[str]]]]:
    trajectory = num_steps - divert - 1  # one branch at the first diverted step, rolled out to the end
    return {
        "labels": [("step-aware SPM (default)", []),
                   ("plain PickScore on x0-predictions", ["model.spm=world:pickscore"]),
                   ("trajectory-level (final image's preference)", [f"sample.inner_steps={trajectory}"])],
        "candidates K": [(f"K={k}", [f"sample.num_candidates={k}"]) for k in (2, 4, 6)],
        "threshold": [(f"threshold={t:g}", [f"sample.threshold={t}"]) for t in (0.0, 0.1, 0.3, 0.5)],
    }


def main(argv=None) -> dict:
    from spo.files import atomic_write_text
    from spo.prompts import load_prompts
    from spo.world import open_world

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-ablations")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated table names to run (default: all)")
    args = p.parse_args(argv)
    extra = []
    if args.quick:
        args.epochs, args.prompts = 1, 8
        extra = ["sample.batch_size=2"]
    world = open_world()
    prompts = load_prompts("world:test")[: args.prompts]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    base = evaluate_lora(world, None, prompts, diversity_prompts=min(16, len(prompts)))
    done: dict[tuple, dict] = {}  # identical overrides run once (K=4 and threshold=0.1 are the default)
    tables = {}
    wanted = set(filter(None, args.only.split(",")))
    for table, rows in variants().items():
        if wanted and table not in wanted:
            continue
        tables[table] = []
        for name, overrides in rows:
            key = tuple(o for o in overrides if o not in ("sample.num_candidates=4", "sample.threshold=0.1"))
            if key not in done:
                slug = f"run{len(done)}"
                cfg = [f"train.num_epochs={args.epochs}", f"train.seed={args.seed}", *extra, *overrides]
                snap = train_with_snapshots(str(ROOT / "configs" / "world.yaml"), cfg, args.work / slug, args.epochs,
                                            log=lambda m: None)[-1]
                metrics = [json.loads(line) for line in (args.work / slug / "metrics.jsonl").read_text().splitlines()]
                scores = evaluate_lora(world, snap["lora"], prompts, diversity_prompts=min(16, len(prompts)))
                row = summary_row(name, snap, scores, base)
                row["pairs_trained"] = sum(m.get("pairs_trained", 0) for m in metrics)
                row["fraction_kept"] = sum(m.get("fraction_kept", 0) for m in metrics) / max(1, len(metrics))
                done[key] = row
                print(f"[ablations] {name}: utility {row['utility']:.3f} ({row['utility_gain']:+.3f})", flush=True)
            tables[table].append(dict(done[key], run=name))
    result = dict(machine=machine(), seed=args.seed, epochs=args.epochs, quick=args.quick,
                  prompts=f"world:test, first {len(prompts)}", base=summary_row("base", dict(
                      epoch=0, seconds=0.0, forward_rows=0, train_rows=0), base, base), tables=tables,
                  command="python benchmarks/ablations.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  total_seconds=round(time.time() - started, 1))
    stem = "ablations" + ("_quick" if args.quick else "")
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=2))
    atomic_write_text(args.out / f"{stem}.md", render(result))
    print((args.out / f"{stem}.md").read_text())
    return result


def render(r: dict) -> str:
    cols = [("variant", "run", ""), ("utility", "utility", ".3f"), ("Δ vs base [95% CI]", "utility_gain_ci95", "+.3f"),
            ("win rate", "win_rate", ".2f"), ("world PickScore", "pickscore", ".2f"), ("SPM t=0", "spm_t0", ".2f"),
            ("diversity", "diversity", ".3f"), ("pairs trained", "pairs_trained", "d"),
            ("kept", "fraction_kept", ".2f"), ("train s", "seconds", ".0f")]
    b = r["base"]
    lines = [f"# Ablations on the embedded world{' (quick)' if r['quick'] else ''}", "",
             f"Command: `{r['command']}` — {r['total_seconds']:.0f} s in all. Machine: {r['machine']['cpu']}, "
             f"{r['machine']['threads']} threads, torch {r['machine']['torch']}. configs/world.yaml with one field "
             f"changed per row, {r['epochs']} epochs, seed {r['seed']}, one run per variant (no repeats); evaluation on "
             f"{r['prompts']}, DDIM 20, CFG 5, the same seeds for every model. Base model: utility {b['utility']:.3f}, "
             f"world PickScore {b['pickscore']:.2f}, SPM t=0 {b['spm_t0']:.2f}, diversity {b['diversity']:.3f}.", ""]
    for table, rows in r["tables"].items():
        lines += [f"## {table}", "", *markdown_table(rows, cols), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
