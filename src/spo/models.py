"""Loading diffusion pipelines, and the few operations the library needs from one.

`Diffusion` is the model-family adapter: everything that differs between model families (text
encoding, conditioning, resolution) lives here, and the rest of the library only calls its methods.
SD 1.x/2.x condition the UNet on one text encoder's hidden states; SDXL concatenates two text
encoders' hidden states and adds the pooled embedding of the second and the image-size
micro-conditioning (`add_time_ids`). Both travel in one `Conditioning`, so the resampler, the
losses, the trainer and the SPM training never ask which family they run. SD3/SD3.5 (`FlowDiffusion`)
are rectified-flow transformers: three text encoders (T5 optional), pooled projections, and flow
transitions (`spo.flow_sampling`) in place of DDIM's. FLUX.1 (`FluxDiffusion`) shares SD3's flow maths; its
transformer reads latents as a sequence of 2x2 patches with their positions, and FLUX.1-dev takes the guidance
scale as an input instead of running classifier-free guidance.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from spo.errors import SPOError
from spo.flow_sampling import FLOW_SAMPLERS, flow_noised, flow_x0
from spo.sampling import add_noise, ddim_schedule, ddim_transition, denoising_target, predict_x0, work_dtype

# The pipeline classes spo trains, by the `_class_name` a checkpoint's model_index.json declares.
FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3",
            "FluxPipeline": "flux"}
# The scheduler each family samples with (load_pipeline puts it in place): DDIM, or the flow models' Euler.
SAMPLING_SCHEDULERS = {"sd": "DDIMScheduler", "sdxl": "DDIMScheduler", "sd3": "FlowMatchEulerDiscreteScheduler",
                       "flux": "FlowMatchEulerDiscreteScheduler"}
FLOW_FAMILIES = ("sd3", "flux")
# Pipeline-call arguments a checkpoint was trained with where they differ from the pipeline's defaults, declared
# in this file beside model_index.json (e.g. the world's flow model: an 8-token T5 slot, max_sequence_length 8).
CALL_DEFAULTS_FILE = "spo_pipeline.json"
CALL_DEFAULT_KEYS = ("max_sequence_length",)


def checkpoint_family(path_or_id: str | Path) -> str:
    """The family, "sd", "sdxl", "sd3" or "flux", read from the checkpoint itself: a config never has to say which."""
    from diffusers import DiffusionPipeline

    local = Path(path_or_id)
    if local.exists() and not (local / "model_index.json").is_file():
        raise SPOError(f"{local} is not a diffusers pipeline directory (no model_index.json)")
    try:
        index = DiffusionPipeline.load_config(str(path_or_id))  # a local dir, the hub cache or the hub
    except Exception as exc:  # hub errors, missing files and bad JSON all land here
        raise SPOError(f"could not load a Stable Diffusion pipeline from {path_or_id!r} "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    name = index.get("_class_name", "")
    if name not in FAMILIES:
        raise SPOError(f"{path_or_id} holds a {name or 'pipeline of unknown class'}; spo trains "
                       f"{', '.join(FAMILIES)} checkpoints (SD 1.x/2.x, SDXL base, SD3/SD3.5, FLUX.1)")
    return FAMILIES[name]


def pipeline_family(pipe) -> str:
    """The family of a loaded pipeline ("sd" for a class spo does not know, as before SDXL existed)."""
    return FAMILIES.get(type(pipe).__name__, "sd")


def load_pipeline(path_or_id: str | Path, dtype: torch.dtype | None = None, vae: str | Path | None = None):
    """An SD, SDXL, SD3 or FLUX pipeline (the family is read from the checkpoint), optionally with a separate VAE.

    `vae` is an AutoencoderKL (hub id, its own directory, or a pipeline directory with a vae/
    folder), e.g. madebyollin/sdxl-vae-fp16-fix: SDXL's own VAE overflows in fp16.
    """
    from diffusers import (
        DDIMScheduler,
        DiffusionPipeline,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    family = checkpoint_family(path_or_id)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    if vae:
        kwargs["vae"] = load_vae(vae, dtype)
    if family == "sd":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if family in FLOW_FAMILIES:  # components saved as absent (SD3's T5: text_encoder_3, tokenizer_3) load as None
        index = DiffusionPipeline.load_config(str(path_or_id))
        kwargs.update({k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]})
    cls = {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}.get(
        family, StableDiffusionPipeline)
    try:
        pipe = cls.from_pretrained(str(path_or_id), **kwargs)
    except Exception as exc:  # diffusers raises many exception types for missing or corrupt models
        raise SPOError(f"could not load a Stable Diffusion pipeline from {path_or_id!r} "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if family in FLOW_FAMILIES:
        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):  # flow transitions need its sigmas
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    elif not isinstance(pipe.scheduler, DDIMScheduler):
        # SPO's transitions are DDIM's (spo.sampling), but SD 1.5 ships PNDM and SDXL Euler: keep the
        # checkpoint's noise schedule, with SD's DDIM settings where its config does not say.
        pipe.scheduler = DDIMScheduler.from_config({"clip_sample": False, "set_alpha_to_one": False,
                                                    **pipe.scheduler.config})
    pipe.set_progress_bar_config(disable=True)
    pipe.spo_call_defaults = read_call_defaults(path_or_id)
    return pipe


def read_call_defaults(path_or_id: str | Path) -> dict:
    """The checkpoint's declared call arguments (CALL_DEFAULTS_FILE), {} when it declares none."""
    import json

    path = Path(path_or_id) / CALL_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SPOError(f"{path} is not readable JSON ({exc}); delete it to use the pipeline's defaults") from None
    bad = {k: v for k, v in values.items() if k not in CALL_DEFAULT_KEYS or not isinstance(v, int) or v < 1} \
        if isinstance(values, dict) else values
    if bad:
        raise SPOError(f"{path}: only positive integers for {', '.join(CALL_DEFAULT_KEYS)} are understood, got {bad}")
    return values


