"""Where the time of one SPO epoch goes (issue #14): sampling, scoring, decoding, judging, training.

One on-policy epoch of the ordinary trainer (`Trainer.train_epoch`) runs with timers wrapped around the
methods of the trainer's own objects (the adapter, the SPO method, its SPM, the accelerator, the
optimizer): nothing in the library is edited, and what is not wrapped is "other". Each timer counts its
own time without that of the timers nested inside it, so the components add up to the epoch.
A guided network call is attributed by call site: inside `x0_images` (the resampler's candidate
scoring) it is "scoring", inside `reference_output` it is the reference, inside the method's `loss`
the policy, and inside the resampler anywhere else the plain trajectory. On CUDA every timer
synchronises the device at both ends, so asynchronous work is charged to the call that queued it.

Settings:
  world  `configs/world.yaml`, the embedded world (one epoch = one round of 16 prompts).
  sd15   `configs/sd15.yaml` on random weights of SD1.5's full-size architecture (UNet 0.86B, CLIP-L text
         encoder, the SD VAE; `benchmarks/memory.py` builds them) and a PickScore-size (CLIP-H) SPM.
         `--resolution` (default 512 on CUDA, 256 on CPU), `--prompts` per round; threshold 0 so that
         every diverted step gives a pair, as in memory.py.

    python benchmarks/epoch_profile.py --setting world                       # CPU, 1 thread: ~20 s
    python benchmarks/epoch_profile.py --setting sd15 --resolution 256 --prompts 1 \
        --override sample.num_steps=10 sample.divert_start_step=2 train.batch_size=4    # CPU: ~6 min on one core
    python benchmarks/epoch_profile.py --setting sd15 --name sd15_512 --resolution 512 --prompts 1 \
        --override sample.num_steps=4 sample.divert_start_step=1 train.batch_size=1     # CPU: ~9 min
    python benchmarks/epoch_profile.py --setting sd15 --name sd15_cuda --device cuda --dtype fp16   # GPU: the recipe

Writes `profile_<setting>.json` (or `--name`) and `profile.md` (every profile_*.json of --out in one report) into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# name -> what it covers; the order of the report. "other" is the epoch minus every timed component.
COMPONENTS = {
    "sampling_network": "guided network calls of the plain trajectory (steps before divert_start_step)",
    "scoring_network": "guided network call at t_next for the K candidates (kept, reused to continue)",
    "vae_decode": "VAE decode of the candidates' x0-predictions (and of the final latents)",
    "judge_image": "SPM image tower (time-conditioned CLIP vision)",
    "judge_text": "SPM text tower (the captions, once per candidate)",
    "judge_other": "SPM preprocessing (resize, crop, normalise) and tokenising",
    "text_encoding_sampling": "prompt encoding of the round (resampler)",
    "text_encoding_training": "prompt encoding per minibatch (SPO._minibatches)",
    "sampling_other": "resampler glue: DDIM transitions, noise, x0-prediction maths, pair selection, copies to host",
    "data_pool": "pooling the round's pairs: gather, NaN check, shuffle, share out",
    "data_to_device": "minibatches of pairs moved to the device",
    "train_reference_forward": "reference network call (LoRA adapters off, no grad)",
    "train_policy_forward": "policy network call (with grad)",
    "train_backward": "backward pass (accelerator.backward)",
    "optimizer_step": "optimizer step",
    "loss_other": "transition maths, closed-form log-ratios and the clipped loss around the two calls",
    "other": "the rest: trainer loop, autocast/accumulate, zero_grad, LR schedule, logging, safe points",
}
SAMPLING_PHASE = ("sampling_network", "scoring_network", "vae_decode", "judge_image", "judge_text", "judge_other",
                  "text_encoding_sampling", "sampling_other", "data_pool")
SCORING = ("scoring_network", "vae_decode", "judge_image", "judge_text", "judge_other")


# ------------------------------------------------------------------ timers


class Profiler:
    """Exclusive wall and CPU seconds, calls and rows per component, from wrapped callables."""

    def __init__(self, sync=None):
        self.sync = sync or (lambda: None)
        self.wall, self.cpu = defaultdict(float), defaultdict(float)
        self.calls, self.rows = defaultdict(int), defaultdict(int)
        self.open: list[str] = []  # components of the wrappers now running, outermost first
        self._child: list[list[float]] = []  # per open wrapper: wall and CPU seconds of its nested timers
        self.notes: dict = {}

    def inside(self, name: str) -> bool:
        return name in self.open

    def wrap(self, fn, component, rows=None):
        """`fn` timed as `component` (a name, or a function of the call's arguments giving one)."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            name = component(*args, **kwargs) if callable(component) else component
            self.sync()  # work queued before the call is not charged to it
            wall0, cpu0 = time.perf_counter(), time.process_time()
            self.open.append(name)
            self._child.append([0.0, 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
                self.open.pop()
                child_wall, child_cpu = self._child.pop()
                self.wall[name] += wall - child_wall
                self.cpu[name] += cpu - child_cpu
                self.calls[name] += 1
                self.rows[name] += rows(*args, **kwargs) if rows else 0
                if self._child:
                    self._child[-1][0] += wall
                    self._child[-1][1] += cpu

        return timed


def _patch(stack: contextlib.ExitStack, owner, attribute: str, wrapper) -> None:
    """owner.attribute = wrapper(original) until the stack closes (an instance attribute shadows the method)."""
    original = getattr(owner, attribute)
    had_own = attribute in vars(owner)
    setattr(owner, attribute, wrapper(original))

    def restore():
        if had_own:
            setattr(owner, attribute, original)
        else:
            delattr(owner, attribute)

    stack.callback(restore)


def _guided_rows(x_t, t, cond, uncond, guidance, model=None) -> int:
    return len(x_t) * (1 if guidance == 1.0 else 2)  # classifier-free guidance doubles the batch


@contextlib.contextmanager
def instrument(trainer, profiler: Profiler):
    """Timers on the trainer's objects for the duration of the block; every one removed afterwards."""
    from spo.resampler import Pairs

    p, method, diffusion = profiler, trainer.method, trainer.diffusion
    rounds = p.notes.setdefault("rounds", [])

    def network_site(*args, **kwargs) -> str:
        if p.inside("site:x0_images"):
            return "scoring_network"
        if p.inside("site:reference_output"):
            return "train_reference_forward"
        if p.inside("loss_other"):
            return "train_policy_forward"
        return "sampling_network" if p.inside("sampling_other") else "unattributed_network"

    def encoding_site(*args, **kwargs) -> str:
        return "text_encoding_sampling" if p.inside("sampling_other") else "text_encoding_training"

    def record_round(sample):
        def run(*args, **kwargs):
            pairs, stats, prompts = result = sample(*args, **kwargs)
            rounds.append(dict(prompts=len(prompts), diverted_steps=len(stats), pairs=len(pairs),
                               candidate_sets=sum(s.candidates for s in stats)))
            return result
        return run

    with contextlib.ExitStack() as stack:
        _patch(stack, diffusion, "guided_output", lambda f: p.wrap(f, network_site, _guided_rows))
        _patch(stack, diffusion, "x0_images", lambda f: p.wrap(f, "site:x0_images"))
        _patch(stack, diffusion, "decode", lambda f: p.wrap(f, "vae_decode", lambda x: len(x)))
        _patch(stack, diffusion, "encode_prompts", lambda f: p.wrap(f, encoding_site, lambda prompts: len(prompts)))
        _patch(stack, method, "judge", lambda f: p.wrap(f, "judge_other", lambda images, *_: len(images)))
        spm = getattr(method, "spm", None)
        if hasattr(spm, "image_embeds") and hasattr(spm, "text_embeds"):
            _patch(stack, spm, "image_embeds", lambda f: p.wrap(f, "judge_image", lambda x, *_: len(x)))
            _patch(stack, spm, "text_embeds", lambda f: p.wrap(f, "judge_text", lambda ids: len(ids)))
        _patch(stack, method, "sample", lambda f: p.wrap(record_round(f), "sampling_other"))
        _patch(stack, method, "_finite_only", lambda f: p.wrap(f, "data_pool"))
        _patch(stack, method, "_pool", lambda f: p.wrap(f, "data_pool"))
        _patch(stack, method, "loss", lambda f: p.wrap(f, "loss_other"))
        _patch(stack, trainer, "reference_output", lambda f: p.wrap(f, "site:reference_output"))
        _patch(stack, trainer.acc, "backward", lambda f: p.wrap(f, "train_backward"))
        _patch(stack, trainer.optimizer, "step", lambda f: p.wrap(f, "optimizer_step"))
        _patch(stack, Pairs, "to", lambda f: p.wrap(f, "data_to_device", lambda pairs, *_: len(pairs)))
        yield profiler


# Wrappers that only mark a call site; their own time (adapter switching, x0 maths) is glue of a component.
SITE_GLUE = {"site:x0_images": "sampling_other", "site:reference_output": "loss_other"}


def _merge_sites(values: dict, count: bool = False) -> dict:
    out = defaultdict(int if count else float)
    for name, v in values.items():
        if name in SITE_GLUE:
            if not count:  # a site's calls are not calls of the glue component
                out[SITE_GLUE[name]] += v
        else:
            out[name] += v
    return out


# ------------------------------------------------------------------ runs


def build_sd15(work: Path, resolution: int, device: str) -> tuple[Path, Path]:
    """SD1.5's full-size architecture with random weights, and a PickScore-size SPM (memory.py's builders)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_memory", REPO / "benchmarks" / "memory.py")
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)

    memory.SD15_UNET["sample_size"] = resolution // 8  # the pipeline's resolution = latent size x 8
    memory.build_sd15(work / "sd15", device)
    memory.build_spm(work / "spm", device)
    return work / "sd15", work / "spm"


def run_overrides(args, work: Path, models: tuple[Path, Path] | None) -> list[str]:
    precision = {"fp32": "'no'", "bf16": "bf16", "fp16": "fp16"}[args.dtype]
    common = ["train.num_epochs=1", f"train.mixed_precision={precision}", f"log.output_dir={work / 'run'}",
              "log.report_to=none", "log.checkpointing_steps=0"]
    if models is not None:
        common += [f"model.pretrained={models[0]}", f"model.spm={models[1]}"]
    if args.setting == "sd15":  # one round; every diverted step gives a pair (memory.py's choice)
        common += ["sample.threshold=0", f"sample.batch_size={args.prompts}", "sample.batches_per_epoch=1"]
    return common


def profile_epoch(trainer, warmup: int, cuda: bool) -> dict:
    """Epoch `warmup` of `trainer` profiled (after `warmup` untimed epochs)."""
    import torch

    for epoch in range(warmup):
        trainer.train_epoch(epoch)
    sync = torch.cuda.synchronize if cuda else None
    profiler = Profiler(sync)
    rows_before = dict(trainer.unet_rows)
    with instrument(trainer, profiler):
        if cuda:
            torch.cuda.synchronize()
        load_before = os.getloadavg()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        metrics = trainer.train_epoch(warmup)
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    hook_rows = {k: trainer.unet_rows[k] - rows_before[k] for k in rows_before}
    return summarise(profiler, wall, cpu, metrics, hook_rows, load=(load_before, os.getloadavg()))


def summarise(p: Profiler, wall: float, cpu: float, metrics: dict, hook_rows: dict, load) -> dict:
    seconds, cpu_seconds = _merge_sites(p.wall), _merge_sites(p.cpu)
    calls, rows = _merge_sites(p.calls, count=True), _merge_sites(p.rows, count=True)
    for glue in ("sampling_other", "loss_other"):  # what these wrap is counted by the component inside
        calls[glue] = 0
    seconds["other"] = wall - sum(v for k, v in seconds.items() if k != "other")
    cpu_seconds["other"] = cpu - sum(v for k, v in cpu_seconds.items() if k != "other")
    components = {}
    for name in [*COMPONENTS, *sorted(set(seconds) - set(COMPONENTS))]:
        components[name] = dict(seconds=round(seconds.get(name, 0.0), 4), share=round(seconds.get(name, 0.0) / wall, 4),
                                cpu_seconds=round(cpu_seconds.get(name, 0.0), 4), calls=calls.get(name, 0),
                                rows=rows.get(name, 0))
    rounds = p.notes["rounds"]
    diverted = sum(r["diverted_steps"] for r in rounds)
    candidates = sum(r["candidate_sets"] for r in rounds)  # prompts x diverted steps
    images = rows.get("vae_decode", 0)
    per_step = {name: seconds.get(name, 0.0) / max(diverted, 1) for name in SCORING}
    sampling_phase = sum(seconds.get(n, 0.0) for n in SAMPLING_PHASE)
    return dict(
        epoch_seconds=round(wall, 3), epoch_cpu_seconds=round(cpu, 3), components=components,
        phases=dict(sampling=round(sampling_phase, 3), training=round(wall - sampling_phase, 3),
                    sampling_share=round(sampling_phase / wall, 4)),
        method_seconds=dict(sample=metrics.get("sample_seconds"), train=metrics.get("train_seconds")),
        rounds=len(rounds), prompts=sum(r["prompts"] for r in rounds), diverted_steps=diverted,
        candidate_sets=candidates, candidate_images=images, pairs_sampled=metrics.get("pairs_sampled"),
        pairs_trained=metrics.get("pairs_trained"), loss=metrics.get("loss"),
        per_diverted_step=dict(
            seconds={k: round(v, 4) for k, v in per_step.items()},
            scoring_seconds=round(sum(per_step.values()), 4),
            sampling_phase_seconds=round(sampling_phase / max(diverted, 1), 4),
            ms_per_candidate_image={k: round(1000 * seconds.get(k, 0.0) / max(images, 1), 2) for k in SCORING}),
        network_rows=dict(timed_no_grad=sum(rows.get(n, 0) for n in ("sampling_network", "scoring_network",
                                                                    "train_reference_forward")),
                          timed_grad=rows.get("train_policy_forward", 0), hooks_no_grad=hook_rows["forward"],
                          hooks_grad=hook_rows["train"]),
        load_average=dict(before=[round(x, 2) for x in load[0]], after=[round(x, 2) for x in load[1]]),
    )


def describe_machine(device: str) -> dict:
    import torch

    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", cpu=model, cores=os.cpu_count(),
                torch=torch.__version__, threads=torch.get_num_threads(), python=platform.python_version())


def run_setting(args) -> dict:
    import torch

    from spo.config import SPOConfig, load_config
    from spo.trainer import Trainer

    cuda = args.device == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.time()
        models = None
        if args.setting == "sd15" and not args.pretrained:
            models = build_sd15(work, args.resolution, args.device)
        elif args.pretrained:
            models = (Path(args.pretrained), Path(args.spm))
        build_s = time.time() - t0
        overrides = run_overrides(args, work, models)
        cfg = load_config(SPOConfig, REPO / "configs" / f"{args.setting}.yaml", [*overrides, *args.override])
        trainer = Trainer(cfg, overwrite=True, log=lambda m: None).setup()
        result = profile_epoch(trainer, args.warmup, cuda)
        s, t = cfg.sample, cfg.train
        result.update(
            setting=args.setting, name=args.name or args.setting, machine=describe_machine(args.device),
            dtype=args.dtype,
            resolution=trainer.diffusion.resolution, build_seconds=round(build_s, 1), warmup_epochs=args.warmup,
            parameters={k: sum(p.numel() for p in m.parameters()) for k, m in
                        (("unet", trainer.diffusion.unet), ("vae", trainer.diffusion.vae),
                         ("text_encoder", trainer.diffusion.pipe.text_encoder), ("spm", trainer.method.spm))},
            config=dict(num_steps=s.num_steps, divert_start_step=s.divert_start_step, num_candidates=s.num_candidates,
                        inner_steps=s.inner_steps, prompts_per_round=s.batch_size, threshold=s.threshold,
                        guidance_scale=s.guidance_scale, train_batch_size=t.batch_size, inner_epochs=t.inner_epochs,
                        gradient_accumulation_steps=t.gradient_accumulation_steps,
                        mixed_precision=t.mixed_precision, lora_rank=cfg.model.lora_rank),
            command=args.command)
        trainer.lock.release()  # train() would have; the epoch was run without it
        del trainer
        if cuda:
            torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------ report


def markdown(results: list[dict]) -> str:
    lines = ["# Where one SPO epoch's time goes", "",
             "`benchmarks/epoch_profile.py`: one epoch of the ordinary trainer with timers wrapped around the trainer's "
             "objects (no timer in the library). Each component is exclusive (nested timers subtracted), so the "
             "column adds up to the epoch; \"other\" is the epoch minus every timed component. CPU seconds are "
             "the process's CPU time: on a shared machine the wall seconds are inflated by other jobs, the shares "
             "much less so.", "", *overview(results), ""]
    for r in results:
        lines += _setting_markdown(r)
    return "\n".join(lines)


# the run's recorded settings -> the preset's field they come from
RECIPE_FIELDS = {"num_steps": "sample.num_steps", "divert_start_step": "sample.divert_start_step",
                 "num_candidates": "sample.num_candidates", "inner_steps": "sample.inner_steps",
                 "prompts_per_round": "sample.batch_size", "threshold": "sample.threshold",
                 "guidance_scale": "sample.guidance_scale", "train_batch_size": "train.batch_size",
                 "inner_epochs": "train.inner_epochs",
                 "gradient_accumulation_steps": "train.gradient_accumulation_steps",
                 "mixed_precision": "train.mixed_precision", "lora_rank": "model.lora_rank"}
RECIPE_RESOLUTION = {"sd15": 512}  # the preset's base model (the world's comes with its checkpoint)


def recipe_differences(r: dict) -> list[str]:
    """What the profiled run changed from its preset (`configs/<setting>.yaml`), as "field recipe -> run"."""
    from spo.config import SPOConfig, load_config

    recipe = load_config(SPOConfig, REPO / "configs" / f"{r['setting']}.yaml", [])
    out = []
    if r["resolution"] != RECIPE_RESOLUTION.get(r["setting"], r["resolution"]):
        out.append(f"resolution {RECIPE_RESOLUTION[r['setting']]} -> {r['resolution']} px")
    for key, path in RECIPE_FIELDS.items():
        group, name = path.split(".")
        value = getattr(getattr(recipe, group), name)
        if value != r["config"][key]:
            out.append(f"{path} {value} -> {r['config'][key]}")
    return out


# overview columns: title -> the components it adds up
OVERVIEW = {"plain trajectory": ("sampling_network",), "scoring network": ("scoring_network",),
            "VAE decode": ("vae_decode",), "judge": ("judge_image", "judge_text", "judge_other"),
            "text encoding": ("text_encoding_sampling", "text_encoding_training"),
            "training (ref + policy + backward + step)": ("train_reference_forward", "train_policy_forward",
                                                          "train_backward", "optimizer_step"),
            "rest": ("sampling_other", "data_pool", "data_to_device", "loss_other", "other")}


def overview(results: list[dict]) -> list[str]:
    """One line per profiled setting: the epoch's shares by group."""
    lines = ["| setting | px | epoch s | sampling phase | " + " | ".join(OVERVIEW) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(OVERVIEW)]
    for r in results:
        shares = [sum(r["components"].get(n, {}).get("share", 0.0) for n in names) for names in OVERVIEW.values()]
        lines.append(f"| {r['name']} | {r['resolution']} | {r['epoch_seconds']:.1f} | "
                     f"{100 * r['phases']['sampling_share']:.1f} % | "
                     + " | ".join(f"{100 * v:.1f} %" for v in shares) + " |")
    return lines


def _setting_markdown(r: dict) -> list[str]:
    c, m, cpu = r["config"], r["machine"], r["machine"]["device"] == "cpu"
    changed = recipe_differences(r)
    params = ", ".join(f"{k} {v / 1e6:.4g}M" for k, v in r["parameters"].items())
    lines = [
        f"## {r['name']}", "",
        f"`{r['command']}`", "",
        f"Machine: {m['device']} ({m['cpu']}, {m['cores']} cores), torch {m['torch']}, **{m['threads']} torch "
        f"thread(s)**, {r['dtype']} (mixed_precision={c['mixed_precision']}); load average "
        f"{r['load_average']['before'][0]} before, {r['load_average']['after'][0]} after (other jobs on the machine).",
        "",
        f"Run: {r['resolution']} px, {c['num_steps']} DDIM steps, divert from step {c['divert_start_step']}, "
        f"K={c['num_candidates']}, inner_steps {c['inner_steps']}, {c['prompts_per_round']} prompt(s) per round, "
        f"threshold {c['threshold']}, CFG {c['guidance_scale']}; training batch {c['train_batch_size']}, "
        f"inner_epochs {c['inner_epochs']}, LoRA rank {c['lora_rank']}. Parameters: {params}. "
        f"{r['rounds']} round(s), {r['prompts']} prompts, {r['diverted_steps']} diverted steps, "
        f"{r['candidate_images']} candidate images decoded and judged, {r['pairs_sampled']} pairs sampled, "
        f"{r['pairs_trained']} trained; warm-up epochs {r['warmup_epochs']}.", "",
        f"**Changed from `configs/{r['setting']}.yaml`**: "
        + ("; ".join(changed) + " (to fit the machine)" if changed else "nothing") + ".", "",
        f"Epoch: **{r['epoch_seconds']:.1f} s** wall"
        + (f", {r['epoch_cpu_seconds']:.1f} s CPU" if cpu else "")
        + f"; sampling phase {r['phases']['sampling']:.1f} s (**{100 * r['phases']['sampling_share']:.1f} %**), "
        f"training phase {r['phases']['training']:.1f} s.", "",
        "| component | seconds | share | " + ("CPU s | CPU share | " if cpu else "") + "calls | rows | what |",
        "|---|---:|---:|" + ("---:|---:|" if cpu else "") + "---:|---:|---|"]
    for name, v in r["components"].items():
        cpu_cols = f"{v['cpu_seconds']:.2f} | {100 * v['cpu_seconds'] / max(r['epoch_cpu_seconds'], 1e-9):.1f} % | " \
            if cpu else ""
        lines.append(f"| {name} | {v['seconds']:.2f} | {100 * v['share']:.1f} % | {cpu_cols}{v['calls']} | "
                     f"{v['rows']} | {COMPONENTS.get(name, '')} |")
    per = r["per_diverted_step"]
    lines += ["", "Per diverted step (all prompts of the round at once) and per candidate image:", "",
              "| scoring component | s per diverted step | ms per candidate image |", "|---|---:|---:|"]
    for name in SCORING:
        lines.append(f"| {name} | {per['seconds'][name]:.3f} | {per['ms_per_candidate_image'][name]:.1f} |")
    lines += [f"| **scoring total** | **{per['scoring_seconds']:.3f}** | "
              f"**{sum(per['ms_per_candidate_image'].values()):.1f}** |",
              f"| sampling phase (all of it) | {per['sampling_phase_seconds']:.3f} | |", "",
              f"Network rows: {r['network_rows']['timed_no_grad']} without grad and {r['network_rows']['timed_grad']} "
              f"with grad through the timers; the trainer's forward hooks counted {r['network_rows']['hooks_no_grad']} "
              f"and {r['network_rows']['hooks_grad']} (equal: no network call escaped the timers).", ""]
    return lines


def write_report(out: Path, result: dict) -> Path:
    from spo.files import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"profile_{result['name']}.json", json.dumps(result, indent=2))
    results = [json.loads(f.read_text()) for f in sorted(out.glob("profile_*.json"))]
    results.sort(key=lambda r: (r["setting"] != "world", r["resolution"], r["name"]))
    atomic_write_text(out / "profile.md", markdown(results))
    return out / "profile.md"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("world", "sd15"), default="world")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="mixed precision of the run (frozen weights in it, LoRA in fp32); GPU for the half ones")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: less interference)")
    parser.add_argument("--resolution", type=int, default=None, help="sd15: pixels (default 512 on CUDA, 256 on CPU)")
    parser.add_argument("--prompts", type=int, default=None, help="sd15: prompts per round (default 10 CUDA, 1 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed epochs first (default 1 on CUDA, 0 on CPU)")
    parser.add_argument("--pretrained", default="", help="a pipeline folder instead of the setting's model (tests)")
    parser.add_argument("--spm", default="", help="with --pretrained: the step judge")
    parser.add_argument("--override", nargs="*", default=[], help="config overrides key=value (after the setting's)")
    parser.add_argument("--name", default="", help="report name: writes profile_<name>.json (default: the setting)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.command = "python benchmarks/epoch_profile.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA initialises: accelerate then picks the CPU
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.device == "cpu" and args.dtype != "fp32":
        raise SystemExit("--dtype bf16/fp16 is for GPUs; use --dtype fp32 on CPU")
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    args.resolution = args.resolution or (512 if cuda else 256)
    args.prompts = args.prompts or (10 if cuda else 1)
    args.warmup = (1 if cuda else 0) if args.warmup is None else args.warmup
    if args.pretrained and not args.spm:
        raise SystemExit("--pretrained needs --spm (the step judge to use with it)")
    result = run_setting(args)
    path = write_report(args.out, result)
    print(path.read_text())
    return result


if __name__ == "__main__":
    main()
