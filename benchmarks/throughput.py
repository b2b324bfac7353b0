"""Benchmark 3 (issue #5): training throughput of our SPO step against the straightforward one.

Both variants train the same LoRA (same rank, init, optimizer, clipping) on the same pairs and
compute the same clipped SPO loss; they differ only in how they get the four log-probabilities.

  ours             `spo.trainer.pair_loss`: win and lose share x_t, t and the prompt, so ONE guided
                   policy call gives μ_θ for both and ONE guided reference call gives μ_ref for
                   both; the reference is the same LoRA UNet with its adapters switched off.
  straightforward  what the SPO authors' training loop computes: log p_θ(win), log p_ref(win),
                   log p_θ(lose), log p_ref(lose), each from its own guided UNet call, with a full
                   deep copy of the UNet as the reference (evaluated under no_grad).

The script first checks, in float32, that the two give the same loss and the same LoRA gradients
on the same batch; only then is the speed comparison one of equal computations. Each timed run
is a fresh subprocess (so that peak memory is per variant), and the variants alternate over the
repeats (ours, straightforward, straightforward, ours, ...) so that slow drifts of a shared
machine hit both alike.

    python benchmarks/throughput.py --out benchmarks/results            # CPU: world UNet + SD1.5-size UNet
    python benchmarks/throughput.py --quick --out /tmp/bench             # CI: a few minutes on 2 cores
    python benchmarks/throughput.py --device cuda --out benchmarks/results   # SD1.5 size at 512 px, batch 10
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from types import SimpleNamespace

from spo.config import DEFAULT_LORA_TARGETS, ModelConfig, SampleConfig, TrainConfig
from spo.files import atomic_write_text
from spo.methods.spo import pair_loss, spo_loss, transition_inputs
from spo.models import Diffusion, guided_output
from spo.resampler import Pairs
from spo.sampling import add_noise, ddim_transition, gaussian_log_prob

VARIANTS = ("ours", "straightforward")
HP_SAMPLE, HP_TRAIN, HP_MODEL = SampleConfig(), TrainConfig(), ModelConfig()  # the library's training defaults

# Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5, unet/config.json), written out so that
# nothing is downloaded; the weights are random (throughput does not depend on their values).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
)
SD15_TEXT_LENGTH = 77


@dataclass
class Setting:
    """One model's benchmark settings."""

    model: str  # world | sd15
    latent: int  # latent height = width
    batch: int  # pairs per training step
    iters: int  # timed training steps per run
    warmup: int  # untimed training steps before them
    repeats: int  # runs per variant (each a fresh process)


def default_settings(device: str, quick: bool) -> dict[str, Setting]:
    if device == "cuda":  # the paper's SD1.5 recipe: 512 px, 10 pairs per step per GPU
        return {"world": Setting("world", 0, 8, 20, 3, 3), "sd15": Setting("sd15", 64, 10, 10, 3, 3)}
    if quick:  # sd15 only when asked for by --models: even at 8x8 latents it takes minutes on 2 cores
        return {"world": Setting("world", 0, 4, 3, 1, 1), "sd15": Setting("sd15", 8, 1, 1, 0, 1)}
    return {"world": Setting("world", 0, 8, 20, 2, 5), "sd15": Setting("sd15", 32, 2, 2, 1, 3)}


# ------------------------------------------------------------------ models and data