def save_pipeline(pipe, folder: Path) -> None:
    """`pipe.save_pretrained`, keeping the call arguments the checkpoint declares."""
    import json

    pipe.save_pretrained(folder)
    if call_defaults(pipe):
        (Path(folder) / CALL_DEFAULTS_FILE).write_text(json.dumps(call_defaults(pipe), indent=2))


def call_defaults(pipe) -> dict:
    """Keyword arguments every call of `pipe` (and every prompt encoding) needs to match how it was trained."""
    return dict(getattr(pipe, "spo_call_defaults", {}))


def load_vae(path_or_id: str | Path, dtype: torch.dtype | None = None):
    from diffusers import AutoencoderKL

    local = Path(path_or_id)
    sub = {"subfolder": "vae"} if (local / "vae" / "config.json").is_file() else {}
    try:
        return AutoencoderKL.from_pretrained(str(path_or_id), torch_dtype=dtype, **sub)
    except Exception as exc:
        raise SPOError(f"could not load a VAE (AutoencoderKL) from {path_or_id!r} "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def load_scoring_decoder(path_or_id: str | Path, dtype: torch.dtype | None = None):
    """A TAESD-style AutoencoderTiny (hub id such as madebyollin/taesd, or a directory), frozen, in eval mode."""
    from diffusers import AutoencoderTiny

    try:
        decoder = AutoencoderTiny.from_pretrained(str(path_or_id), torch_dtype=dtype)
    except Exception as exc:
        raise SPOError(f"model.scoring_decoder: could not load an AutoencoderTiny from {path_or_id!r} "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return decoder.eval().requires_grad_(False)


@dataclass
class Conditioning:
    """The text conditioning of a batch, one row per image: what the UNet takes besides x_t and t.

    SD needs the text encoder's hidden states only; SDXL adds the pooled embedding of its second
    text encoder and the size/crop micro-conditioning ("time ids"). Rows index, repeat and
    concatenate like a tensor's, so the resampler and trainer never look inside.
    """

    embeds: torch.Tensor  # (B, L, D) encoder_hidden_states
    pooled: torch.Tensor | None = None  # (B, P) SDXL: pooled, projected embedding of text encoder 2
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL: original size, crop top-left, target size

    def _map(self, fn) -> "Conditioning":
        return Conditioning(*(None if v is None else fn(v) for v in (self.embeds, self.pooled, self.time_ids)))

    def __len__(self) -> int:
        return len(self.embeds)

    def __getitem__(self, index) -> "Conditioning":
        return self._map(lambda v: v[index])

    def repeat_interleave(self, repeats: int, dim: int = 0) -> "Conditioning":
        return self._map(lambda v: v.repeat_interleave(repeats, dim))

    def to(self, *args, **kwargs) -> "Conditioning":
        return self._map(lambda v: v.to(*args, **kwargs))

    @property
    def dtype(self) -> torch.dtype:
        return self.embeds.dtype

    @staticmethod
    def cat(parts: list) -> "Conditioning":
        parts = [as_conditioning(p) for p in parts]
        fields = zip(*((p.embeds, p.pooled, p.time_ids) for p in parts))
        return Conditioning(*(None if v[0] is None else torch.cat(v) for v in fields))

    def unet_kwargs(self) -> dict:
        if self.pooled is None:
            return {"encoder_hidden_states": self.embeds}
        return {"encoder_hidden_states": self.embeds,
                "added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": self.time_ids}}


def as_conditioning(c) -> Conditioning:
    """A plain tensor of text embeddings (SD) is a Conditioning without the SDXL extras."""
    return c if isinstance(c, Conditioning) else Conditioning(c)


def guided_output(unet, x_t: torch.Tensor, t: torch.Tensor, cond, uncond, guidance: float) -> torch.Tensor:
    """One UNet call on the doubled batch, combined with classifier-free guidance.

    `cond`/`uncond` are `Conditioning`s (or, for SD, plain text-embedding tensors).
    """
    cond = as_conditioning(cond)
    if guidance == 1.0:
        return unet(x_t, t, **cond.unet_kwargs()).sample
    both = Conditioning.cat([uncond, cond])
    out = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), **both.unet_kwargs()).sample
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + guidance * (out_cond - out_uncond)


