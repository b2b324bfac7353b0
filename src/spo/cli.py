"""`spo` command line: parse, call the library, say where the results went."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import click

from spo.errors import SPOError


class _Finite(click.FloatRange):
    """A float option that must also be finite: click's FloatRange lets nan (and inf) through."""

    name = "finite float"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{rv} is not a finite number", param, ctx)
        return rv


NONNEGATIVE = _Finite(min=0)  # guidance scales and DDIM eta
SEED = click.IntRange(0)  # as train.seed: one convention for every seed of the project


def _device(name: str | None) -> str | None:
    """--device checked before any work: a typo or an absent GPU is one line, not a traceback mid-run."""
    import torch

    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SPOError(f"--device {name}: not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SPOError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return name


def _writable_dir(path: Path) -> Path:
    """Create `path` (and parents) or fail with a one-line reason before any work is done."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".spo-write-test-{os.getpid()}"  # per process: ranks of one run probe the same dir
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SPOError(f"cannot write to {path}: {exc.strerror or exc}; choose another --out") from None
    return path


def _fields_epilog(cls) -> str:
    """Every config field with its default and one-line help, for `--help`."""
    from spo.config import field_help

    rows = [f"  {name} = {default!r}: {text}" for name, text, default in field_help(cls)]
    return "\b\nConfig fields (set in the YAML or as OVERRIDES):\n" + "\n".join(rows)


def _run_config(cls, config_path, overrides, print_config: bool):
    """Load a run's config with friendly refusals; --print-config prints the resolved YAML and exits."""
    import yaml

    from spo.config import load_config, to_plain

    paths = [o for o in overrides if "=" not in o and o.endswith((".yaml", ".yml"))]
    if paths:
        raise SPOError(f"{paths[0]} looks like a config file; pass it as --config {paths[0]}")
    cfg = load_config(cls, config_path, list(overrides))
    if config_path is None and not print_config:  # after loading: a refusal stays the one line said
        click.echo("warning: no --config given; training on the built-in defaults (e.g. --config world, "
                   "--config sd15)", err=True)
    if print_config:
        click.echo(yaml.safe_dump(to_plain(cfg), sort_keys=False), nl=False)
        sys.exit(0)
    return cfg


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spo")
def cli() -> None:
    """Step-aware Preference Optimization for text-to-image diffusion models.

    \b
    Commands for the embedded world (a local world where the true preference is known):
      spo world build     rebuild every world artifact from a seed
      spo world sample    sample images from the world model and score them
      spo world info      print the shipped world's figures
      spo world tiny-decoder   distil world:tiny_decoder (model.scoring_decoder) from the world VAE
      spo demo            the main job: SPO on the world, then base vs tuned report

    \b
    SPO:
      spo train           post-train a diffusion model with SPO (LoRA or full), or --method diffusion-dpo
      spo generate        images for prompts, base and tuned side by side
      spo evaluate        models x scorers on a prompt set: means, CIs, win rates, grid
      spo push            upload a run's LoRA folder to the Hugging Face hub

    \b
    Step-aware preference model:
      spo train-spm       train the step-aware preference model on Pick-a-Pic-style pairs
      spo evaluate-spm    pairwise accuracy per timestep, base CLIP vs SPM
      spo train-latent-judge   a judge of latents (no decode) for model.judge=latent
    """


@cli.group()
def world() -> None:
    """The embedded world: procedural scenes, a small SD model, ground-truth preference, data."""


@world.command("build")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output directory (default: the packaged world).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--tiny", is_flag=True, help="Reduced sizes: every stage in well under a minute (for tests).")
@click.option("--force", is_flag=True, help="Rebuild every stage even if already built.")
def world_build(out: Path | None, seed: int, tiny: bool, force: bool) -> None:
    """Rebuild every artifact of the world; completed stages are kept unless --force."""
    from spo.world import default_world_dir
    from spo.world.build import BuildConfig, build

    out = _writable_dir(out or default_world_dir())
    cfg = BuildConfig.tiny_config(seed) if tiny else BuildConfig(seed=seed)
    manifest = build(out, cfg, force=force, log=lambda m: click.echo(m, err=True))
    _print_figures(manifest)
    click.echo(f"world written to {out}")


@world.command("info")
@click.option("--world", "world_dir", type=click.Path(path_type=Path), default=None, help="World directory.")
def world_info(world_dir: Path | None) -> None:
    """Print the world's build figures."""
    from spo.world import open_world

    world_dir = open_world(world_dir)
    _print_figures(json.loads((world_dir / "world.json").read_text()))


@world.command("sample")
@click.option("--world", "world_dir", type=click.Path(path_type=Path), default=None, help="World directory.")
@click.option("--prompt", "prompts", multiple=True, help="Caption (repeatable). Default: held-out test prompts.")
@click.option("-n", "--num", type=click.IntRange(1, 512), default=16, show_default=True, help="Images when no --prompt is given.")
@click.option("--steps", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--guidance", type=NONNEGATIVE, default=5.0, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/world-sample"), show_default=True)
def world_sample(world_dir, prompts, num, steps, guidance, seed, out) -> None:
    """Sample from the world's diffusion model, save a captioned grid and print the true utility."""
    from spo.world import open_world
    from spo.world.sampling import sample_and_score

    world_dir = open_world(world_dir)
    out = _writable_dir(out)
    summary, grid = sample_and_score(world_dir, list(prompts), num, steps, guidance, seed, out)
    click.echo(f"utility over {summary['n']} images: mean {summary['utility_mean']:.3f} "
               f"(std {summary['utility_std']:.3f})")
    click.echo(f"grid: {grid}\nsummary: {out / 'summary.json'}")