def build_unet(model: str, world: str, dtype: torch.dtype, device: str, seed: int):
    """(UNet, DDIM scheduler with the training schedule set, text length) for `model`."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    if model == "world":
        unet = UNet2DConditionModel.from_pretrained(str(Path(world) / "unet"))
        sched = DDIMScheduler.from_pretrained(str(Path(world) / "scheduler"))
        text_cfg = json.loads((Path(world) / "text_encoder" / "config.json").read_text())
        length = text_cfg.get("text_config", text_cfg).get("max_position_embeddings", 77)
    elif model == "sd15":
        from spo.world.architecture import scheduler as sd15_scheduler

        torch.manual_seed(seed)
        unet, sched, length = UNet2DConditionModel(**SD15_UNET), sd15_scheduler(), SD15_TEXT_LENGTH
    else:
        raise SystemExit(f"unknown model {model!r}; choose world or sd15")
    sched.set_timesteps(HP_SAMPLE.num_steps)
    return unet.requires_grad_(False).to(device=device, dtype=dtype), sched, length


def step_gap(sched) -> int:
    return sched.config.num_train_timesteps // HP_SAMPLE.num_steps


def make_pairs(unet, sched, length: int, latent: int, batch: int, n_batches: int, seed: int) -> list[dict]:
    """Fixed-seed pair batches whose win/lose are drawn from the base model's own DDIM transition.

    x_t = noised random latents at training timesteps (from divert_start_step on), cond/uncond =
    random text embeddings (one shared unconditional embedding, as for the empty prompt).
    """
    g = torch.Generator().manual_seed(seed)
    device, dim = unet.device, unet.config.cross_attention_dim
    shape = (batch, unet.config.in_channels, latent, latent)
    trainable_t = sched.timesteps[HP_SAMPLE.divert_start_step:]
    out = []
    for _ in range(n_batches):
        t = trainable_t[torch.randint(len(trainable_t), (batch,), generator=g)]
        x_t = add_noise(sched, torch.randn(shape, generator=g), torch.randn(shape, generator=g), t)
        cond = torch.randn(batch, length, dim, generator=g)
        uncond = torch.randn(1, length, dim, generator=g).expand(batch, -1, -1).contiguous()
        x, c, u = (v.to(device=device, dtype=unet.dtype) for v in (x_t, cond, uncond))
        with torch.no_grad():
            guided = guided_output(unet, x, t.to(device), c, u, HP_SAMPLE.guidance_scale)
            mean, std, _ = ddim_transition(sched, guided, t.to(device), t.to(device) - step_gap(sched), x.float(),
                                           HP_SAMPLE.eta)
        mean, std = mean.float().cpu(), std.float().cpu()
        win = mean + std * torch.randn(shape, generator=g)
        lose = mean + std * torch.randn(shape, generator=g)
        out.append(dict(x_t=x_t, timesteps=t, win=win, lose=lose, cond=cond, uncond=uncond))
    return out


def to_pairs(b: dict, device: str, dtype: torch.dtype):
    n = len(b["timesteps"])
    pairs = Pairs(x_t=b["x_t"].to(device, dtype), timesteps=b["timesteps"].to(device),
                  prev_timesteps=b["timesteps"].to(device) - 1000 // HP_SAMPLE.num_steps, win=b["win"].to(device),
                  lose=b["lose"].to(device), prompt_index=torch.arange(n), step_index=torch.zeros(n, dtype=torch.long),
                  gap=torch.ones(n)).to(device)
    return pairs, b["cond"].to(device, dtype), b["uncond"].to(device, dtype)


def add_lora(unet, seed: int) -> list[torch.nn.Parameter]:
    """The LoRA of `spo.trainer` (same config, gaussian init drawn from `seed`), trainable in float32."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=HP_MODEL.lora_rank, lora_alpha=HP_MODEL.lora_alpha, init_lora_weights="gaussian",
                                target_modules=list(DEFAULT_LORA_TARGETS)))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    return trainable


def tensor_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


class CallCounter:
    """Counts UNet forward calls and the rows (samples) they evaluate, via forward hooks."""

    def __init__(self, *unets):
        self.calls = self.rows = 0
        self.handles = [u.register_forward_hook(self._hook) for u in unets]

    def _hook(self, module, args, output):
        self.calls += 1
        self.rows += len(args[0])

    def reset(self):
        self.calls = self.rows = 0


# ------------------------------------------------------------------ the two losses


def reference_output(unet, pairs: Pairs, cond, uncond) -> torch.Tensor:
    """The base model's guided output on `transition_inputs`: the same UNet with its adapters off."""
    x, t, _, c, u, _ = transition_inputs(pairs, cond, uncond)
    with torch.no_grad():
        unet.disable_adapters()
        try:
            return guided_output(unet, x, t, c, u, HP_SAMPLE.guidance_scale)
        finally:
            unet.enable_adapters()


def ours_loss(unet, sched, pairs: Pairs, cond, uncond, with_info: bool = False):
    """Our training step's loss: one reference call (adapters off) + `pair_loss` (one policy call)."""
    ref = reference_output(unet, pairs, cond, uncond)
    adapter = Diffusion(SimpleNamespace(unet=unet, scheduler=sched))  # the family adapter over a bare UNet
    loss, info = pair_loss(adapter, unet, ref, pairs, cond, uncond, HP_SAMPLE.guidance_scale, HP_SAMPLE.eta,
                           HP_TRAIN.beta, HP_TRAIN.eps)
    return (loss, info) if with_info else loss