def check_lora_targets(network, targets: list[str]) -> None:
    """Every name in model.lora_targets adapts some module (peft's rule: the name or a dotted suffix of it).

    peft fails with a traceback when no name matches and silently skips a misspelt one among good ones.
    """
    if not targets:
        raise SPOError("model.lora_targets is empty; name the modules that get adapters, e.g. to_q,to_k,to_v,to_out.0")
    names = [n for n, _ in network.named_modules() if n]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n.rsplit(".", 1)[-1].startswith(("to_", "proj"))})
        raise SPOError(f"model.lora_targets: {', '.join(unmatched)} matches no module of {type(network).__name__}; "
                       f"use module names such as {', '.join(leaves[:8]) or 'to_q, to_k, to_v, to_out.0'}")


@dataclass
class Diffusion:
    """A frozen-or-trainable SD or SDXL model seen through the operations SPM and SPO need."""

    pipe: object
    # An AutoencoderTiny that decodes x0-predictions for the step judge only (`set_scoring_decoder`); None: the VAE.
    scoring_decoder: object = None

    @property
    def family(self) -> str:
        return "sdxl" if getattr(self.pipe, "text_encoder_2", None) is not None else "sd"

    def configure_sampling(self, sample) -> None:
        """Family-specific sampler settings of a `SampleConfig` (none for DDIM: sample.eta is passed per call)."""

    @staticmethod
    def lora_save_kwargs(network) -> dict:
        """The trained network's LoRA as `save_lora_weights` keyword arguments (UNet keys in diffusers' format)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(network))
        return {"unet_lora_layers": layers, "unet_lora_adapter_metadata": lora_metadata(network)}

    def frozen_modules(self) -> list:
        """The parts that never train: the VAE and the text encoder(s)."""
        parts = (self.pipe.vae, self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None))
        return [m for m in parts if m is not None]

    def freeze(self, device, dtype: torch.dtype = torch.float32) -> None:
        """Move the frozen parts to `device` in `dtype` (a half dtype halves their memory, as diffusers' training
        scripts do); a VAE whose config asks to be upcast (SDXL's own) stays in fp32."""
        for module in self.frozen_modules():
            keep_fp32 = module is self.vae and self.vae.config.get("force_upcast", False)
            module.requires_grad_(False).to(device)
            if not keep_fp32 and dtype != torch.float32:  # (diffusers warns on any dtype move, even a no-op)
                module.to(dtype=dtype)
        if self.scoring_decoder is not None:  # not a frozen module of the pipeline: it is spo's own addition
            self.scoring_decoder.requires_grad_(False).to(device)
            if dtype != torch.float32:
                self.scoring_decoder.to(dtype=dtype)

    @property
    def unet(self):
        """The trained network (a UNet here; a transformer in other families)."""
        return self.pipe.unet

    @unet.setter
    def unet(self, model) -> None:
        self.pipe.unet = model

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def resolution(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[Conditioning, Conditioning]:
        """(conditional, unconditional) conditioning for classifier-free guidance, as the pipeline builds it."""
        if self.family == "sd":
            cond, uncond = self.pipe.encode_prompt(list(prompts), self.device, 1, True, negative_prompt=None)
            return Conditioning(cond), Conditioning(uncond)
        # No negative prompt: SDXL base (force_zeros_for_empty_prompt) then uses zero embeddings.
        cond, uncond, pooled, pooled_uncond = self.pipe.encode_prompt(
            list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=None)
        # Micro-conditioning as the pipeline's default: generated at full size, uncropped.
        size = self.resolution
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=self.device, dtype=cond.dtype)
        time_ids = time_ids.expand(len(prompts), -1)
        return Conditioning(cond, pooled, time_ids), Conditioning(uncond, pooled_uncond, time_ids)

    def guided_output(self, x_t, t, cond, uncond, guidance: float, model=None) -> torch.Tensor:
        """The guided prediction of `model` (default: the pipeline's own UNet; the trainer passes its policy)."""
        return guided_output(model if model is not None else self.unet, x_t, t, cond, uncond, guidance)

    # ------------------------------------------------------------ the transition seam
    # What the resampler, the losses and the SPM training use. A new model family (e.g. flow matching)
    # provides these with its own maths; nothing above this class asks which family it runs.

    def schedule(self, num_steps: int) -> list[tuple[int, int]]:
        """(t, t_prev) of each sampling step; t_prev < 0 marks the last step (to the clean sample)."""
        t, prev = ddim_schedule(self.scheduler, num_steps)
        return list(zip(t.tolist(), prev.tolist()))

    def initial_latents(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Pure noise x_T for `batch` images, drawn on the CPU from `generator` (same draws on any device)."""
        cfg = self.unet.config
        shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        return (torch.randn(shape, generator=generator) * self.scheduler.init_noise_sigma).to(self.device)

    def transition(self, model_output, t, t_prev, x_t, eta: float):
        """Mean, std and x0-prediction of the Gaussian step x_t -> x_{t_prev} (per-sample t, t_prev)."""
        return ddim_transition(self.scheduler, model_output, t, t_prev, x_t, eta)

    def x0_prediction(self, x_t, model_output, t) -> torch.Tensor:
        return predict_x0(self.scheduler, x_t, model_output, t)

    def noised(self, x0, noise, t) -> torch.Tensor:
        """x_t of clean latents x0 with the given noise (the forward process)."""
        return add_noise(self.scheduler, x0, noise, t)

    def training_target(self, x0, noise, t) -> torch.Tensor:
        """What the network is trained to output at noised(x0, noise, t): ε, v or x0 (the prediction type)."""
        return denoising_target(self.scheduler, x0, noise, t)

    def regression_guidance(self, guidance: float) -> float:
        """The guidance at which a plain denoising loss (Diffusion-DPO) evaluates the network: 1, no CFG, as
        diffusers' training scripts do; a guidance-distilled model (FLUX.1-dev) takes its scale as an input."""
        return 1.0

    def x0_images(self, x_t, t, cond, uncond, guidance: float, model=None):
        """One guided call at (x_t, t), its x0-prediction decoded to images in [-1, 1]; also the raw output.

        The one image-from-a-noisy-latent path: the resampler scores candidates with it (and reuses the
        output to continue), SPM training and evaluation score noised pairs with it.
        """
        out = self.guided_output(x_t, t, cond, uncond, guidance, model)
        return self.scoring_decode(self.x0_prediction(x_t, out, t)), out

    def set_scoring_decoder(self, decoder) -> None:
        """Decode x0-predictions for the judge with a small distilled decoder (an AutoencoderTiny, or a hub id / dir
        of one) instead of the VAE; `decode` (final images, evaluation, generation) keeps the VAE."""
        if isinstance(decoder, (str, Path)):
            decoder = load_scoring_decoder(decoder)
        channels, expected = decoder.config.latent_channels, self.vae.config.latent_channels
        if channels != expected:
            raise SPOError(f"model.scoring_decoder has {channels} latent channels but the model's VAE has {expected}; "
                           "use a tiny decoder trained for this family (madebyollin/taesd for SD 1.x/2.x, taesdxl, "
                           "taesd3, taef1)")
        self.scoring_decoder = decoder.eval().requires_grad_(False).to(self.device)

    def scoring_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the denoiser sees them -> images in [-1, 1] for the judge: the scoring decoder when one is set,
        else `decode`. A TAESD-style decoder reads those latents (its config: scaling_factor 1, shift_factor 0); its
        own scale and shift are applied as diffusers' pipelines apply a VAE's (SD3's and FLUX's formula)."""
        tiny = self.scoring_decoder
        if tiny is None:
            return self.decode(latents)
        z = latents.to(tiny.dtype) / tiny.config.scaling_factor + (tiny.config.get("shift_factor") or 0.0)
        return tiny.decode(z).sample.clamp(-1, 1)

    def _vae_precision(self):
        """SDXL's own VAE overflows in fp16 (its config says force_upcast): keep it out of fp16 autocast."""
        if self.family == "sdxl" and self.vae.config.get("force_upcast", False) and self.vae.dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return contextlib.nullcontext()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (posterior mean)."""
        images = images.to(device=self.device, dtype=self.vae.dtype)
        with self._vae_precision():
            return self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]."""
        with self._vae_precision():
            return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.clamp(-1, 1)


def lora_metadata(network) -> dict:
    """The adapter's peft config (lora_alpha included: without it diffusers would reload alpha = rank)."""
    metadata = network.peft_config["default"].to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}


@dataclass
class FlowDiffusion(Diffusion):
    """SD3 / SD3.5: a rectified-flow transformer (x_t = (1 − t)·x0 + t·ε, output v = ε − x0).

    Conditioning: CLIP-L and CLIP-G hidden states (padded to T5's width) followed by T5's, or zeros when
    the checkpoint has no T5 (as StableDiffusion3Pipeline does), and both CLIPs' pooled projections.
    Timesteps are the scheduler's, 1000·t for flow time t in [0, 1] (SD3's shift included), so the step
    judge and SPM training see the same 0..1000 scale as with DDIM. Transitions: Flow-GRPO's SDE with noise
    level eta·sample.flow_noise_level, or the DDIM-style flow step with sample.eta (sample.flow_sampler).
    """

    sampler: str = "sde"
    noise_level: float = 0.7

    @property
    def family(self) -> str:
        return "sd3"

    def configure_sampling(self, sample) -> None:
        self.sampler = getattr(sample, "flow_sampler", self.sampler)
        self.noise_level = getattr(sample, "flow_noise_level", self.noise_level)

    def frozen_modules(self) -> list:
        parts = (self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3)
        return [m for m in parts if m is not None]

    @property
    def unet(self):
        """The trained network: SD3's transformer (the name is the seam's)."""
        return self.pipe.transformer

    @unet.setter
    def unet(self, model) -> None:
        self.pipe.transformer = model

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    @property
    def resolution(self) -> int:
        return self.pipe.transformer.config.sample_size * self.pipe.vae_scale_factor

    @staticmethod
    def lora_save_kwargs(network) -> dict:
        from peft.utils import get_peft_model_state_dict

        return {"transformer_lora_layers": get_peft_model_state_dict(network),
                "transformer_lora_adapter_metadata": lora_metadata(network)}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[Conditioning, Conditioning]:
        """(conditional, unconditional) as the pipeline builds them: the empty prompt is the unconditional."""
        cond, uncond, pooled, pooled_uncond = self.pipe.encode_prompt(
            list(prompts), None, None, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            **call_defaults(self.pipe))
        return Conditioning(cond, pooled), Conditioning(uncond, pooled_uncond)

    def guided_output(self, x_t, t, cond, uncond, guidance: float, model=None) -> torch.Tensor:
        """The guided velocity (x_t first and positional: the trainer's row counter reads args[0])."""
        model = model if model is not None else self.unet

        def call(x, tt, c):
            return model(x, encoder_hidden_states=c.embeds, pooled_projections=c.pooled,
                         timestep=tt.float(), return_dict=False)[0]

        cond = as_conditioning(cond)
        if guidance == 1.0:
            return call(x_t, t, cond)
        out_uncond, out_cond = call(torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([uncond, cond])).chunk(2)
        return out_uncond + guidance * (out_cond - out_uncond)

    def _flow_time(self, t, like: torch.Tensor) -> torch.Tensor:
        """Scheduler timesteps (0..num_train_timesteps) -> flow time in [0, 1]."""
        t = torch.as_tensor(t, device=like.device).to(work_dtype(like))
        return t / self.scheduler.config.num_train_timesteps

    def schedule(self, num_steps: int) -> list[tuple[float, float]]:
        """The pipeline's own (shifted) timesteps; the last step leads to t_prev = 0, the clean sample."""
        s = type(self.scheduler).from_config(self.scheduler.config)
        self._set_timesteps(s, num_steps)
        t = s.timesteps.tolist()
        prev = (s.sigmas[1 : len(t) + 1] * s.config.num_train_timesteps).tolist()
        return list(zip(t, prev))

    def _set_timesteps(self, scheduler, num_steps: int) -> None:
        """`scheduler.set_timesteps` as StableDiffusion3Pipeline calls it."""
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):  # resolution-dependent shift, as the pipeline does
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            c, tokens = scheduler.config, (self.unet.config.sample_size // self.unet.config.patch_size) ** 2
            kwargs["mu"] = calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                           c.get("base_shift", 0.5), c.get("max_shift", 1.16))
        scheduler.set_timesteps(num_steps, **kwargs)

    def initial_latents(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        cfg = self.unet.config
        shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        return torch.randn(shape, generator=generator).to(self.device)

    def transition(self, model_output, t, t_prev, x_t, eta: float):
        level = eta * self.noise_level if self.sampler == "sde" else eta
        step = FLOW_SAMPLERS[self.sampler]
        return step(model_output, self._flow_time(t, x_t), self._flow_time(t_prev, x_t), x_t, level)

    def x0_prediction(self, x_t, model_output, t) -> torch.Tensor:
        return flow_x0(x_t, model_output, self._flow_time(t, x_t))

    def noised(self, x0, noise, t) -> torch.Tensor:
        return flow_noised(x0, noise, self._flow_time(t, x0))

    def training_target(self, x0, noise, t) -> torch.Tensor:
        """The rectified-flow velocity ε − x0 (the same at every t)."""
        return noise - x0

    def _vae_shift(self) -> float:
        return self.vae.config.get("shift_factor", None) or 0.0

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(device=self.device, dtype=self.vae.dtype)
        with self._vae_precision():
            mean = self.vae.encode(images).latent_dist.mean
        return (mean - self._vae_shift()) * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self._vae_shift()
        with self._vae_precision():
            return self.vae.decode(latents).sample.clamp(-1, 1)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> FLUX's token sequence (B, H/2·W/2, 4C): one token per 2x2 patch, row by row,
    its features channel-major (c, dy, dx), as FluxPipeline packs them."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of `height` x `width`."""
    b, _, features = tokens.shape
    patches = tokens.reshape(b, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, features // 4, height, width)


def latent_positions(height: int, width: int, device, dtype) -> torch.Tensor:
    """FLUX's img_ids: (0, row, column) of every packed patch (the transformer's rotary position embedding reads
    them; text tokens get (0, 0, 0), the txt_ids)."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


@dataclass
class FluxDiffusion(FlowDiffusion):
    """FLUX.1 (dev, schnell): a rectified-flow transformer with SD3's maths (`FlowDiffusion`'s transitions,
    noising, x0-prediction, VAE shift and scale) and its own interface.

    - Latents stay (B, C, H, W) at the seam; `guided_output` packs them into 2x2-patch tokens with their
      positions (img_ids) for the transformer and unpacks its output.
    - Conditioning: T5's hidden states and CLIP's pooled embedding; text tokens sit at position 0 (txt_ids).
    - Guidance: FLUX.1-dev is guidance-distilled: one call takes the guidance scale as an input, no
      classifier-free guidance, so the unconditional is never evaluated. schnell takes none (the scale is
      ignored, as FluxPipeline ignores it).
    - Timesteps at the seam are the scheduler's 0..1000; the transformer gets t/1000 as FluxPipeline passes it.
    """

    @property
    def family(self) -> str:
        return "flux"

    def frozen_modules(self) -> list:
        parts = (self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2)  # CLIP and T5
        return [m for m in parts if m is not None]

    @property
    def resolution(self) -> int:
        """FLUX's config has no native size: the pipeline's default (1024 px for FLUX.1), which `spo generate`
        and any stock call without height/width draw."""
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def _latent_size(self) -> int:
        """Latent height (= width) at `resolution`, rounded down to whole 2x2 patches as the pipeline does."""
        return 2 * (self.resolution // (self.pipe.vae_scale_factor * 2))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[Conditioning, Conditioning]:
        """(conditional, unconditional); without classifier-free guidance the unconditional is the conditional
        itself (the seam passes one along; FLUX never evaluates it)."""
        embeds, pooled, _ = self.pipe.encode_prompt(list(prompts), None, device=self.device, num_images_per_prompt=1,
                                                    **call_defaults(self.pipe))
        cond = Conditioning(embeds, pooled)
        return cond, cond

    def guided_output(self, x_t, t, cond, uncond, guidance: float, model=None) -> torch.Tensor:
        """The velocity of one transformer call (`uncond` unused). x_t's packed tokens go first and positional:
        the trainer's row counter reads args[0]."""
        model = model if model is not None else self.unet
        cond = as_conditioning(cond)
        b, _, h, w = x_t.shape
        out = model(pack_latents(x_t), encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                    timestep=self._flow_time(t, x_t), guidance=self._embedded_guidance(guidance, b, x_t.device),
                    img_ids=latent_positions(h, w, x_t.device, cond.dtype),
                    txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=x_t.device, dtype=cond.dtype),
                    return_dict=False)[0]
        return unpack_latents(out, h, w)

    def regression_guidance(self, guidance: float) -> float:
        """FLUX.1-dev is trained at its embedded guidance (diffusers' FLUX scripts: the sampling scale)."""
        return guidance if self.pipe.transformer.config.guidance_embeds else 1.0

    def _embedded_guidance(self, guidance: float, batch: int, device) -> torch.Tensor | None:
        """The guidance input of a guidance-distilled model (the pipeline's own transformer's config decides: the
        trainer's policy may be wrapped for distributed training)."""
        if not self.pipe.transformer.config.guidance_embeds:
            return None
        return torch.full((batch,), float(guidance), device=device, dtype=torch.float32)

    def _set_timesteps(self, scheduler, num_steps: int) -> None:
        """`scheduler.set_timesteps` as FluxPipeline calls it: sigmas linspace(1, 1/N, N), shifted by mu from the
        image's token count when the scheduler shifts dynamically (FLUX.1-dev; schnell does not)."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c, tokens = scheduler.config, (self._latent_size() // 2) ** 2
        mu = calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)

    def initial_latents(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """The noise FluxPipeline.prepare_latents draws from a CPU generator, before it packs it."""
        size = self._latent_size()
        shape = (batch, self.unet.config.in_channels // 4, size, size)  # in_channels counts the packed 2x2 patch
        return torch.randn(shape, generator=generator).to(self.device)


# The adapter class of each family; a new family registers its own here.
ADAPTERS: dict[str, type] = {"sd": Diffusion, "sdxl": Diffusion, "sd3": FlowDiffusion, "flux": FluxDiffusion}


def lora_save_kwargs(pipeline_cls, network) -> dict:
    """`pipeline_cls.save_lora_weights` keyword arguments holding `network`'s LoRA, in its family's format."""
    return ADAPTERS[FAMILIES.get(pipeline_cls.__name__, "sd")].lora_save_kwargs(network)


def load_diffusion(path_or_id: str | Path, vae: str | Path | None = None, dtype: torch.dtype | None = None,
                   sample=None):
    """The model-family adapter for a checkpoint: its pipeline loaded, wrapped by the family's adapter;
    `sample` (a SampleConfig) gives family-specific sampler settings (the flow sampler and its noise level)."""
    pipe = load_pipeline(path_or_id, dtype=dtype, vae=vae)
    adapter = ADAPTERS[FAMILIES[type(pipe).__name__]](pipe)
    if sample is not None:
        adapter.configure_sampling(sample)
    return adapter