@world.command("tiny-decoder")
@click.option("--world", "world_dir", type=click.Path(path_type=Path), default=None, help="World directory.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/tiny_decoder"), show_default=True)
@click.option("-n", "--num", type=click.IntRange(16), default=3000, show_default=True,
              help="Latents of each kind (clean, noised x0-predictions, sampled x0-predictions) to distil on.")
@click.option("--steps", type=click.IntRange(1), default=3000, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
def world_tiny_decoder(world_dir, out, num, steps, seed) -> None:
    """Distil a small AutoencoderTiny from the world VAE: a scoring decoder for model.scoring_decoder."""
    from spo.world import open_world
    from spo.world.tiny_decoder import distil

    world_dir = open_world(world_dir)
    out = _writable_dir(out)
    recipe = distil(out, world_dir, n=num, steps=steps, seed=seed, log=lambda m: click.echo(m, err=True))
    click.echo(f"held-out PSNR vs the VAE decode: {recipe['held_out_psnr_db']['all']:.1f} dB\ndecoder: {out} "
               f"(use it with model.scoring_decoder={out})")


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=Path("configs/world.yaml"),
              show_default=True, help="SPO recipe for the embedded world.")
@click.option("--prompts", "n_prompts", type=click.IntRange(8), default=128, show_default=True,
              help="Held-out prompts to evaluate on.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier demo's run in OUT/train (only a demo's own).")
@click.argument("overrides", nargs=-1)
def demo(out: Path, config_path: Path, n_prompts: int, overwrite: bool, overrides: tuple[str, ...]) -> None:
    """The main job on the embedded default: SPO on the world, then base vs tuned on held-out prompts."""
    from spo.demo import run_demo

    out = _writable_dir(out)
    report = run_demo(out, config_path, n_prompts, list(overrides), log=lambda m: click.echo(m, err=True),
                      overwrite=overwrite)
    click.echo((out / "report.md").read_text())
    u = report["utility"]
    click.echo(f"ground-truth utility {u['before']:.3f} -> {u['after']:.3f} "
               f"(paired diff {u['diff']:+.3f}, 95% CI [{u['diff_ci95'][0]:+.3f}, {u['diff_ci95'][1]:+.3f}], "
               f"win rate {u['win_rate']:.2f})\nreport: {out / 'report.md'}")


def _spm_epilog() -> str:
    from spo.config import SPMTrainConfig

    return _fields_epilog(SPMTrainConfig)


@cli.command("train-spm", epilog=_spm_epilog())
@click.option("--config", "config_path", default=None,
              help="YAML file of SPMTrainConfig fields, or a shipped recipe by name (spm_world, spm_sd15, spm_sdxl).")
