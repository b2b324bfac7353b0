"""What the tiny scoring decoder (`model.scoring_decoder`, issue #14) saves and what it costs in judgement.

The pixel step judge scores decoded x0-predictions; `model.scoring_decoder` decodes them with a distilled
AutoencoderTiny instead of the VAE. On the world (world:sd, its SPM world:spm, the decoder world:tiny_decoder):

  (a) decode time per image, VAE vs tiny, on b·K = 64 x0-predictions (the world recipe's 16 prompts × 4 candidates),
      interleaved repeats (VAE, tiny, VAE, tiny, ...); and the same for SD1.5's VAE against TAESD's architecture
      (random weights: speed does not depend on them) at --sd15-resolution px;
  (b) PSNR of the tiny decode against the VAE decode on held-out latents (test-split captions, a seed the
      distillation never used): clean latents, noised x0-predictions, and x0-predictions of sampling trajectories;
  (c) the pixel SPM's pairwise accuracy per t on the world's held-out preference pairs (`spo evaluate-spm`: same
      pairs, noise and guided step; only the decode differs), and how often the two decodes order a pair alike;
  (d) the resampler (`spo.resampler.resample`, configs/world.yaml's sampling recipe) on held-out prompts with the
      same seed: the continuation is random and every draw is the same, so both runs see the same candidate
      sets; the fraction of sets whose best and worst candidates agree, and of kept pairs that agree.

    OMP_NUM_THREADS=1 python benchmarks/tiny_decoder.py            # benchmarks/results/tiny_decoder.{json,md}
    OMP_NUM_THREADS=1 python benchmarks/tiny_decoder.py --quick    # smoke test, numbers not worth quoting
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from spo.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def _clock(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def decode_speed(full, tiny, latents, repeats: int) -> dict:
    """Seconds per image of two decode functions on the same latents, interleaved (after one warm-up each)."""
    full(latents), tiny(latents)
    runs = {"full": [], "tiny": []}
    for _ in range(repeats):
        runs["full"].append(_clock(lambda: full(latents)) / len(latents))
        runs["tiny"].append(_clock(lambda: tiny(latents)) / len(latents))
    speedups = [f / t for f, t in zip(runs["full"], runs["tiny"])]
    return {"batch": len(latents), "seconds_per_image": runs, "speedup": speedups}


def _parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def world_speed(diffusion, decoder, repeats: int, batch: int) -> dict:
    latents = diffusion.initial_latents(batch, torch.Generator().manual_seed(0))
    tiny = _with_decoder(diffusion, decoder)
    found = decode_speed(diffusion.decode, tiny.scoring_decode, latents, repeats)
    vae = diffusion.vae
    found.update(setting="world (32 px)", full_parameters=_parameters(vae.decoder) + _parameters(vae.post_quant_conv),
                 tiny_parameters=_parameters(decoder.decoder))
    return found


def sd15_speed(resolution: int, repeats: int, batch: int) -> dict:
    """SD1.5's VAE decoder against TAESD's default AutoencoderTiny, random weights, at `resolution` px."""
    import importlib.util

    from diffusers import AutoencoderKL, AutoencoderTiny

    spec = importlib.util.spec_from_file_location("bench_memory", REPO / "benchmarks" / "memory.py")
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    blocks = len(memory.SD15_VAE["block_out_channels"])
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * blocks,
                        up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=4, **memory.SD15_VAE).eval()
    taesd = AutoencoderTiny().eval()  # madebyollin/taesd's architecture
    latents = torch.randn(batch, 4, resolution // 8, resolution // 8)
    found = decode_speed(lambda z: vae.decode(z / vae.config.scaling_factor).sample, lambda z: taesd.decode(z).sample,
                         latents, repeats)
    found.update(setting=f"SD1.5 VAE vs TAESD architecture ({resolution} px, random weights)",
                 full_parameters=_parameters(vae.decoder) + _parameters(vae.post_quant_conv),
                 tiny_parameters=_parameters(taesd.decoder))
    return found


def _with_decoder(diffusion, decoder):
    """A second adapter over the same pipeline, scoring with `decoder`."""
    import dataclasses

    tiny = dataclasses.replace(diffusion)
    tiny.set_scoring_decoder(decoder)
    return tiny


def reconstruction(diffusion, decoder, n: int, seed: int) -> dict:
    from spo.world.prompts import split_prompts
    from spo.world.tiny_decoder import KINDS, distillation_data, psnr, tiny_decode

    data = distillation_data(diffusion, split_prompts(0)["test"], n, seed)
    values = psnr(tiny_decode(decoder, data["latents"]), data["targets"])
    rows = {}
    for i, kind in enumerate([*KINDS, "all"]):
        v = values if kind == "all" else values[data["kind"] == i]
        rows[kind] = {"mean": float(v.mean()), "p5": float(v.quantile(0.05)), "min": float(v.min()), "n": len(v)}
    error = tiny_decode(decoder, data["latents"]) - data["targets"].float()
    rows["all"]["rmse"] = float(error.pow(2).mean().sqrt())  # in [-1, 1] units
    return rows


class _Recorder(torch.nn.Module):
    """A judge that records every score it gives (in call order), and optionally an oracle's scores of the same
    images."""

    def __init__(self, judge, oracle=None):
        super().__init__()
        self.judge, self.oracle, self.scores, self.truth = judge, oracle, [], []
        self.oracle_seconds = 0.0  # left out of the resampler's wall time

    def forward(self, images, captions, t):
        s = self.judge(images, captions, t)
        self.scores.append(s.detach().float().cpu())
        if self.oracle is not None:
            start = time.perf_counter()
            self.truth.append(torch.tensor(self.oracle(images, captions), dtype=torch.float32))
            self.oracle_seconds += time.perf_counter() - start
        return s


def spm_accuracy(diffusion, decoder, max_pairs: int | None, timesteps) -> dict:
    from spo import plugins
    from spo.preference.data import load_preference_dataset
    from spo.preference.evaluate_spm import build_models, evaluate_spm, first_pairs

    pairs = first_pairs(load_preference_dataset(plugins.resolve("world:preference"), "test"), max_pairs)
    results, orders = {}, {}
    for name, adapter in (("full", diffusion), ("tiny", _with_decoder(diffusion, decoder))):
        models = build_models("world:pickscore", "", ["world:spm"])
        models["SPM"] = recorder = _Recorder(models["SPM"])
        results[name] = evaluate_spm(models, adapter, pairs, timesteps, **plugins.spm_references(pairs))
        # evaluate_spm scores image 0 then image 1 of each batch, batch after batch, t after t
        s = recorder.scores
        per_t = len(s) // len(timesteps)
        orders[name] = [torch.cat(s[i * per_t : (i + 1) * per_t : 2])
                        > torch.cat(s[i * per_t + 1 : (i + 1) * per_t : 2]) for i in range(len(timesteps))]
    agreement = [float((a == b).float().mean()) for a, b in zip(orders["full"], orders["tiny"])]
    return {"timesteps": list(timesteps), "n_pairs": results["full"]["n_pairs"], "ties": results["full"]["ties"],
            "accuracy": {name: r["accuracy"] for name, r in results.items()}, "spm_order_agreement": agreement}


def _with_noise(diffusion, std: float, seed: int):
    """A second adapter that scores the VAE decode plus Gaussian pixel noise of `std` (a reference perturbation)."""
    import dataclasses

    noisy, gen = dataclasses.replace(diffusion), torch.Generator().manual_seed(seed)
    noisy.scoring_decode = lambda z: (diffusion.decode(z) + std * torch.randn(  # noqa: E731
        (len(z), 3, diffusion.resolution, diffusion.resolution), generator=gen)).clamp(-1, 1)
    return noisy


def resampler_agreement(diffusion, decoder, n_prompts: int, batch: int, seed: int, noise_std: float) -> dict:
    """The resampler on held-out prompts with the VAE, the tiny decoder, and the VAE plus pixel noise of the tiny
    decoder's RMS error; each compared with the VAE run on the same candidate sets."""
    from spo.config import SPOConfig, load_config
    from spo.preference.judges import load_step_judge
    from spo.resampler import pair_gap, resample
    from spo.world.prompts import split_prompts
    from spo.world.scorers import utility_of_model_images

    s = load_config(SPOConfig, "world", []).sample
    prompts = split_prompts(0)["test"][:n_prompts]
    spm = load_step_judge("world:spm", "cpu")
    variants = {"full": diffusion, "tiny": _with_decoder(diffusion, decoder),
                "noise": _with_noise(diffusion, noise_std, seed=1)}
    runs = {}
    for name, adapter in variants.items():
        oracle = utility_of_model_images if name == "full" else None  # true utility of the VAE-decoded candidates
        judge, seconds, kept_pairs = _Recorder(spm, oracle), 0.0, 0
        for i in range(0, len(prompts), batch):
            gen = torch.Generator().manual_seed(seed + i)
            start = time.perf_counter()
            result = resample(adapter, judge, prompts[i : i + batch], s.num_steps, s.guidance_scale, s.eta,
                              s.num_candidates, s.threshold, s.divert_start_step, gen, keep_rule=s.keep_rule)
            seconds += time.perf_counter() - start
            kept_pairs += len(result.pairs)
        scores = torch.cat([x.view(-1, s.num_candidates) for x in judge.scores])
        runs[name] = dict(scores=scores, seconds=seconds - judge.oracle_seconds, kept_pairs=kept_pairs)
        if oracle is not None:
            truth = torch.cat([x.view(-1, s.num_candidates) for x in judge.truth])
    full = runs["full"]["scores"]
    keep_full, rows = pair_gap(full, s.keep_rule) > s.threshold, torch.arange(len(full))

    def truth_agrees(scores, keep) -> float:
        """Of the kept pairs, the fraction whose winner has the higher true utility (decided pairs only)."""
        win, lose = truth[rows, scores.argmax(-1)], truth[rows, scores.argmin(-1)]
        decided = keep & (win != lose)
        return float((win > lose)[decided].float().mean())

    compared = {}
    for name in ("tiny", "noise"):
        other = runs[name]["scores"]
        best, worst = full.argmax(-1) == other.argmax(-1), full.argmin(-1) == other.argmin(-1)
        keep = pair_gap(other, s.keep_rule) > s.threshold
        same_pair, both = best & worst, keep_full & keep
        compared[name] = {
            "best_and_worst_agree": float(same_pair.float().mean()), "best_agrees": float(best.float().mean()),
            "worst_agrees": float(worst.float().mean()), "kept": int(keep.sum()), "kept_by_both": int(both.sum()),
            "kept_pairs_agree": float((same_pair & both).sum() / max(1, keep_full.sum())),
            "kept_pairs_agree_of_union": float((same_pair & both).sum() / max(1, (keep_full | keep).sum())),
            "kept_pairs_true_utility_agrees": truth_agrees(other, keep)}
    return {"prompts": len(prompts), "candidate_sets": len(full), "k": s.num_candidates, "threshold": s.threshold,
            "noise_std": noise_std, "kept_full": int(keep_full.sum()),
            "kept_full_true_utility_agrees": truth_agrees(full, keep_full), "compared_with_full": compared,
            "resample_seconds": {k: round(v["seconds"], 2) for k, v in runs.items()},
            "pairs_returned": {k: v["kept_pairs"] for k, v in runs.items()}}


