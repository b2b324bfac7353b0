"""Every config of the project: typed dataclasses loaded from YAML, `key=value` overrides, validated on load.

Each field is declared with `setting(default, help, ...)`: the help is the field's one-line doc (shown
by `--help`) and the range/choices are checked by `validate_fields` with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from spo.errors import SPOError


def setting(default, help: str, *, ge=None, gt=None, le=None, lt=None, choices=None):
    """A config field with its doc and its allowed range (numbers must also be finite)."""
    meta = dict(help=help, ge=ge, gt=gt, le=le, lt=lt, choices=choices)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def validate_fields(cfg, prefix: str = "") -> None:
    """Check every field's declared range and choices, recursing into groups."""
    for f in dataclasses.fields(cfg):
        value, name, m = getattr(cfg, f.name), prefix + f.name, f.metadata
        if dataclasses.is_dataclass(value):
            validate_fields(value, f"{name}.")
            continue
        if m.get("choices") is not None and value not in m["choices"]:
            raise SPOError(f"{name} must be one of {', '.join(map(str, m['choices']))}, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            raise SPOError(f"{name} must be a finite number, got {value}")
        for key, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
            if m.get(key) is not None and not ok(value, m[key]):
                raise SPOError(f"{name} must be {word} {m[key]}, got {value}")


def field_help(cls, prefix: str = "") -> list[tuple[str, str, object]]:
    """(dotted name, help, default) of every field, for `--help` listings."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += field_help(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((prefix + f.name, f.metadata.get("help", ""), default))
    return rows


MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "wandb", "all", "none")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
OPTIMIZERS = ("adamw", "adamw8bit")
DEFAULT_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
JUDGE_KINDS = ("spm", "latent")
# torch.compile modes of the sampling-phase network calls (spo.compilation); "" = off.
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune")


# ------------------------------------------------------------------ shared groups


@dataclass
class LogConfig:
    """Where a run writes, how often it checkpoints, and which tracker it reports to (both trainers)."""

    output_dir: str = setting("runs/spo", "run folder: config, metrics, logs, checkpoints, outputs")
    checkpointing_steps: int = setting(0, "also checkpoint every N optimizer steps (0 = only by epoch / at the end)", ge=0)
    checkpointing_epochs: int = setting(1, "spo train: checkpoint every N epochs (and at the end)", ge=1)
    checkpoints_total_limit: int = setting(2, "keep at most this many checkpoints (the newest)", ge=1)
    log_every: int = setting(10, "train-spm: log scalars every N optimizer steps", ge=1)
    report_to: str = setting("tensorboard", "tracker: tensorboard | wandb | all | none", choices=REPORT_TO)
    validation_prompts: list[str] = setting([], "spo train: prompts drawn with fixed seeds every validation_steps")
    validation_steps: int = setting(0, "spo train: draw the validation prompts every N optimizer steps (0 = off)",
                                    ge=0)
    tracker_project: str = setting("spo", "tracker project (wandb project; groups the runs of one study)")
    run_name: str = setting("", "tracker run name (wandb name, TensorBoard folder logs/RUN_NAME); empty = the "
                            "output_dir's name")
    push_to_hub: bool = setting(False, "spo train: upload the LoRA folder to log.hub_repo_id at the end (as `spo push`)")
    hub_repo_id: str = setting("", "hub model repository USER/NAME that push_to_hub uploads to")


# ------------------------------------------------------------------ spo train


@dataclass
class ModelConfig:
    pretrained: str = setting("world:sd", "SD, SDXL or SD3 diffusers pipeline (family read from it): hub id, dir, "
                              "world:sd")
    vae: str = setting("", "separate VAE replacing the pipeline's (e.g. madebyollin/sdxl-vae-fp16-fix); empty = own")
    spm: str = setting("world:spm", "step judge: an SPM dir (`spo train-spm`), authors:CKPT, a CLIP dir (naive), or "
                       "scorer:NAME (any registered scorer on the x0-predictions, e.g. scorer:world-utility)")
    judge: str = setting("spm", "what scores the candidates: spm (model.spm on decoded x0-predictions) | latent "
                         "(model.latent_judge on the noisy latents: no decode, one network row per prompt)",
                         choices=JUDGE_KINDS)
    latent_judge: str = setting("world:latent_judge", "model.judge=latent: a latent step judge dir "
                                "(`spo train-latent-judge`); several, comma-separated, score as their mean")
    scoring_decoder: str = setting("", "model.judge=spm: a small AutoencoderTiny (TAESD) that decodes the "
                                   "x0-predictions for the judge only (madebyollin/taesd, taesdxl, taesd3, taef1, a "
                                   "dir, world:tiny_decoder); empty = the pipeline's VAE")
    use_lora: bool = setting(True, "False: full fine-tuning (the reference is then a frozen copy)")
    lora_rank: int = setting(4, "LoRA rank", ge=1)
    lora_alpha: float = setting(4.0, "LoRA alpha, saved in the LoRA metadata; equal to the rank keeps a scale of 1", gt=0)
    lora_targets: list[str] = setting(DEFAULT_LORA_TARGETS, "module names that get LoRA adapters (the default "
                                      "adapts every family's attention; SD3 recipes add add_q_proj,add_k_proj,"
                                      "add_v_proj,to_add_out)")
    gradient_checkpointing: bool = setting(False, "trade compute for memory in the trained network")
    init_lora: str = setting("", "start from this LoRA folder of `spo train` (same base, rank, alpha, targets) "
                             "instead of fresh adapters; empty = fresh")
    compile: str = setting("", "torch.compile mode for the resampler's (sampling-phase) network calls only; training "
                           "runs eager. The first round compiles (world, CPU: 217 s cold, 17 s cached), then rounds "
                           "run 1.17x faster (benchmarks/results/compile_speed.md); empty = off", choices=COMPILE_MODES)


@dataclass
class SampleConfig:
    num_steps: int = setting(20, "DDIM steps", ge=1)
    eta: float = setting(1.0, "DDIM eta; > 0 so that each step is a Gaussian transition (flow models: scales "
                         "the flow sampler's noise)", gt=0)
    flow_sampler: str = setting("sde", "flow models (SD3, FLUX): sde (Flow-GRPO's SDE, the ODE's marginals) | ddim "
                                "(DDIM-style flow step, eta-parameterised; its last step is deterministic)",
                                choices=("sde", "ddim"))
    flow_noise_level: float = setting(0.7, "flow models, flow_sampler=sde: noise level a of sigma_t = "
                                      "a*sqrt(t/(1-t)), times eta (Flow-GRPO's SD3 value 0.7)", gt=0, le=5)
    guidance_scale: float = setting(5.0, "classifier-free guidance, in sampling and in training", ge=0)
    num_candidates: int = setting(4, "K candidates per diverted step (a pair needs two)", ge=2)
    threshold: float = setting(0.3, "keep a pair only if its preference gap (keep_rule) exceeds this", ge=0, lt=1)
    keep_rule: str = setting("best_worst", "gap of a candidate set: best_worst (the authors': tanh(Δs/2) of the best "
                             "and worst score) | kway (softmax over all K)", choices=("best_worst", "kway"))
    continuation: str = setting("random", "candidate the trajectory continues from: random (the paper) | best | worst",
                                choices=("random", "best", "worst"))
    judge_precision: str = setting("fp32", "the step judge scores in fp32 (the authors) or under the run's autocast",
                                   choices=("fp32", "autocast"))
    divert_start_step: int = setting(4, "plain sampling before this step index (index 4 of 20 is t = 751)", ge=0)
    inner_steps: int = setting(0, "> 0: branch every inner_steps+1 steps, train every transition between (SDXL)", ge=0)
    batch_size: int = setting(8, "prompts per resampler round (sample, then train on its pairs), per process", ge=1)
    batches_per_epoch: int = setting(0, "rounds per epoch, per process; 0 = one shuffled pass over the prompts",
                                     ge=0)


@dataclass
class TrainConfig:
    beta: float = setting(10.0, "DPO temperature", gt=0)
    eps: float = setting(0.1, "ratio clip: log r is clamped to [log(1 - eps), log(1 + eps)]", gt=0, lt=1)
    learning_rate: float = setting(6e-5, "AdamW learning rate", gt=0)
    adam_weight_decay: float = setting(1e-4, "AdamW weight decay", ge=0)
    optimizer: str = setting("adamw", "adamw | adamw8bit (bitsandbytes' 8-bit AdamW: less optimizer memory)",
                             choices=OPTIMIZERS)
    lr_scheduler: str = setting("constant", "learning-rate schedule (diffusers' get_scheduler)", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = setting(0, "warm-up optimizer steps of the schedule", ge=0)
    batch_size: int = setting(8, "pairs per micro-batch", ge=1)
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step", ge=1)
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this (0 = no clipping)", ge=0)
    num_epochs: int = setting(10, "epochs to train", ge=1)
    inner_epochs: int = setting(1, "passes over each epoch's pairs", ge=1)
    mixed_precision: str = setting("no", "no | fp16 | bf16 (LoRA weights stay fp32)", choices=MIXED_PRECISION)
    allow_tf32: bool = setting(True, "TF32 matmuls on Ampere+ GPUs")
    seed: int = setting(0, "seed of every random draw of the run", ge=0)
    max_nonfinite_in_a_row: int = setting(10, "abort after this many skipped non-finite steps in a row", ge=1)


@dataclass
class DPOConfig:
    """The Diffusion-DPO baseline (method: diffusion-dpo): offline pairs instead of the resampler."""

    dataset: str = setting("world:preference", "Pick-a-Pic-schema pairs: hub id, save_to_disk dir, parquet dir/file")
    split: str = setting("train", "dataset split")
    beta: float = setting(2000.0, "Wallace et al.'s SD1.5 value (their loss scales it by 1/2)", gt=0)
    pairs_per_epoch: int = setting(512, "pairs per epoch (the unit of checkpoints and logs); the data is cycled", ge=1)


@dataclass
class SPOConfig:
    """`spo train`: the method, the model, its sampling, optimisation and logging."""

    prompts: str = setting("world:train", "prompt set: file (txt/json/jsonl/csv), dataset id, spo:4k or world:SPLIT")
    method: str = setting("spo", "training method by registry name: spo | diffusion-dpo")
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def validate(self) -> None:
        validate_fields(self)
        s = self.sample
        if s.divert_start_step >= s.num_steps:
            raise SPOError(f"sample.divert_start_step must lie in [0, num_steps={s.num_steps}), "
                           f"got {s.divert_start_step}")
        if self.model.init_lora and not self.model.use_lora:
            raise SPOError("model.init_lora needs model.use_lora=true (it starts the LoRA adapters from a folder)")
        if self.log.push_to_hub and not self.log.hub_repo_id:
            raise SPOError("log.push_to_hub=true needs log.hub_repo_id=USER/NAME (the hub repository to upload to)")
        if self.log.push_to_hub and not self.model.use_lora:
            raise SPOError("log.push_to_hub uploads a LoRA folder; with model.use_lora=false upload the pipeline "
                           "folder yourself (hf upload)")

    def digest(self) -> str:
        """Identity of the run: everything that shapes training except where it is written and how long it lasts."""
        plain = to_plain(self)
        plain["log"] = {}
        plain["train"].pop("num_epochs")
        return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ spo train-spm


TRAIN_PARAMS = ("conditioning", "vision", "all")


@dataclass
class SPMDataConfig:
    dataset: str = setting("", "preference data: hub id, save_to_disk dir, parquet dir or file (Pick-a-Pic schema)")
    split: str = setting("train", "dataset split to train on")
    per_prompt_weighting: bool = setting(True, "each prompt counts equally (PickScore)")
    relabel_threshold: float = setting(-1.0, ">= 0: relabel pairs with the base model at t=0 (authors' SDXL: 0.1)")
    relabel_ties: str = setting("tie", "relabelled pairs with |p0 - p1| <= threshold: tie (0.5/0.5, kept) | drop",
                                choices=("tie", "drop"))


@dataclass
class SPMModelConfig:
    diffusion_model: str = setting("", "SD, SDXL or SD3 diffusers pipeline (hub id or dir) used for the noising step")
    vae: str = setting("", "separate VAE for it (e.g. madebyollin/sdxl-vae-fp16-fix); empty = the pipeline's own")
    base: str = setting("", "CLIP checkpoint to start from (e.g. yuvalkirstain/PickScore_v1)")
    processor: str = setting("", "image processor / tokenizer source; empty = same as base")
    time_conditioned: bool = setting(True, "False gives the ablation without timestep conditioning")
    train_params: str = setting("all", "conditioning | vision | all", choices=TRAIN_PARAMS)


@dataclass
class SPMTrainingConfig:
    max_steps: int = setting(1000, "optimizer steps", ge=1)
    batch_size: int = setting(16, "pairs per process per micro-batch", ge=1)
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step", ge=1)
    learning_rate: float = setting(1e-5, "for the CLIP weights", gt=0)
    conditioning_learning_rate: float = setting(0.0, "for the new conditioning weights; 0 = learning_rate (one group)",
                                                ge=0)
    weight_decay: float = setting(0.01, "AdamW weight decay", ge=0)
    lr_scheduler: str = setting("constant", "learning-rate schedule (diffusers' get_scheduler)", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = setting(0, "warm-up optimizer steps of the schedule", ge=0)
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this (0 = no clipping)", ge=0)
    t_min: int = setting(0, "timesteps are drawn uniformly from [t_min, t_max]", ge=0)
    t_max: int = setting(999, "largest timestep drawn (below the model's num_train_timesteps)", ge=0)
    guidance_scale: float = setting(5.0, "CFG of the noising step, as in sampling", ge=0)
    mixed_precision: str = setting("no", "no | fp16 | bf16", choices=MIXED_PRECISION)
    seed: int = setting(0, "seed of every random draw of the run", ge=0)


@dataclass
class SPMTrainConfig:
    """`spo train-spm`: data, models, optimisation and logging of the step-aware preference model."""

    data: SPMDataConfig = field(default_factory=SPMDataConfig)
    model: SPMModelConfig = field(default_factory=SPMModelConfig)
    train: SPMTrainingConfig = field(default_factory=SPMTrainingConfig)
    log: LogConfig = field(default_factory=lambda: LogConfig(output_dir="runs/spm", checkpointing_steps=500,
                                                             tracker_project="spm"))

    def validate(self) -> None:
        validate_fields(self)
        if not self.data.dataset or not self.model.diffusion_model or not self.model.base:
            raise SPOError("train-spm needs data.dataset, model.diffusion_model and model.base (a CLIP checkpoint)")
        if self.model.train_params == "conditioning" and not self.model.time_conditioned:
            raise SPOError("model.train_params=conditioning needs model.time_conditioned=true (nothing else would train)")
        if self.train.t_min > self.train.t_max:
            raise SPOError(f"need train.t_min <= train.t_max, got {self.train.t_min} > {self.train.t_max}")
        if self.log.push_to_hub:
            raise SPOError("log.push_to_hub is for spo train's LoRA; upload an SPM folder with `hf upload`")


# ------------------------------------------------------------------ spo train-latent-judge


@dataclass
class LatentJudgeDataConfig:
    dataset: str = setting("world:spm_preference", "preference data (Pick-a-Pic schema): hub id, save_to_disk dir, "
                           "parquet dir or file")
    split: str = setting("train", "dataset split to train on")
    per_prompt_weighting: bool = setting(True, "each prompt counts equally (PickScore)")


@dataclass
class LatentJudgeDistillConfig:
    teacher: str = setting("", "distil from this pixel step judge (an SPM dir, world:spm) on the diffusion model's own "
                           "candidate sets (drawn as the resampler draws them, with the sample group) instead of "
                           "training on data.dataset's pairs; empty = the pairs")
    prompts: str = setting("world:train", "prompt set the candidate sets are sampled for")
    num_prompts: int = setting(512, "prompts sampled; each gives one candidate set per diverted step", ge=2)
    batch_size: int = setting(32, "prompts per resampler batch", ge=1)
    held_out_fraction: float = setting(0.1, "share of the prompts held out to measure agreement with the teacher",
                                       ge=0, lt=1)
    policies: list[str] = setting([], "LoRA folders of SPO runs made with an earlier judge (`OUT/lora`): each tuned "
                                  "policy draws further candidate sets, scored by the teacher — an on-policy round, "
                                  "so the judge also learns the latents SPO moves the model to; empty = the base model only")
    policy_prompts: int = setting(128, "prompts each distill.policies policy draws candidate sets for", ge=2)


@dataclass
class LatentJudgeModelConfig:
    diffusion_model: str = setting("world:sd", "diffusers pipeline whose VAE latents and text conditioning the judge reads")
    vae: str = setting("", "separate VAE for it; empty = the pipeline's own")
    widths: list[int] = setting([32, 64, 64], "channels of each stage of FiLM ResNet blocks (2x pooled between stages)")
    blocks_per_stage: int = setting(1, "FiLM ResNet blocks per stage", ge=1)
    cond_dim: int = setting(128, "width of the t + text conditioning vector", ge=8)
    embed_dim: int = setting(64, "width of the image/text space of the final dot product", ge=8)
    init: str = setting("", "start from this latent judge (a dir or world:latent_judge; its widths win); empty = fresh")
    reads: str = setting("noisy", "what the judge scores: noisy (a candidate latent at its noise level: no network "
                         "call for the K candidates) | x0 (their guided x0-prediction: the scoring call stays, the "
                         "decode and CLIP go; needs distill.teacher)", choices=("noisy", "x0"))
    ensemble_size: int = setting(1, "judges trained on the same data with seeds train.seed, train.seed+1, ...; "
                                 "saved as one ensemble whose score is their mean (costs one judge call each)", ge=1)


@dataclass
class LatentJudgeTrainingConfig:
    max_steps: int = setting(3000, "optimizer steps", ge=1)
    batch_size: int = setting(64, "pairs per step", ge=1)
    learning_rate: float = setting(1e-3, "AdamW learning rate", gt=0)
    weight_decay: float = setting(0.01, "AdamW weight decay", ge=0)
    lr_warmup_steps: int = setting(100, "linear warm-up steps before the cosine decay", ge=0)
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this (0 = no clipping)", ge=0)
    t_min: int = setting(0, "timesteps are drawn uniformly from [t_min, t_max]", ge=0)
    t_max: int = setting(999, "largest timestep drawn (below the model's num_train_timesteps)", ge=0)
    encode_batch_size: int = setting(64, "pairs per VAE-encoding batch (each image is encoded once, before training)",
                                     ge=1)
    seed: int = setting(0, "seed of every random draw of the run", ge=0)


@dataclass
class LatentJudgeLogConfig:
    output_dir: str = setting("runs/latent-judge", "run folder: config.yaml, metrics.jsonl, latent_judge/")
    log_every: int = setting(100, "append the mean loss and batch accuracy to metrics.jsonl every N steps", ge=1)


@dataclass
class LatentJudgeTrainConfig:
    """`spo train-latent-judge`: a judge of noisy latents, trained on VAE-encoded preference pairs, or distilled
    from a pixel step judge on the diffusion model's own candidate sets (`distill.teacher`)."""

    data: LatentJudgeDataConfig = field(default_factory=LatentJudgeDataConfig)
    distill: LatentJudgeDistillConfig = field(default_factory=LatentJudgeDistillConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)  # distill.teacher: how the candidate sets are drawn
    model: LatentJudgeModelConfig = field(default_factory=LatentJudgeModelConfig)
    train: LatentJudgeTrainingConfig = field(default_factory=LatentJudgeTrainingConfig)
    log: LatentJudgeLogConfig = field(default_factory=LatentJudgeLogConfig)

    def validate(self) -> None:
        validate_fields(self)
        if not self.model.widths or min(self.model.widths) < 1:
            raise SPOError(f"model.widths must be a non-empty list of positive channel counts, got {self.model.widths}")
        if self.train.t_min > self.train.t_max:
            raise SPOError(f"need train.t_min <= train.t_max, got {self.train.t_min} > {self.train.t_max}")
        if self.model.reads == "x0" and not self.distill.teacher:
            raise SPOError("model.reads=x0 needs distill.teacher: an x0-prediction of every noised training pair "
                           "would cost a network call per pair per step; distil from a pixel judge instead")
        s = self.sample
        if self.distill.teacher and not 0 <= s.divert_start_step < s.num_steps:
            raise SPOError(f"sample.divert_start_step must lie in [0, num_steps={s.num_steps}), "
                           f"got {s.divert_start_step}")


# ------------------------------------------------------------------ loading


def _coerce(name: str, value, annotation):
    """Convert a YAML/CLI value to the field's declared type, or raise SPOError naming the field."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise SPOError(f"config field {name!r} expects a list, got {value!r}")
        item = args[0] if args else str
        return origin(_coerce(name, v, item) for v in value)
    try:
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if annotation in (int, float, str):
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return annotation(value)
    except (TypeError, ValueError):
        raise SPOError(f"config field {name!r} expects {annotation.__name__}, got {value!r}") from None
    return value


def from_dict(cls, data: dict, where: str = "config", prefix: str = "", root=None):
    """Build dataclass `cls` from a (nested) dict; nested dataclass fields take sub-dicts."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SPOError(f"unknown {where} field {prefix + unknown[0]}: {_suggest(root or cls, unknown[0], prefix)}")
    values = {}
    for k, v in data.items():
        if dataclasses.is_dataclass(hints[k]):
            if not isinstance(v, dict):
                raise SPOError(f"config field {prefix + k!r} is a group; give its fields ({prefix + k}.NAME=...)")
            values[k] = from_dict(hints[k], v, where, prefix=f"{prefix}{k}.", root=root or cls)
        else:
            values[k] = _coerce(prefix + k, v, hints[k])
    try:
        cfg = cls(**values)
    except TypeError as exc:
        raise SPOError(f"{where}: {exc}") from None
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _suggest(root, name: str, prefix: str) -> str:
    """"did you mean" for a misspelt or misplaced field, or the known fields of the group."""
    import difflib

    everywhere = [dotted for dotted, _, _ in field_help(root)]
    here = [d[len(prefix):] for d in everywhere if d.startswith(prefix) and "." not in d[len(prefix):]]
    elsewhere = [d for d in everywhere if d.split(".")[-1] == name]  # the right name in the wrong place
    if elsewhere:
        return f"did you mean {' or '.join(elsewhere)}?"
    initials = [f for f in here if "".join(w[0] for w in f.split("_")) == name]  # lr -> learning_rate
    close = initials or difflib.get_close_matches(name, here, n=1, cutoff=0.6)
    if close:
        return f"did you mean {prefix}{close[0]}?"
    leaf = difflib.get_close_matches(name, [d.split(".")[-1] for d in everywhere], n=1, cutoff=0.75)
    if leaf:  # the right name in another group (or a bare name that lives in a group)
        return f"did you mean {' or '.join(d for d in everywhere if d.split('.')[-1] == leaf[0])}?"
    return f"known fields here: {', '.join(sorted(prefix + n for n in here))} (spo train --help lists them all)"


def parse_overrides(pairs: list[str]) -> dict:
    """["a.b=1", "c=x"] -> {"a": {"b": 1}, "c": "x"}."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise SPOError(f"override {pair!r} is not of the form key=value")
        key, value = pair.split("=", 1)
        *groups, leaf = parts = key.strip().split(".")
        if not all(parts):
            raise SPOError(f"override {pair!r} has an empty field name; write group.field=value")
        node = out
        for i, g in enumerate(groups):
            node = node.setdefault(g, {})
            if not isinstance(node, dict):  # e.g. train.num_epochs=1 train.num_epochs.x=1
                raise SPOError(f"override {pair!r} conflicts with an earlier override that set "
                               f"{'.'.join(parts[:i + 1])} to a value; give each field once")
        node[leaf] = _override_value(pair, value)
    return out


def _override_value(pair: str, value: str):
    """The YAML value of one key=value override (so lists, numbers and booleans work as in a file)."""
    if not value.strip():
        return ""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as exc:
        reason = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise SPOError(f"override {pair!r} is not valid YAML ({reason}); quote it or fix the brackets") from None


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def packaged_configs() -> dict[str, Path]:
    """The recipes shipped inside the package (also the repository's configs/), by name."""
    from importlib import resources

    folder = Path(str(resources.files("spo") / "configs"))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def resolve_config_path(path: str | Path) -> Path:
    """A YAML file, or the name of a shipped recipe ("sd15", "world" -> its packaged file)."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = packaged_configs()
    if p.suffix == "" and str(path) in shipped:
        return shipped[str(path)]
    if p.name in {q.name for q in shipped.values()} and not p.exists():
        return shipped[p.stem]  # configs/world.yaml named from outside the repository
    raise SPOError(f"config file {path} does not exist; shipped recipes: {', '.join(shipped)} (e.g. --config world)")


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Dataclass `cls` from a YAML file (optional) updated by `key=value` overrides."""
    data = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise SPOError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        except UnicodeDecodeError:
            raise SPOError(f"config file {path} is not a text file (not UTF-8); give a YAML recipe") from None
        except OSError as exc:  # a directory, or no permission to read it
            raise SPOError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        if not isinstance(data, dict):
            raise SPOError(f"config file {path} must hold a mapping of field: value")
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data, where=str(path) if path else "config")


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_plain(cfg), sort_keys=False))