@click.option("--resume", default="", help='Continue a run: a checkpoint dir, or "latest" in log.output_dir.')
@click.option("--overwrite", is_flag=True, help="Replace a run already in log.output_dir.")
@click.option("--print-config", is_flag=True, help="Print the resolved config (YAML, overrides applied) and exit.")
@click.argument("overrides", nargs=-1)
def train_spm_command(config_path, resume: str, overwrite: bool, print_config: bool, overrides: tuple[str, ...]) -> None:
    """Train the step-aware preference model. OVERRIDES are dotted key=value config fields.

    \b
    Paths may start with "world:" to name an artifact of the packaged world, e.g.
      spo train-spm --config configs/spm_world.yaml train.max_steps=200 log.output_dir=runs/spm
    """
    from spo.config import SPMTrainConfig
    from spo.preference.train_spm import train_spm

    cfg = _run_config(SPMTrainConfig, config_path, overrides, print_config)
    _writable_dir(Path(cfg.log.output_dir))
    final = train_spm(cfg, log=lambda m: click.echo(m, err=True), resume=resume, overwrite=overwrite)
    click.echo(f"step-aware preference model saved to {final}")


def _latent_judge_epilog() -> str:
    from spo.config import LatentJudgeTrainConfig

    return _fields_epilog(LatentJudgeTrainConfig)


@cli.command("train-latent-judge", epilog=_latent_judge_epilog())
@click.option("--config", "config_path", default=None,
              help="YAML file of LatentJudgeTrainConfig fields, or a shipped recipe by name (latent_judge_world, "
                   "latent_judge_distilled_world, latent_judge_onpolicy_world).")
@click.option("--overwrite", is_flag=True, help="Replace a run already in log.output_dir.")
@click.option("--print-config", is_flag=True, help="Print the resolved config (YAML, overrides applied) and exit.")
@click.argument("overrides", nargs=-1)
def train_latent_judge_command(config_path, overwrite: bool, print_config: bool, overrides: tuple[str, ...]) -> None:
    """Train a latent step judge (scores latents; no decode). OVERRIDES are dotted key=value config fields.

    On preference pairs (default), or distilled from a pixel step judge on the model's own candidate sets
    (distill.teacher; model.reads=x0 scores x0-prediction latents), also on the sets of policies SPO tuned with
    an earlier judge (distill.policies: their LoRA folders; an on-policy round).

    \b
      spo train-latent-judge --config latent_judge_world train.max_steps=500 log.output_dir=runs/latent-judge
      spo train-latent-judge --config latent_judge_distilled_world distill.num_prompts=256
      spo train-latent-judge --config latent_judge_onpolicy_world   # after the round-1 SPO runs (make latent-judge-onpolicy)
      spo train --config world model.judge=latent model.latent_judge=runs/latent-judge/latent_judge
    """
    from spo.config import LatentJudgeTrainConfig
    from spo.preference.train_latent_judge import train_latent_judge

    cfg = _run_config(LatentJudgeTrainConfig, config_path, overrides, print_config)
    _writable_dir(Path(cfg.log.output_dir))
    final = train_latent_judge(cfg, log=lambda m: click.echo(m, err=True), overwrite=overwrite)
    click.echo(f"latent step judge saved to {final}")


@cli.command("evaluate-spm")
@click.option("--spm", "spm_dirs", multiple=True, type=click.Path(path_type=Path),
              help="Trained SPM directory (repeatable). Default: the packaged world's SPM.")