def straightforward_loss(unet, reference, sched, pairs: Pairs, cond, uncond):
    """The authors' computation: four guided calls per pair batch, a separate reference UNet."""
    g, eta = HP_SAMPLE.guidance_scale, HP_SAMPLE.eta

    def log_prob(model, x_next):
        out = guided_output(model, pairs.x_t, pairs.timesteps, cond, uncond, g)
        mean, std, _ = ddim_transition(sched, out, pairs.timesteps, pairs.prev_timesteps, pairs.x_t, eta)
        return gaussian_log_prob(x_next, mean, std)

    policy_win = log_prob(unet, pairs.win)
    with torch.no_grad():
        ref_win = log_prob(reference, pairs.win)
    policy_lose = log_prob(unet, pairs.lose)
    with torch.no_grad():
        ref_lose = log_prob(reference, pairs.lose)
    loss, _ = spo_loss(policy_win - ref_win, policy_lose - ref_lose, HP_TRAIN.beta, HP_TRAIN.eps)
    return loss


def variant_loss(variant: str, unet, reference, sched, pairs, cond, uncond):
    if variant == "ours":
        return ours_loss(unet, sched, pairs, cond, uncond)
    return straightforward_loss(unet, reference, sched, pairs, cond, uncond)


def log_ratios(unet, sched, pairs, cond, uncond) -> torch.Tensor:
    with torch.no_grad():
        _, info = ours_loss(unet, sched, pairs, cond, uncond, with_info=True)
    return torch.cat([info["log_ratio_win"], info["log_ratio_lose"]]).cpu()


def move_lora_off_init(unet, sched, pairs, cond, uncond, seed: int, band=(0.01, 0.09)) -> torch.Tensor:
    """Random LoRA B (zero at init, where policy == reference), scaled so that max |log r| lies in `band`.

    Inside the clip band [log 0.9, log 1.1] the ratios differ clearly from 1 and (almost) no pair is
    clipped, so the comparison covers the loss value and a non-zero gradient. log r grows with the
    scale of B anything from linearly to steeply, so the scale is found by bracketing (x10) and then
    bisection in log space. Returns the final log-ratios.
    """
    lora_b = [p for n, p in unet.named_parameters() if p.requires_grad and "lora_B" in n]
    g = torch.Generator().manual_seed(seed + 1)
    directions = [1e-2 * torch.randn(p.shape, generator=g).to(p.device) for p in lora_b]

    def ratios_at(scale: float) -> torch.Tensor:
        with torch.no_grad():
            for p, d in zip(lora_b, directions):
                p.copy_(scale * d)
        return log_ratios(unet, sched, pairs, cond, uncond)

    lo = hi = None
    scale = 1.0
    for _ in range(10):
        ratios = ratios_at(scale)
        peak = ratios.abs().max().item()
        if band[0] <= peak <= band[1]:
            break
        lo, hi = (scale, hi) if peak < band[0] else (lo, scale)
        scale = math.sqrt(lo * hi) if lo and hi else (scale * 10 if hi is None else scale / 10)
    return ratios


def check_equivalence(unet, reference, sched, batch: dict, device: str, seed: int) -> dict:
    """Loss and LoRA gradients of both variants on one batch, with the LoRA moved off its init.

    `unet` carries the LoRA (adapters on); `reference` is a deep copy of the base UNet taken before
    the LoRA was added. Returns the differences, the UNet call counts per variant, and the
    log-ratios' size and clipped fraction (clipped pairs get no gradient in either variant).
    """
    trainable = [p for p in unet.parameters() if p.requires_grad]
    pairs, cond, uncond = to_pairs(batch, device, torch.float32)
    ratios = move_lora_off_init(unet, sched, pairs, cond, uncond, seed)
    counter = CallCounter(unet, reference)
    result = {}
    for variant in VARIANTS:
        counter.reset()
        for p in trainable:
            p.grad = None
        loss = variant_loss(variant, unet, reference, sched, pairs, cond, uncond)
        loss.backward()
        result[variant] = dict(loss=loss.item(), grads=[p.grad.detach().double().clone() for p in trainable],
                               unet_calls=counter.calls, unet_rows=counter.rows)
    for h in counter.handles:
        h.remove()
    go, gs = (torch.cat([x.flatten() for x in result[v]["grads"]]) for v in VARIANTS)
    lo, hi = math.log(1 - HP_TRAIN.eps), math.log(1 + HP_TRAIN.eps)
    loss_o, loss_s = result["ours"]["loss"], result["straightforward"]["loss"]
    return dict(
        loss_ours=loss_o, loss_straightforward=loss_s, loss_rel_diff=abs(loss_o - loss_s) / max(abs(loss_o), 1e-30),
        grad_rel_diff=((go - gs).norm() / gs.norm().clamp(min=1e-30)).item(),
        grad_max_abs_diff=(go - gs).abs().max().item(), grad_max_abs=gs.abs().max().item(),
        grad_nonzero=int((gs != 0).sum()), grad_numel=gs.numel(), log_ratio_abs_max=ratios.abs().max().item(),
        clipped_fraction=((ratios < lo) | (ratios > hi)).float().mean().item(),
        unet_calls={v: result[v]["unet_calls"] for v in VARIANTS},
        unet_rows={v: result[v]["unet_rows"] for v in VARIANTS},
        pairs=len(pairs),
    )


