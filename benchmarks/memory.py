"""Peak GPU memory and time of SPO at the paper's SD1.5 or SDXL settings, on random weights of full size.

SDXL: stabilityai/stable-diffusion-xl-base-1.0's architecture (UNet 2.6B, CLIP-L and OpenCLIP-bigG
text encoders, the fp16-fix VAE's configuration), `configs/sdxl.yaml` (K=2, inner_steps 3, 1024 px,
LoRA rank 64). SD1.5: runwayml/stable-diffusion-v1-5's architecture (UNet 0.86B, CLIP-L, the SD VAE),
`configs/sd15.yaml` (K=4, 512 px, LoRA rank 4). Both with a PickScore-size (CLIP-H) step-aware
preference model, random weights, saved and loaded through the ordinary trainer: one resampler phase
and one on-policy epoch, fp16 autocast. Random weights change what the images look like, not the
memory or the time; threshold 0 so that every branch gives pairs to train on.

`--frozen-fp32` measures the previous behaviour (frozen UNet, text encoders, VAE kept in fp32 under
fp16 autocast) by making the trainer's frozen-weight dtype fp32: run with and without it for a
before/after comparison.

    python benchmarks/memory.py --family sdxl                 # on a GPU: benchmarks/results/memory_sdxl.{json,md}
    python benchmarks/memory.py --family sd15 --frozen-fp32   # the same, frozen weights in fp32 (before)
    python benchmarks/memory.py --tiny --out /tmp/mem-smoke   # a CPU check of the script (toy sizes)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from spo.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (architecture fields)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SDXL_TEXT_1 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu", projection_dim=768)  # CLIP ViT-L/14
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280)  # OpenCLIP ViT-bigG/14
SDXL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024,
                scaling_factor=0.13025, force_upcast=False)  # madebyollin/sdxl-vae-fp16-fix
# runwayml/stable-diffusion-v1-5, unet/, text_encoder/ and vae/ config.json (architecture fields)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu", projection_dim=768)  # CLIP ViT-L/14
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512, scaling_factor=0.18215)
PICKSCORE = dict(  # yuvalkirstain/PickScore_v1 = CLIP ViT-H/14
    text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                patch_size=14, image_size=224),
    projection_dim=1024)


def tiny_sizes() -> None:
    """Shrink every architecture for a CPU run of this script (same code path, toy sizes)."""
    SDXL_UNET.update(sample_size=16, block_out_channels=(16, 32), layers_per_block=1,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1),
                     attention_head_dim=(2, 4), cross_attention_dim=64, addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8)
    for text in (SDXL_TEXT_1, SDXL_TEXT_2):
        text.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    SDXL_VAE.update(block_out_channels=(8, 16), layers_per_block=1, sample_size=32, norm_num_groups=8)
    SD15_UNET.update(sample_size=16, block_out_channels=(16, 32), layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                     attention_head_dim=2, norm_num_groups=8)
    SD15_TEXT.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    SD15_VAE.update(block_out_channels=(8, 16), layers_per_block=1, sample_size=32, norm_num_groups=8)
    PICKSCORE["text"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    PICKSCORE["vision"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               patch_size=8, image_size=32)
    PICKSCORE["projection_dim"] = 32


def tokenizer():
    """The world's BPE tokenizer at SDXL's 77-token context (the vocabulary only changes which ids appear)."""
    from transformers import CLIPTokenizer

    from spo.world import resolve

    tok = CLIPTokenizer.from_pretrained(resolve("world:tokenizer"))
    tok.model_max_length = 77
    return tok


def build_sdxl(out: Path, device: str) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = tokenizer()
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device(device):  # random initialisation on the GPU takes seconds instead of minutes
        parts = dict(
            unet=UNet2DConditionModel(**SDXL_UNET),
            text_encoder=CLIPTextModel(CLIPTextConfig(**common, **SDXL_TEXT_1)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**common, **SDXL_TEXT_2)),
            vae=AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * len(SDXL_VAE["block_out_channels"]),
                              up_block_types=("UpDecoderBlock2D",) * len(SDXL_VAE["block_out_channels"]),
                              latent_channels=4, **SDXL_VAE))
    sizes = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(scheduler=scheduler, tokenizer=tok, tokenizer_2=tok, add_watermarker=False,
                                     **parts)
    pipe.save_pretrained(out)
    return sizes


def build_sd15(out: Path, device: str) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tokenizer()
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device(device):
        parts = dict(
            unet=UNet2DConditionModel(**SD15_UNET),
            text_encoder=CLIPTextModel(CLIPTextConfig(**common, **SD15_TEXT)),
            vae=AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * len(SD15_VAE["block_out_channels"]),
                              up_block_types=("UpDecoderBlock2D",) * len(SD15_VAE["block_out_channels"]),
                              latent_channels=4, **SD15_VAE))
    sizes = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    StableDiffusionPipeline(scheduler=scheduler, tokenizer=tok, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False, **parts).save_pretrained(out)
    return sizes


def build_spm(out: Path, device: str) -> int:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from spo.preference.spm import StepAwareCLIP

    tok = tokenizer()
    text = dict(PICKSCORE["text"], vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device(device):
        clip = CLIPModel(CLIPConfig(text_config=text, vision_config=PICKSCORE["vision"],
                                    projection_dim=PICKSCORE["projection_dim"]))
    size = PICKSCORE["vision"]["image_size"]
    base = out.parent / "clip"
    clip.save_pretrained(base)
    tok.save_pretrained(base)
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(base)
    StepAwareCLIP.from_base(base).save_pretrained(out)
    return sum(p.numel() for p in clip.parameters())


def measure(work: Path, family: str, batches: int, frozen_fp32: bool) -> dict:
    from spo.config import load_config
    from spo.config import SPOConfig
    from spo.trainer import SPOTrainer

    if frozen_fp32:  # the previous behaviour: frozen modules stay fp32 under autocast
        SPOTrainer.weight_dtype = property(lambda self: torch.float32)
    cfg = load_config(SPOConfig, REPO / "configs" / f"{family}.yaml", [
        f"model.pretrained={work / family}", f"model.spm={work / 'spm'}", "sample.threshold=0",
        *(["model.vae="] if family == "sdxl" else []),
        f"sample.batches_per_epoch={batches}", "train.num_epochs=1", f"log.output_dir={work / 'run'}",
        "log.report_to=none"] + (["train.mixed_precision='no'"] if not torch.cuda.is_available() else []))
    cuda = torch.cuda.is_available()
    t0 = time.time()
    tr = SPOTrainer(cfg, log=print).setup()
    setup_s = time.time() - t0
    gib = lambda b: round(b / 2**30, 2)  # noqa: E731
    if cuda:
        torch.cuda.synchronize()
        weights = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    pairs, _, prompts = tr.method.sample(tr, 0, 0)  # one resampler round: the sampling phase alone
    sample_s = time.time() - t0
    sample_peak = torch.cuda.max_memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    metrics = tr.train_epoch(0)  # the on-policy epoch: each round samples, then trains on its pairs
    train_s = time.time() - t0
    train_peak = torch.cuda.max_memory_allocated() if cuda else 0
    return dict(
        family=family, frozen_dtype=str(tr.weight_dtype).removeprefix("torch."),
        device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
        resolution=tr.diffusion.resolution, prompts=len(prompts), pairs=len(pairs),
        optimizer_steps=tr.global_step, setup_seconds=round(setup_s, 1), sample_seconds=round(sample_s, 1),
        train_seconds=round(train_s, 1), weights_gib=gib(weights) if cuda else None,
        sample_peak_gib=gib(sample_peak), train_peak_gib=gib(train_peak),
        reserved_peak_gib=gib(torch.cuda.max_memory_reserved()) if cuda else None,
        loss=metrics.get("loss"), config=dict(sample=asdict(cfg.sample), train=asdict(cfg.train),
                                              lora_rank=cfg.model.lora_rank))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sdxl")
    parser.add_argument("--frozen-fp32", action="store_true", help="frozen weights in fp32 (the previous behaviour)")
    parser.add_argument("--batches", type=int, default=2, help="resampler batches (the recipe's prompts per batch)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        tiny_sizes()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.time()
        sizes = (build_sdxl if args.family == "sdxl" else build_sd15)(work / args.family, device)
        sizes["spm"] = build_spm(work / "spm", device)
        if device == "cuda":
            torch.cuda.empty_cache()
        build_s = time.time() - t0
        result = measure(work, args.family, args.batches, args.frozen_fp32)
    result.update(parameters={k: int(v) for k, v in sizes.items()}, build_seconds=round(build_s, 1))
    args.out.mkdir(parents=True, exist_ok=True)
    flags = (" --tiny" if args.tiny else "") + (" --frozen-fp32" if args.frozen_fp32 else "")
    result["command"] = f"python benchmarks/memory.py --family {args.family}{flags} --batches {args.batches}"
    name = f"memory_{args.family}{'_frozen_fp32' if args.frozen_fp32 else ''}"
    atomic_write_text(args.out / f"{name}.json", json.dumps(result, indent=2))
    write_markdown(args.out / f"{name}.md", result)
    print(json.dumps(result, indent=2))
    print(compare(args.out))


def write_markdown(path: Path, r: dict) -> None:
    s, t = r["config"]["sample"], r["config"]["train"]
    rows = [(f"weights resident after setup (frozen in {r['frozen_dtype']}, LoRA fp32)", r["weights_gib"]),
            ("peak allocated while sampling (resampler)", r["sample_peak_gib"]),
            ("peak allocated while training", r["train_peak_gib"]),
            ("peak reserved by the allocator (nvidia-smi shows this plus the CUDA context)", r["reserved_peak_gib"])]
    lines = [
        f"# SPO at the paper's {r['family'].upper()} settings: memory and time", "",
        f"`{r['command']}` on {r['device']} (torch {r['torch']}); random weights at full size "
        f"({r['parameters']['unet'] / 1e9:.2f}B-parameter UNet, {r['resolution']} px), PickScore-size SPM.", "",
        f"Settings: `configs/{r['family']}.yaml` — K={s['num_candidates']}, {s['num_steps']} DDIM steps, "
        f"inner_steps {s['inner_steps']}, LoRA rank {r['config']['lora_rank']}, batch {t['batch_size']} x "
        f"accumulation {t['gradient_accumulation_steps']}, {t['mixed_precision']} autocast; "
        f"threshold {s['threshold']} so that every branch yields pairs.", "",
        "| memory | GiB |", "|---|---|", *[f"| {name} | {value} |" for name, value in rows], "",
        f"Time: {r['prompts']} prompts sampled in {r['sample_seconds']} s ({r['pairs']} pairs, first batch includes "
        f"warm-up); {r['pairs']} pairs trained in {r['train_seconds']} s ({r['optimizer_steps']} optimizer steps).", ""]
    atomic_write_text(path, "\n".join(lines))


def compare(out: Path) -> str:
    """One before/after table from the four result files (frozen fp32 vs frozen in the autocast dtype)."""
    lines = ["# Peak GPU memory before/after: frozen modules in fp32 vs in the mixed-precision dtype", "",
             "Random weights at full size, the paper recipes' settings (`benchmarks/memory.py`, one process).", "",
             "| family | frozen weights | resident weights GiB | sampling peak GiB | training peak GiB | reserved GiB |",
             "|---|---|---|---|---|---|"]
    for family in ("sd15", "sdxl"):
        for suffix in ("_frozen_fp32", ""):
            f = out / f"memory_{family}{suffix}.json"
            if f.exists():
                r = json.loads(f.read_text())
                lines.append(f"| {family} | {r['frozen_dtype']} | {r['weights_gib']} | {r['sample_peak_gib']} | "
                             f"{r['train_peak_gib']} | {r['reserved_peak_gib']} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "memory.md", text)
    return text


if __name__ == "__main__":
    main()
