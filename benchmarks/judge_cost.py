"""Cost of scoring one diverted step: the pixel SPM path against the latent step judge (issue #14).

Per diverted step with b prompts and K candidates:
  pixel:  one guided network call on b·K rows at t_next (reused to continue), a VAE decode of the b·K
          x0-predictions, the step-aware preference model on the b·K images;
  latent: the latent judge on the b·K noisy candidates, then one guided call on the b continued rows.
Timed on the world model (its shipped SPM and latent judge) and on SD1.5's full-size architecture with random
weights (memory.py's sizes, a PickScore-size SPM, a latent judge of the shipped world judge's widths for
SD1.5's 768-dim text), CPU, in three interleaved repeats (pixel, latent, pixel, latent, ...); the table gives
the median and the range.

    OMP_NUM_THREADS=1 python benchmarks/judge_cost.py            # benchmarks/results/judge_cost.{json,md}
    OMP_NUM_THREADS=1 python benchmarks/judge_cost.py --sd15-resolution 128 --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

from spo.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def _memory_module():
    spec = importlib.util.spec_from_file_location("bench_memory", REPO / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def world_setting():
    """The world model with its shipped pixel SPM and latent judge."""
    from spo.models import load_diffusion
    from spo.plugins import resolve
    from spo.preference.judges import load_latent_judge, load_step_judge

    diffusion = load_diffusion(resolve("world:sd"))
    return diffusion, load_step_judge("world:spm", "cpu"), load_latent_judge("world:latent_judge", "cpu", diffusion)


def sd15_setting(resolution: int):
    """SD1.5's architecture (random weights, built in memory with memory.py's sizes) at `resolution` pixels."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    from spo.models import Diffusion
    from spo.preference.latent_judge import LatentJudgeConfig, LatentStepJudge
    from spo.preference.spm import SPMConfig, StepAwareCLIP

    memory = _memory_module()
    memory.SD15_UNET["sample_size"] = resolution // 8
    tok = memory.tokenizer()
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vae_blocks = len(memory.SD15_VAE["block_out_channels"])
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**memory.SD15_UNET), text_encoder=CLIPTextModel(CLIPTextConfig(**common, **memory.SD15_TEXT)),
        vae=AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * vae_blocks,
                          up_block_types=("UpDecoderBlock2D",) * vae_blocks, latent_channels=4, **memory.SD15_VAE),
        scheduler=DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        tokenizer=tok, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    diffusion = Diffusion(pipe)
    p = memory.PICKSCORE
    clip = CLIPModel(CLIPConfig(text_config=dict(p["text"], **common), vision_config=p["vision"],
                                projection_dim=p["projection_dim"]))
    spm = StepAwareCLIP(clip, tok, SPMConfig(base_model="random", processor="random",
                                             image_size=p["vision"]["image_size"])).eval()
    shipped = json.loads((REPO / "src/spo/assets/world/latent_judge/latent_judge_config.json").read_text())
    latent = LatentStepJudge(LatentJudgeConfig(text_dim=768, text_tokens=77, widths=shipped["widths"],
                                               cond_dim=shipped["cond_dim"], embed_dim=shipped["embed_dim"])).eval()
    return diffusion, spm, latent