# ------------------------------------------------------------------ memory


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (what ru_maxrss reports) to the current RSS (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_kb() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


# ------------------------------------------------------------------ worker processes


def worker(args) -> dict:
    """One fresh process: verify (and write the pair data), or time one variant."""
    device, seed = args.device, args.seed
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda":  # TF32 as in training for timing; exact float32 for the equivalence check
        torch.backends.cuda.matmul.allow_tf32 = HP_TRAIN.allow_tf32 and args.variant != "verify"
        torch.backends.cudnn.allow_tf32 = args.variant != "verify"
    if args.variant == "verify":
        unet, sched, length = build_unet(args.model, args.world, torch.float32, device, seed)
        data = make_pairs(unet, sched, length, args.latent or unet.config.sample_size, args.batch, args.n_batches, seed)
        torch.save(data, args.data)
        reference = copy.deepcopy(unet).eval()
        add_lora(unet, seed)
        # the check is per pair, so a few pairs suffice (the straightforward variant keeps two policy graphs)
        first = {k: v[: min(args.batch, 4)] for k, v in data[0].items()}
        report = check_equivalence(unet, reference, sched, first, device, seed)
        return dict(report, params=sum(p.numel() for p in reference.parameters()))

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    unet, sched, _ = build_unet(args.model, args.world, dtype, device, seed)
    batches = [to_pairs(b, device, dtype) for b in torch.load(args.data, weights_only=False)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        sync()
        base_mem = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        peak_reset = True
    else:
        base_mem, peak_reset = rss_kb() * 1024, reset_peak_rss()
    reference = copy.deepcopy(unet).eval() if args.variant == "straightforward" else None
    trainable = add_lora(unet, seed)
    unet.train()
    optimizer = torch.optim.AdamW(trainable, lr=HP_TRAIN.learning_rate, weight_decay=HP_TRAIN.adam_weight_decay)
    counter = CallCounter(*[m for m in (unet, reference) if m is not None])
    times, losses = [], []
    for i in range(args.warmup + args.iters):
        if i == args.warmup:
            counter.reset()
        pairs, cond, uncond = batches[i % len(batches)]
        sync()
        t0 = time.perf_counter()
        loss = variant_loss(args.variant, unet, reference, sched, pairs, cond, uncond)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, HP_TRAIN.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_kb() * 1024
    return dict(variant=args.variant, step_seconds=times, losses=losses,
                pairs_per_s=args.batch * len(times) / sum(times), unet_calls=counter.calls, unet_rows=counter.rows,
                steps=len(times), pairs_per_step=args.batch, baseline_bytes=base_mem, peak_bytes=peak,
                peak_over_baseline_bytes=peak - base_mem, peak_reset_after_load=peak_reset,
                reference_bytes=tensor_bytes(reference) if reference is not None else 0,
                lora_bytes=sum(p.numel() * p.element_size() for p in trainable), threads=torch.get_num_threads())


# ------------------------------------------------------------------ driver


def spawn(args, setting: Setting, variant: str, data: Path, out_json: Path, log) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--model", setting.model,
           "--world", args.world, "--device", args.device, "--precision", args.precision, "--seed", str(args.seed),
           "--latent", str(setting.latent), "--batch", str(setting.batch), "--iters", str(setting.iters),
           "--warmup", str(setting.warmup), "--n-batches", str(setting.warmup + setting.iters),
           "--data", str(data), "--json", str(out_json)] + (["--threads", str(args.threads)] if args.threads else [])
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker {variant}/{setting.model} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out_json.read_text())
    result["process_seconds"] = time.time() - t0
    log(f"  {setting.model:5s} {variant:15s} {time.time() - t0:6.1f}s"
        + (f"  {result['pairs_per_s']:.3f} pairs/s" if "pairs_per_s" in result else ""))
    return result