@click.option("--base", default="world:pickscore", show_default=True, help="CLIP/PickScore used naively on x0-predictions.")
@click.option("--processor", default="", help="Image processor/tokenizer source for --base (default: --base).")
@click.option("--dataset", default="world:preference", show_default=True, help="Preference data (Pick-a-Pic schema).")
@click.option("--split", default="test", show_default=True)
@click.option("--diffusion-model", default="world:sd", show_default=True)
@click.option("--timesteps", default="0,250,500,750,950", show_default=True)
@click.option("--max-pairs", type=click.IntRange(1), default=None)
@click.option("--guidance", type=NONNEGATIVE, default=5.0, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/evaluate-spm"), show_default=True)
@click.option("--latent-judge", "latent_judges", multiple=True, metavar="PATH",
              help="Latent step judge (`spo train-latent-judge`, e.g. world:latent_judge; repeatable), scored on the "
                   "noisy latent x_t itself (same noise, same t) beside the SPM's x0-predictions.")
@click.option("--scoring-decoder", default="", metavar="PATH",
              help="Decode the x0-predictions with this AutoencoderTiny (model.scoring_decoder, e.g. "
                   "world:tiny_decoder, madebyollin/taesd) instead of the VAE: its cost in accuracy.")
def evaluate_spm_command(spm_dirs, base, processor, dataset, split, diffusion_model, timesteps, max_pairs, guidance,
                         seed, out, latent_judges, scoring_decoder) -> None:
    """Accuracy vs timestep on held-out pairs: the base model used naively, each SPM and each latent judge."""
    from spo import plugins
    from spo.models import load_diffusion
    from spo.preference.data import load_preference_dataset
    from spo.preference.evaluate_spm import (build_latent_judges, build_models, check_timesteps, evaluate_spm,
                                             first_pairs, write_report)

    try:
        ts = [int(t) for t in timesteps.split(",") if t.strip()]
    except ValueError:
        raise SPOError(f"--timesteps must be comma-separated integers, got {timesteps!r}") from None
    out = _writable_dir(out)
    diffusion = load_diffusion(plugins.resolve(diffusion_model))  # the family's adapter (SD, SDXL or SD3)
    check_timesteps(ts, diffusion)
    if scoring_decoder:
        diffusion.set_scoring_decoder(plugins.resolve(scoring_decoder))
    models = build_models(base, processor, list(spm_dirs) or ["world:spm"])
    pairs = first_pairs(load_preference_dataset(plugins.resolve(dataset), split), max_pairs)
    result = evaluate_spm(models, diffusion, pairs, ts, guidance=guidance, seed=seed,
                          latent_judges=build_latent_judges(list(latent_judges)), **plugins.spm_references(pairs))
    paths = write_report(result, out)
    click.echo(paths["md"].read_text())
    click.echo(f"table: {paths['md']}\nplot: {paths['png']}")


def _train_epilog() -> str:
    from spo.config import SPOConfig

    return _fields_epilog(SPOConfig)


@cli.command(epilog=_train_epilog())
@click.option("--config", "config_path", default=None,
              help="YAML recipe, or a shipped one by name: world, world_dpo, sd15, sdxl.")
@click.option("--resume", default="", help='Continue a run: a checkpoint dir, or "latest" in log.output_dir.')
@click.option("--overwrite", is_flag=True, help="Replace a run already in log.output_dir.")
@click.option("--method", type=click.Choice(["spo", "diffusion-dpo"]), default=None,
              help="spo, or the Diffusion-DPO baseline on offline pairs (dpo.* fields); default: the config's.")
@click.option("--print-config", is_flag=True, help="Print the resolved config (YAML, overrides applied) and exit.")
@click.argument("overrides", nargs=-1)
def train(config_path, resume: str, overwrite: bool, method: str | None, print_config: bool,
          overrides: tuple[str, ...]) -> None:
    """Post-train with SPO (or a baseline). OVERRIDES are dotted key=value config fields, e.g. sample.num_candidates=4.

    \b
      spo train --config configs/world.yaml
      spo train --config configs/world_dpo.yaml          # the Diffusion-DPO baseline on the world's pairs
      spo train --config configs/sd15.yaml --method diffusion-dpo dpo.dataset=yuvalkirstain/pickapic_v2
    """
    from spo.config import SPOConfig
    from spo.trainer import Trainer, run_summary

    cfg = _run_config(SPOConfig, config_path, list(overrides) + ([f"method={method}"] if method else []), print_config)
    _writable_dir(Path(cfg.log.output_dir).parent)
    trainer = Trainer(cfg, overwrite=overwrite, resume=resume, log=lambda m: click.echo(m, err=True)).setup()
    out = trainer.train()
    if out is None:  # stopped by a signal at a safe point, with a checkpoint
        click.echo(f"stopped; continue with: spo train ... --resume latest (log.output_dir={cfg.log.output_dir})")
        sys.exit(130)
    if trainer.acc.is_main_process:  # once, not once per process of a multi-GPU launch
        click.echo(run_summary(cfg, out))


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, metavar="USER/NAME", help="Hub model repository (created if missing).")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--dry-run", is_flag=True, help="Check the folder and list what would be uploaded; no network.")
def push(run_dir: Path, repo_id: str, private: bool, dry_run: bool) -> None:
    """Upload a run's LoRA folder (weights, model card, spo_lora.json, training config) to the hub.

    \b
      spo push runs/spo-sd15 --repo-id alice/spo-sd15-lora --dry-run
      spo push runs/spo-sd15 --repo-id alice/spo-sd15-lora --private
    """
    from spo.hub import push_lora

    folder, files = push_lora(run_dir, repo_id, private=private, dry_run=dry_run)
    listing = "\n".join(f"  {name}" for name in files)
    if dry_run:
        click.echo(f"would upload {len(files)} files of {folder} to {repo_id}:\n{listing}\n"
                   f"(model card present, weights finite; run again without --dry-run to upload)")
    else:
        click.echo(f"uploaded {len(files)} files of {folder}:\n{listing}\nhttps://huggingface.co/{repo_id}")