def _clock(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


@torch.no_grad()
def pixel_step(diffusion, spm, candidates, t, cond_k, uncond_k, captions_k, guidance) -> dict:
    tb = torch.full((len(candidates),), t)
    out, network = _clock(lambda: diffusion.guided_output(candidates, tb, cond_k, uncond_k, guidance))
    images, decode = _clock(lambda: diffusion.decode(diffusion.x0_prediction(candidates, out, tb)))
    _, judge = _clock(lambda: spm(images, captions_k, torch.full((len(images),), t)))
    return dict(network=network, decode=decode, judge=judge, judge_total=decode + judge, step=network + decode + judge)


@torch.no_grad()
def latent_step(diffusion, judge, candidates, t, cond_k, cond, uncond, guidance, b: int, k: int) -> dict:
    tb = torch.full((len(candidates),), float(t))
    scores, scoring = _clock(lambda: judge(candidates, cond_k, tb))
    chosen = candidates.view(b, k, *candidates.shape[1:])[torch.arange(b), scores.view(b, k).argmax(-1)]
    _, network = _clock(lambda: diffusion.guided_output(chosen, torch.full((b,), t), cond, uncond, guidance))
    return dict(network=network, judge=scoring, judge_total=scoring, step=network + scoring)


@torch.no_grad()
def x0_latent_step(diffusion, judge, candidates, t, cond_k, uncond_k, guidance) -> dict:
    """model.judge=latent with a judge that reads x0 (world:latent_judge_distilled): the scoring call on b·K rows
    stays, the decode and the SPM are replaced by the latent judge on the x0-prediction latents."""
    tb = torch.full((len(candidates),), t)
    out, network = _clock(lambda: diffusion.guided_output(candidates, tb, cond_k, uncond_k, guidance))
    _, scoring = _clock(lambda: judge(diffusion.x0_prediction(candidates, out, tb), cond_k, tb.float()))
    return dict(network=network, judge=scoring, judge_total=scoring, step=network + scoring)


def measure(name: str, diffusion, spm, latent, b: int, k: int, repeats: int, guidance: float = 5.0) -> dict:
    prompts = ["a red circle above a blue square", "a small green triangle", "two yellow diamonds"] * b
    prompts = prompts[:b]
    cond, uncond = diffusion.encode_prompts(prompts)
    cond_k, uncond_k = cond.repeat_interleave(k, 0), uncond.repeat_interleave(k, 0)
    captions_k = [p for p in prompts for _ in range(k)]
    t = diffusion.schedule(20)[5][0]  # a diverted step of the 20-step recipe
    candidates = diffusion.initial_latents(b * k, torch.Generator().manual_seed(0))
    pixel_step(diffusion, spm, candidates, t, cond_k, uncond_k, captions_k, guidance)  # warm-up
    latent_step(diffusion, latent, candidates, t, cond_k, cond, uncond, guidance, b, k)
    x0_latent_step(diffusion, latent, candidates, t, cond_k, uncond_k, guidance)
    runs = {"pixel": [], "latent": [], "x0 latent": []}
    for _ in range(repeats):  # interleaved: a slow spell of the machine hits every path alike
        runs["pixel"].append(pixel_step(diffusion, spm, candidates, t, cond_k, uncond_k, captions_k, guidance))
        runs["latent"].append(latent_step(diffusion, latent, candidates, t, cond_k, cond, uncond, guidance, b, k))
        runs["x0 latent"].append(x0_latent_step(diffusion, latent, candidates, t, cond_k, uncond_k, guidance))
    ratios = [dict(judge=p["judge_total"] / q["judge_total"], step=p["step"] / q["step"],
                   x0_judge=p["judge_total"] / x["judge_total"], x0_step=p["step"] / x["step"])
              for p, q, x in zip(runs["pixel"], runs["latent"], runs["x0 latent"])]
    return dict(setting=name, b=b, k=k, t=int(t), latent_shape=list(candidates.shape[1:]),
                resolution=diffusion.resolution, runs=runs, ratios=ratios)


def _span(values) -> str:
    return f"{statistics.median(values):.3g} ({min(values):.3g}–{max(values):.3g})"


def write_markdown(path: Path, results: list[dict], threads: int) -> None:
    lines = ["# Cost of one diverted step: pixel SPM path vs latent step judges", "",
             f"CPU, {threads} torch thread(s), seconds per diverted step: median (min–max) of 3 interleaved repeats. "
             "`benchmarks/judge_cost.py`.", "",
             "| setting | path | network call | decode | judge | judge total | whole step |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for path_name in ("pixel", "latent", "x0 latent"):
            runs = r["runs"][path_name]
            col = lambda key: _span([x[key] for x in runs]) if key in runs[0] else "—"  # noqa: E731
            rows = f"b = {r['b']}" if path_name == "latent" else f"b·K = {r['b'] * r['k']}"
            lines.append(f"| {r['setting']} ({r['resolution']} px) | {path_name} | {col('network')} ({rows}) | "
                         f"{col('decode')} | {col('judge')} | {col('judge_total')} | {col('step')} |")
    lines += ["", "| setting | judge-only ratio (decode + SPM) / latent judge | whole-step ratio pixel / latent | "
              "judge-only ratio, x0 latent | whole-step ratio pixel / x0 latent |", "|---|---|---|---|---|"]
    for r in results:
        span = lambda key: _span([x[key] for x in r["ratios"]])  # noqa: E731
        lines.append(f"| {r['setting']} ({r['resolution']} px) | {span('judge')}× | {span('step')}× | "
                     f"{span('x0_judge')}× | {span('x0_step')}× |")
    lines += ["", "Pixel: the guided call on the K candidates at t_next (reused to continue the chosen one), the decode "
              "of their x0-predictions, the SPM. Latent: the latent judge on the K noisy candidates, then the guided "
              "call on the chosen candidate only. x0 latent: the guided call on the K candidates (kept to continue), the "
              "latent judge on their x0-prediction latents (a judge of the same widths). The transition and the noise draws are the same in both and left "
              "out. SD1.5: random weights of the full-size architecture (memory.py), a PickScore-size (CLIP-H) SPM, "
              "a latent judge of the shipped world judge's widths (text dim 768).",
              "", "Read with care: the SPM scores 224 px images whatever the model's resolution, so at a small SD1.5 "
              "resolution its fixed cost dominates the pixel path; at 512 px the network call and the decode grow "
              "~16x while the SPM does not, so the whole-step ratio moves toward the network-call ratio (b·K rows vs "
              "b rows: at most K, less where a batch of b·K runs more efficiently per row). Measured on a shared "
              "2-core machine with other jobs running; the repeats are interleaved so both paths see the same load."]
    atomic_write_text(path, "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="world,sd15")
    parser.add_argument("--sd15-resolution", type=int, default=128, help="pixels (CPU: small; the recipe is 512)")
    parser.add_argument("--prompts", type=int, default=2, help="b, prompts per resampler round")
    parser.add_argument("--candidates", type=int, default=4, help="K")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    results = []
    for name in args.settings.split(","):
        models = world_setting() if name == "world" else sd15_setting(args.sd15_resolution)
        results.append(measure(name, *models, b=args.prompts, k=args.candidates, repeats=args.repeats))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "runs"}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "judge_cost.json", json.dumps(results, indent=2))
    write_markdown(args.out / "judge_cost.md", results, torch.get_num_threads())
    print((args.out / "judge_cost.md").read_text())


if __name__ == "__main__":
    main()