def to_plain(cfg) -> dict:
    """Dataclass -> dict of YAML-safe values (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


RUN_LENGTH = ("train.num_epochs", "train.max_steps")  # a resumed run may run longer


def run_identity(plain: dict) -> dict:
    """{"group.field": value} of a config (as a plain dict) minus what a resume may change: log.* and the length."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    return {k: v for k, v in flat(plain).items() if not k.startswith("log.") and k not in RUN_LENGTH}


def resume_changes(saved_plain: dict, cfg) -> list[str]:
    """What differs between the config a run was started with and `cfg`, as "field: old -> new".

    A field the saved run did not have (added by a later version of spo) counts only when it is set away
    from its default, so upgrading spo does not strand a half-finished run.
    """
    saved, now = run_identity(saved_plain), run_identity(to_plain(cfg))
    defaults = run_identity(to_plain(type(cfg)()))
    changes = []
    for key in sorted(set(saved) | set(now)):
        if key not in saved:
            if now[key] != defaults.get(key):
                changes.append(f"{key}: (unset) -> {now[key]!r}")
        elif key not in now:
            changes.append(f"{key}: {saved[key]!r} -> (no longer a setting)")
        elif saved[key] != now[key]:
            changes.append(f"{key}: {saved[key]!r} -> {now[key]!r}")
    return changes


def check_resume_config(saved_path: Path, cfg) -> None:
    """Refuse a resume under a different config, naming the fields that differ."""
    if not Path(saved_path).is_file():
        return
    changes = resume_changes(yaml.safe_load(Path(saved_path).read_text()) or {}, cfg)
    if changes:
        shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
        raise SPOError(f"{saved_path} was written by a run with a different config ({shown}); resume with the "
                       f"same config (only log.* and the run length may change), or start a new log.output_dir")


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v