def _named_loras(specs) -> list[tuple[str, Path]]:
    """--lora [NAME=]PATH values as (unique name, existing path), all checked before any generation."""
    from spo.lora import lora_info

    named = []
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        path = Path(path)
        if not path.is_dir():
            raise SPOError(f"--lora {spec}: {path} is not a directory (a LoRA or full-pipeline output of `spo train`)")
        lora_info(path)  # a damaged spo_lora.json fails now, not after the base model's images
        named.append((name or path.name or str(path), path))
    names = [n for n, _ in named]
    dupes = sorted({n for n in names if names.count(n) > 1 or n == "base"})
    if dupes:
        raise SPOError(f"two models would be named {dupes[0]!r}; label them: --lora NAME=PATH")
    return named


@cli.command()
@click.option("--pretrained", default="world:sd", show_default=True,
              help="Base SD or SDXL pipeline (hub id, dir, world:sd).")
@click.option("--vae", default="", help="Separate VAE replacing the pipeline's, e.g. madebyollin/sdxl-vae-fp16-fix.")
@click.option("--lora", "loras", multiple=True, metavar="[NAME=]PATH",
              help="LoRA (or full-pipeline) output dir of `spo train`; repeatable; NAME labels its row and folder.")
@click.option("--no-base", is_flag=True, help="Do not include the base model.")
@click.option("--prompt", "prompt_texts", multiple=True, help="Prompt (repeatable).")
@click.option("--prompts", "prompt_file", default=None, help="Prompt file or set (txt/json/jsonl/csv, world:test, spo:4k).")
@click.option("-n", "--num", type=click.IntRange(1), default=None, help="Use only the first N prompts.")
@click.option("--steps", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--guidance", type=NONNEGATIVE, default=5.0, show_default=True)
@click.option("--eta", type=NONNEGATIVE, default=0.0, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/generate"), show_default=True)
def generate(pretrained, vae, loras, no_base, prompt_texts, prompt_file, num, steps, guidance, eta, seed, out) -> None:
    """Images for prompts from each model with the same seeds, and a captioned side-by-side grid."""
    from spo.generation import generate_to_folder
    from spo.prompts import load_prompts

    prompts = list(prompt_texts) + (load_prompts(prompt_file) if prompt_file else [])
    if not prompts:
        raise SPOError("give prompts with --prompt TEXT or --prompts FILE")
    prompts = prompts[:num] if num else prompts
    models = ([("base", None)] if not no_base else []) + _named_loras(loras)
    if not models:
        raise SPOError("nothing to generate: --no-base without --lora")
    out = _writable_dir(out)
    grid = generate_to_folder(pretrained, models, prompts, out, seed, steps, guidance, eta, vae=vae or None)
    click.echo(f"images: {out}/<model>/NNNN.png\ngrid: {grid}")


@cli.command()
@click.option("--model", "model_specs", multiple=True, metavar="NAME=SPEC",
              help="Model to evaluate (repeatable; the first is the baseline). SPEC is a base pipeline (hub id, "
                   "directory or world:sd), BASE+LORA_DIR (a LoRA from `spo train` on BASE), or a full-pipeline "
                   "directory. Default: base=world:sd.")
@click.option("--scorer", "scorer_specs", multiple=True, metavar="NAME[=WEIGHTS]",
              help="Scorer (repeatable): world-utility, world-pickscore, pickscore, clipscore, aesthetic, hpsv2, "
                   "imagereward. =WEIGHTS gives other weights: a directory or hub id for the CLIP-based ones, a "
                   "checkpoint file for aesthetic, hpsv2, imagereward. Default: world-utility and world-pickscore "
                   "for world prompts, else pickscore, hpsv2, imagereward and aesthetic.")
@click.option("--prompts", "prompt_source", default="world:test", show_default=True,
              help="Prompt file or set (txt/json/jsonl/csv, hub dataset, world:test, spo:4k).")
@click.option("--num-prompts", type=click.IntRange(1), default=None, help="Use only the first N prompts (default: all).")
@click.option("--steps", type=click.IntRange(1, 1000), default=20, show_default=True, help="DDIM steps.")
@click.option("--guidance", type=NONNEGATIVE, default=5.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--eta", type=NONNEGATIVE, default=0.0, show_default=True, help="DDIM eta.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Prompt i is drawn from seed + i.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--grid", "grid_prompts", type=click.IntRange(1), default=8, show_default=True,
              help="Prompts (columns) in grid.png.")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/evaluate"), show_default=True)
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Generated images, one PNG per (model, prompt, seed, sampler settings). Default: OUT/cache.")
def evaluate(model_specs, scorer_specs, prompt_source, num_prompts, steps, guidance, eta, seed, batch_size,
             grid_prompts, device, out, cache_dir) -> None:
    """Generate images for a prompt set with fixed seeds, score them, compare every model with the first.

    Defaults are the paper's evaluation settings (DDIM 20 steps, CFG 5, eta 0). Images are cached, so
    scoring again with another --scorer does not regenerate them.

    \b
      spo evaluate --model base=world:sd --model spo=world:sd+runs/demo/train/lora --num-prompts 128
      spo evaluate --model sd15=runwayml/stable-diffusion-v1-5 \\
                   --model spo=runwayml/stable-diffusion-v1-5+runs/spo-sd15/lora --prompts prompts.txt \\
                   --scorer pickscore --scorer hpsv2=/ckpt/HPS_v2.1_compressed.pt --scorer aesthetic
    """
    from spo.evaluation import Sampler, default_scorers, evaluate_models, parse_model_spec
    from spo.prompts import load_prompts
    from spo.scorers import parse_scorer_spec

    device = _device(device)
    models = [parse_model_spec(m) for m in model_specs or ["base=world:sd"]]
    for spec in scorer_specs:
        parse_scorer_spec(spec)  # unknown names fail before any work
    prompts = load_prompts(prompt_source)[:num_prompts]
    out = _writable_dir(out)
    cache_dir = _writable_dir(cache_dir or out / "cache")
    evaluate_models(models, list(scorer_specs) or default_scorers(prompts), prompts, prompt_source,
                    Sampler(steps, guidance, eta, seed), out, cache_dir, batch_size, grid_prompts, device,
                    log=lambda m: click.echo(m, err=True))
    click.echo((out / "results.md").read_text())
    click.echo(f"results: {out / 'results.json'} (also .csv, .md), per prompt: {out / 'per_prompt.csv'}, "
               f"grid: {out / 'grid.png'}, images: {cache_dir}")


def _print_figures(manifest: dict) -> None:
    figs = manifest.get("figures", {})
    base = figs.get("base_model", {}).get("utility", {})
    pick = figs.get("pickscore", {})
    if base:
        lo, hi = base["ci95"]
        click.echo(f"base model utility on held-out prompts: {base['mean']:.3f} ± {base['std']:.3f} "
                   f"(95% CI {lo:.3f}–{hi:.3f}, n={base['n']})")
    if pick:
        click.echo(f"world PickScore accuracy on held-out pairs: {pick['accuracy_pickscore']:.3f} "
                   f"(contrastive CLIP {pick['accuracy_clip']:.3f}; label-noise ceiling {pick['ceiling_true_utility']:.3f})")
    for stage, seconds in manifest.get("timings", {}).items():
        click.echo(f"  {stage:<12} {seconds:8.1f}s")


def main(argv: list[str] | None = None) -> None:
    """The `spo` entry point; `argv` (default: sys.argv[1:]) lets tests run it in-process."""
    try:
        cli.main(args=argv, prog_name="spo" if argv is not None else None, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        # One line like every other refusal: click's usage block would push the reason off the screen.
        ctx = getattr(exc, "ctx", None)
        where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        click.echo(f"error: {' '.join(exc.format_message().split())}{where}", err=True)
        sys.exit(exc.exit_code)
    except SPOError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