def run_model(args, setting: Setting, tmp: Path, log) -> dict:
    data, runs = tmp / f"{setting.model}-pairs.pt", {v: [] for v in VARIANTS}
    verify = spawn(args, setting, "verify", data, tmp / f"{setting.model}-verify.json", log)
    for r in range(setting.repeats):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for v in order:
            runs[v].append(spawn(args, setting, v, data, tmp / f"{setting.model}-{v}-{r}.json", log))
    return dict(setting=asdict(setting), verify=verify, runs=runs)


def summarize(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs]
    return dict(median=statistics.median(values), min=min(values), max=max(values), values=values)


def machine_info(device: str, threads: int | None = None) -> dict:
    import diffusers
    import peft

    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = threads or torch.get_num_threads()
    info = dict(cpu=cpu, cores=os.cpu_count(), torch_threads=threads, torch=torch.__version__,
                diffusers=diffusers.__version__, peft=peft.__version__, python=platform.python_version(),
                device=device, load_average_at_start=os.getloadavg()[0])
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def mb(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def write_markdown(path: Path, results: dict) -> None:
    m, cuda = results["machine"], results["machine"]["device"] == "cuda"
    mem_name = "peak CUDA memory allocated over the loaded base model" if cuda else "peak RSS over RSS after model load"
    lines = [
        "# Training throughput: our SPO step vs the straightforward one",
        "",
        "Benchmark 3 of issue #5, written by `benchmarks/throughput.py`. *Ours*: `spo.trainer.pair_loss`, one guided "
        "policy call and one guided reference call per pair batch (the reference is the LoRA UNet with its adapters "
        "off). *Straightforward* (the SPO authors' training loop): policy and reference evaluated separately for the "
        "win and for the lose sample, four guided calls per pair batch, with a deep copy of the UNet as the reference. "
        f"Same LoRA (rank {HP_MODEL.lora_rank}, targets {', '.join(DEFAULT_LORA_TARGETS)}), AdamW (lr "
        f"{HP_TRAIN.learning_rate:g}), grad-norm clip {HP_TRAIN.max_grad_norm:g}, DDIM {HP_SAMPLE.num_steps} steps, "
        f"eta {HP_SAMPLE.eta:g}, CFG {HP_SAMPLE.guidance_scale:g}, beta {HP_TRAIN.beta:g}, eps {HP_TRAIN.eps:g} "
        "in both.",
        "",
        "| model | latents | pairs/step | variant | pairs/s median [min, max] | s/step median | UNet calls / step "
        f"(rows per pair) | {mem_name}, MiB median [min, max] | reference params+buffers, MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in results["models"].items():
        s = res["setting"]
        for v in VARIANTS:
            runs = res["runs"][v]
            pps, mem = summarize(runs, "pairs_per_s"), summarize(runs, "peak_over_baseline_bytes")
            step = statistics.median([x for r in runs for x in r["step_seconds"]])
            calls = runs[0]["unet_calls"] / runs[0]["steps"]
            rows = runs[0]["unet_rows"] / (runs[0]["steps"] * s["batch"])
            lines.append(f"| {name} | {res['latent']}x{res['latent']} | {s['batch']} | {v} | {pps['median']:.3f} "
                         f"[{pps['min']:.3f}, {pps['max']:.3f}] | {step:.3f} | {calls:g} ({rows:g}) | "
                         f"{mb(mem['median'])} [{mb(mem['min'])}, {mb(mem['max'])}] | "
                         f"{mb(runs[0]['reference_bytes'])} |")
    lines += ["", "| model | speed-up, median pairs/s ours / straightforward [per-repeat min, max] | memory, "
              "straightforward / ours (medians) | loss rel. diff | LoRA-grad rel. diff (L2) | max abs log-ratio | "
              "log-ratios clipped |",
              "|---|---|---|---|---|---|---|"]
    for name, res in results["models"].items():
        o, s_ = res["runs"]["ours"], res["runs"]["straightforward"]
        ratio = summarize(o, "pairs_per_s")["median"] / summarize(s_, "pairs_per_s")["median"]
        per = [a["pairs_per_s"] / b["pairs_per_s"] for a, b in zip(o, s_)]
        mem_o, mem_s = (summarize(x, "peak_over_baseline_bytes")["median"] for x in (o, s_))
        mem = mem_s / max(mem_o, 1)
        ver = res["verify"]
        lines.append(f"| {name} | **{ratio:.2f}x** [{min(per):.2f}, {max(per):.2f}] | {mem:.2f}x | "
                     f"{ver['loss_rel_diff']:.1e} | {ver['grad_rel_diff']:.1e} | {ver['log_ratio_abs_max']:.3f} | "
                     f"{ver['clipped_fraction']:.0%} |")
    lines += [
        "",
        "Equivalence is checked first, in float32, on up to 4 pairs per model with the LoRA moved off its zero init "
        "(random B, scaled so that the largest |log-ratio| is about 0.05, half the clip band); `loss rel. diff` and "
        "`LoRA-grad rel. diff` compare the two variants there. "
        "*Rows per pair* counts UNet samples evaluated per pair (CFG doubles each call). Memory: "
        + ("`torch.cuda.max_memory_allocated()` minus the allocation after the base UNet and the data were on the GPU."
           if cuda else
           "each run is its own process; the RSS high-water mark (`ru_maxrss`) is reset to the current RSS after the "
           "base UNet and the data are loaded (`/proc/self/clear_refs`), so the number is what the variant adds: the "
           "reference copy (straightforward only), the LoRA, the optimizer state and the activations.")
        + " Pairs are random but fixed-seed: x_t = noised random latents at training timesteps, random text "
        "embeddings, win/lose drawn from the base model's own DDIM transition; both variants train on the same "
        "batches.",
        "",
        "## Run",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} (CPU threads per run: {m['torch_threads']}), "
        f"diffusers {m['diffusers']}, peft {m['peft']}, Python {m['python']}, device {m['device']}"
        + (f" ({m['gpu']})" if cuda else "") + f"; 1-min load average {m['load_average_at_start']:.2f} at start, "
        f"{m.get('load_average_at_end', float('nan')):.2f} at the end",
        f"- seed {results['seed']} (weights of the SD1.5-size UNet, LoRA init, pairs); precision "
        f"{results['precision']} "
        f"(frozen weights; LoRA and its optimizer in float32)",
    ]
    for name, res in results["models"].items():
        s = res["setting"]
        lines.append(f"- {name}: {s['repeats']} repeat{'s' * (s['repeats'] != 1)} per variant, alternating (ours, "
                     f"straightforward, straightforward, ours, ...), each a fresh process with {s['warmup']} "
                     f"warm-up + {s['iters']} timed steps of {s['batch']} pairs; UNet "
                     f"{res['verify']['params'] / 1e6:.1f} M parameters")
    lines.append(f"- total wall time {results['wall_seconds']:.0f} s; raw numbers in `{results['name']}.json`")
    if results.get("notes"):
        lines += [f"- {n}" for n in results["notes"]]
    atomic_write_text(path, "\n".join(lines) + "\n")


def plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names), 6), squeeze=False)
    colors = {"ours": "#2a7ab9", "straightforward": "#c9663a"}
    for j, name in enumerate(names):
        res = results["models"][name]
        for i, (key, label, scale) in enumerate([("pairs_per_s", "pairs / s", 1.0),
                                                 ("peak_over_baseline_bytes", "peak memory over model, MiB", 2**-20)]):
            ax = axes[i][j]
            stats = [summarize(res["runs"][v], key) for v in VARIANTS]
            med = [s["median"] * scale for s in stats]
            err = [[(s["median"] - s["min"]) * scale for s in stats], [(s["max"] - s["median"]) * scale for s in stats]]
            ax.bar(VARIANTS, med, yerr=err, capsize=4, color=[colors[v] for v in VARIANTS])
            ax.set_ylabel(label)
            if i == 0:
                ratio = med[0] / med[1]
                ax.set_title(f"{name} ({res['latent']}x{res['latent']} latents)\nours {ratio:.2f}x faster", fontsize=10)
    device = results["machine"]["device"]
    fig.suptitle(f"SPO training step, {device}: medians, bars = min..max over repeats", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def driver(args) -> dict:
    t_start, log = time.time(), (lambda msg: print(msg, flush=True))
    settings = default_settings(args.device, args.quick)
    models = args.models or ("world" if args.quick else "world,sd15")
    chosen = [m.strip() for m in models.split(",") if m.strip()]
    for m in chosen:
        if m not in settings:
            raise SystemExit(f"--models: unknown model {m!r}; choose from world, sd15")
    overrides = {k: getattr(args, k) for k in ("batch", "iters", "warmup", "repeats") if getattr(args, k) is not None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("throughput_cuda" if args.device == "cuda" else "throughput")
    results = dict(command=" ".join(["python benchmarks/throughput.py", *map(shlex.quote, sys.argv[1:])]),
                   machine=machine_info(args.device, args.threads), seed=args.seed, precision=args.precision,
                   name=name, models={}, notes=[])
    if args.quick:
        results["notes"].append("--quick: reduced iterations and repeats (a smoke test for CI); not for quoting")
        if "sd15" not in chosen:
            results["notes"].append("--quick skips the SD1.5-size UNet (add --models world,sd15 to include it)")
    log(f"[throughput] {results['machine']['cpu']}, {results['machine']['cores']} cores, device {args.device}")
    with tempfile.TemporaryDirectory(prefix="spo-throughput-") as tmp:
        for m in chosen:
            setting = Setting(**{**asdict(settings[m]), **overrides})
            if m == "sd15" and args.latent:
                setting.latent = args.latent
            res = run_model(args, setting, Path(tmp), log)
            world_unet = json.loads((Path(args.world) / "unet" / "config.json").read_text())
            res["latent"] = setting.latent or world_unet["sample_size"]
            ver = res["verify"]
            ok = ver["loss_rel_diff"] < 1e-4 and ver["grad_rel_diff"] < 1e-3 and ver["grad_nonzero"] > 0
            log(f"  {m}: loss rel diff {ver['loss_rel_diff']:.1e}, grad rel diff {ver['grad_rel_diff']:.1e}, "
                f"{ver['clipped_fraction']:.0%} clipped -> {'equal' if ok else 'NOT EQUAL'}")
            if not ok:
                raise SystemExit(f"{m}: the two variants disagree ({ver}); the speed comparison would be meaningless")
            results["models"][m] = res
    results["wall_seconds"] = time.time() - t_start
    results["machine"]["load_average_at_end"] = os.getloadavg()[0]
    atomic_write_text(out / f"{name}.json", json.dumps(results, indent=1))
    write_markdown(out / f"{name}.md", results)
    plot(out / f"{name}.png", results)
    log(f"[throughput] wrote {out / name}.md/.png/.json in {results['wall_seconds']:.0f} s")
    return results


def parse_args(argv=None):
    from spo.world import resolve

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="folder for throughput.md/.png/.json")
    p.add_argument("--quick", action="store_true", help="few iterations: a smoke test (CI)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", default=None,
                   help="comma-separated: world (the embedded world's UNet), sd15 (default both; --quick: world)")
    p.add_argument("--world", default=resolve("world:sd"), help="diffusers SD pipeline directory of the world model")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                   help="dtype of the frozen weights (default fp32 on CPU, fp16 on CUDA as in the paper)")
    p.add_argument("--latent", type=int, default=None,
                   help="latent size of the SD1.5-size UNet (default 32 on CPU, 64 on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="override pairs per step for every model")
    p.add_argument("--iters", type=int, default=None, help="override timed steps per run")
    p.add_argument("--warmup", type=int, default=None, help="override warm-up steps per run")
    p.add_argument("--repeats", type=int, default=None, help="override runs per variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker (default: torch's choice)")
    p.add_argument("--name", default=None, help="output file stem (default throughput, or throughput_cuda)")
    # internal: one worker process
    p.add_argument("--variant", choices=["verify", *VARIANTS], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--n-batches", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.precision is None:
        args.precision = "fp16" if args.device == "cuda" else "fp32"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    return args


def main(argv=None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    if args.variant:
        result = worker(args)
        Path(args.json).write_text(json.dumps(result))
    else:
        driver(args)


if __name__ == "__main__":
    main()