def _span(values, fmt="{:.3g}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def write_markdown(path: Path, r: dict) -> None:
    lines = ["# Tiny scoring decoder (`model.scoring_decoder`): speed and accuracy cost", "",
             f"`OMP_NUM_THREADS=1 python benchmarks/tiny_decoder.py{' --quick' if r['quick'] else ''}`; CPU, "
             f"{r['threads']} torch thread, load average {r['load_average']} at the start. Decoder: `{r['decoder']}` "
             f"({r['decoder_bytes'] / 1e6:.2f} MB).", "", "## (a) decode time per image",
             "", f"Median (min–max) of {r['repeats']} interleaved repeats.", "",
             "| setting | batch | VAE decoder params | tiny decoder params | VAE ms/image | tiny ms/image | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for sp in r["speed"]:
        ms = lambda key: _span([1000 * x for x in sp["seconds_per_image"][key]])  # noqa: E731
        lines.append(f"| {sp['setting']} | {sp['batch']} | {sp['full_parameters']:,} | {sp['tiny_parameters']:,} | "
                     f"{ms('full')} | {ms('tiny')} | {_span(sp['speedup'])}× |")
    rec = r["reconstruction"]
    lines += ["", "## (b) tiny decode vs VAE decode on held-out latents (PSNR, dB; images in [0, 1])", "",
              "| latents | n | mean | 5th percentile | min |", "|---|---|---|---|---|"]
    for kind, v in rec.items():
        lines.append(f"| {kind} | {v['n']} | {v['mean']:.1f} | {v['p5']:.1f} | {v['min']:.1f} |")
    acc = r["spm_accuracy"]
    ts = acc["timesteps"]
    lines += ["", f"## (c) pairwise accuracy per t on the world's held-out pairs ({acc['n_pairs']} pairs, "
              f"{acc['ties']:.0%} ties excluded)", "",
              "| judge | decode | " + " | ".join(f"t={t}" for t in ts) + " |", "|---|---|" + "---|" * len(ts)]
    for model in acc["accuracy"]["full"]:
        for name in ("full", "tiny"):
            label = "VAE" if name == "full" else "tiny"
            accs = acc["accuracy"][name][model]
            lines.append(f"| {model} | {label} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
    lines.append("| SPM: pairs ordered alike by both decodes | | "
                 + " | ".join(f"{a:.3f}" for a in acc["spm_order_agreement"]) + " |")
    ra = r["resampler"]
    c = ra["compared_with_full"]
    row = lambda label, key, fmt="{:.3f}": (f"| {label} | " + " | ".join(  # noqa: E731
        fmt.format(c[v][key]) for v in ("tiny", "noise")) + " |")
    lines += ["", f"## (d) the resampler's choices ({ra['prompts']} held-out prompts, configs/world.yaml sampling: "
              f"K = {ra['k']}, threshold {ra['threshold']})", "",
              f"{ra['candidate_sets']} candidate sets, the same in every run (the continuation is random and every "
              f"draw is the same); each run compared with the VAE run. Reference column: the VAE decode plus Gaussian "
              f"pixel noise of the tiny decoder's RMS error (σ = {ra['noise_std']:.3f} in [-1, 1] units).", "",
              "| quantity | tiny decoder | VAE + noise (reference) |", "|---|---|---|",
              row("best and worst candidate both the same as with the VAE", "best_and_worst_agree"),
              row("best the same", "best_agrees"), row("worst the same", "worst_agrees"),
              row(f"kept pairs (VAE run: {ra['kept_full']})", "kept", "{}"),
              row("kept by both runs", "kept_by_both", "{}"),
              row("the VAE run's kept pairs kept with the same win and lose", "kept_pairs_agree"),
              row("same, of the pairs either run keeps", "kept_pairs_agree_of_union"),
              row(f"kept pairs whose winner has the higher true utility (VAE run: "
                  f"{ra['kept_full_true_utility_agrees']:.3f})", "kept_pairs_true_utility_agrees"),
              "", f"Resampler wall time (s): VAE {ra['resample_seconds']['full']}, "
              f"tiny {ra['resample_seconds']['tiny']}."]
    lines += ["", "Chance for 'best and worst the same' is 1/(K(K−1)) = "
              f"{1 / (ra['k'] * (ra['k'] - 1)):.3f}. The true utility is the world's ground truth of each candidate's "
              "VAE-decoded x0-prediction (the final image at the last step): it says whether the pairs on which the "
              "two decodes disagree are ones the SPM orders reliably at all.", "",
              "The last diverted step scores the final latents with the VAE in both runs (the resampler's "
              "`diffusion.decode`); every earlier step decodes x0-predictions with the scoring decoder.", ""]
    atomic_write_text(path, "\n".join(lines))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoder", default="world:tiny_decoder")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sd15-resolution", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=300, help="held-out latents of each kind for the PSNR")
    parser.add_argument("--max-pairs", type=int, default=None, help="held-out preference pairs (default: all 400)")
    parser.add_argument("--prompts", type=int, default=128, help="held-out prompts for the resampler comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script end to end")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.sd15_resolution, args.held_out, args.max_pairs, args.prompts = 2, 64, 16, 16, 4

    from spo.models import load_diffusion, load_scoring_decoder
    from spo.plugins import resolve

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    diffusion = load_diffusion(resolve("world:sd"))
    decoder = load_scoring_decoder(resolve(args.decoder))
    folder = Path(resolve(args.decoder))
    result = {"decoder": args.decoder, "quick": args.quick, "threads": torch.get_num_threads(),
              "load_average": round(load, 2), "repeats": args.repeats,
              "decoder_bytes": sum(p.stat().st_size for p in folder.glob("*") if p.is_file()) if folder.is_dir() else 0}
    timings = {}
    start = time.perf_counter()
    result["speed"] = [world_speed(diffusion, decoder, args.repeats, batch=64),
                       sd15_speed(args.sd15_resolution, max(2, args.repeats // 2), batch=2)]
    timings["speed"] = time.perf_counter() - start
    result["reconstruction"] = reconstruction(diffusion, decoder, args.held_out, seed=1000 + args.seed)
    timings["reconstruction"] = time.perf_counter() - start - sum(timings.values())
    timesteps = (0, 250, 500, 750, 950)
    result["spm_accuracy"] = spm_accuracy(diffusion, decoder, args.max_pairs, timesteps)
    timings["spm_accuracy"] = time.perf_counter() - start - sum(timings.values())
    result["resampler"] = resampler_agreement(diffusion, decoder, args.prompts, batch=16, seed=args.seed,
                                              noise_std=result["reconstruction"]["all"]["rmse"])
    timings["resampler"] = time.perf_counter() - start - sum(timings.values())
    result["wall_seconds"] = {k: round(v, 1) for k, v in timings.items()}
    name = "tiny_decoder_quick" if args.quick else "tiny_decoder"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{name}.json", json.dumps(result, indent=2))
    write_markdown(args.out / f"{name}.md", result)
    print((args.out / f"{name}.md").read_text())
    return result


if __name__ == "__main__":
    main()
