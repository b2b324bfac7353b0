"""Comparing models image for image: paired statistics, win rates, distribution distances, reports.

`spo evaluate` lives here too: fixed-seed generation with an on-disk image cache, scoring with the
scorers of `spo.scorers`, and the report files (`evaluate_models`). `score_images` is the one
scoring path for images in memory (the demo and the world benchmarks use it too).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from spo.errors import SPOError
from spo.files import atomic_write_bytes, atomic_write_text


def paired_difference(after, before, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of (after - before) over prompts with a bootstrap 95% CI, and the win rate (ties count half)."""
    a, b = np.asarray(after, float), np.asarray(before, float)
    d = a - b
    rng = np.random.default_rng(seed)
    # One resample of prompts serves both statistics: wins and ties of the same draw (resampling them
    # separately ignores that a prompt is either one or the other, and widens the interval).
    idx = rng.integers(0, len(d), (n_boot, len(d)))
    boots = d[idx].mean(1)
    score = (d > 1e-9) + 0.5 * (np.abs(d) <= 1e-9)  # 1 win, 0.5 tie, 0 loss
    wins = score.mean()
    win_boot = score[idx].mean(1)
    return dict(before=float(b.mean()), after=float(a.mean()), diff=float(d.mean()),
                diff_ci95=[float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
                win_rate=float(wins), win_rate_ci95=[float(np.percentile(win_boot, 2.5)), float(np.percentile(win_boot, 97.5))],
                n=int(len(d)))


def label_accuracy(score_0, score_1, label_0) -> float:
    """Fraction of decided pairs (no ties) on which the higher score matches the label."""
    score_0, score_1, label_0 = map(np.asarray, (score_0, score_1, label_0))
    decided = label_0 != 0.5
    if not decided.any():
        return float("nan")
    predicted = (score_0 > score_1).astype(float)
    return float((predicted[decided] == label_0[decided]).mean())


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula, any features)."""
    from scipy import linalg

    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def clip_image_features(clip_dir: str | Path, images: np.ndarray) -> np.ndarray:
    """Normalised CLIP image embeddings of HxWx3 [0, 1] images, fed in [-1, 1] as the world's CLIP expects."""
    import torch
    from transformers import CLIPModel

    from spo.clip import image_embeds
    from spo.images import to_model_pixels

    model = CLIPModel.from_pretrained(clip_dir).eval()
    x = to_model_pixels(images)
    with torch.no_grad():
        return torch.cat([image_embeds(model, x[i : i + 256]) for i in range(0, len(x), 256)]).numpy()


class SPMScorer:
    """A step-aware preference model as a scorer of finished images: its score at t=0, SPO's training judge."""

    name = "spm-t0"

    def __init__(self, spm_dir: str | Path):
        from spo.preference.spm import StepAwareCLIP

        self.model = StepAwareCLIP.from_pretrained(spm_dir).eval()

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        import torch

        from spo.images import to_model_pixels

        with torch.no_grad():
            return self.model(to_model_pixels(images), prompts, torch.zeros(len(prompts))).numpy()


def score_images(images: np.ndarray, prompts: list[str], scorers: list) -> dict[str, np.ndarray]:
    """Every scorer (from `spo.scorers.load_scorer`, or any object with `name` and `score`) on the same
    images, one float per image, by scorer name."""
    return {s.name: np.asarray(s.score(images, prompts), float) for s in scorers}


def write_json(path: Path, data: dict) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2))


# ------------------------------------------------------------------ `spo evaluate`: models x scorers on a prompt set


@dataclass(frozen=True)
class Sampler:
    """How every image is drawn; the defaults are the paper's evaluation settings."""

    steps: int = 20  # DDIM steps
    guidance: float = 5.0  # classifier-free guidance scale
    eta: float = 0.0  # DDIM eta; 0 makes an image a function of its initial noise
    seed: int = 0  # prompt i is drawn from seed + i, the same for every model
    scheduler: str = "DDIM"


@dataclass(frozen=True)
class ModelSpec:
    """One model under evaluation: `NAME=BASE` or `NAME=BASE+LORA_DIR` (see `parse_model_spec`)."""

    name: str
    pretrained: str  # base pipeline: hub id, directory or world:NAME
    lora: str | None = None  # LoRA directory, or a full-pipeline directory, from `spo train`

    @property
    def spec(self) -> str:
        return self.pretrained + (f"+{self.lora}" if self.lora else "")

    def identity(self) -> dict:
        """What the model's images depend on: the spec, plus a fingerprint of each local directory's files
        so that retraining into the same directory does not reuse old images."""
        from spo.plugins import resolve

        parts = {"pretrained": self.pretrained, "lora": self.lora}
        return dict(spec=self.spec, **{f"{k}_fingerprint": _fingerprint(resolve(v)) for k, v in parts.items() if v})


def parse_model_spec(text: str) -> ModelSpec:
    """`NAME=SPEC` (or just SPEC), SPEC = BASE | BASE+LORA_DIR | FULL_PIPELINE_DIR."""
    name, sep, spec = text.partition("=")
    if not sep:
        name, spec = "", text
    base, plus, lora = spec.strip().partition("+")
    if not base or (plus and not lora):
        raise SPOError(f"--model {text!r}: expected NAME=BASE or NAME=BASE+LORA_DIR, e.g. "
                       "base=world:sd or spo=world:sd+runs/spo-world/lora")
    if lora and not Path(lora).is_dir():
        raise SPOError(f"--model {text!r}: LoRA directory {lora} does not exist")
    return ModelSpec(name.strip() or Path(lora or base).name or base, base, lora or None)


def _fingerprint(path: str) -> str | None:
    """Hash of (name, size, mtime) of every file under a local path; None for a hub id."""
    root = Path(path)
    if not root.exists():
        return None
    files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        name = f.relative_to(root) if root.is_dir() else f.name
        digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def image_key(identity: dict, prompt: str, seed: int, sampler: Sampler) -> str:
    """The cache key of one image: everything the pixels depend on, hashed."""
    return _key(identity, prompt, dict(asdict(sampler), seed=seed))


def _key(identity: dict, prompt: str, settings: dict) -> str:
    blob = json.dumps(dict(model=identity, prompt=prompt, sampler=settings), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _meta_key(meta) -> str | None:
    """The key that a cached PNG's own metadata (written by `_write_png`) describes; None if it has none."""
    try:
        return _key(meta["model"], meta["prompt"], dict(meta["sampler"], seed=meta["seed"]))
    except (KeyError, TypeError, ValueError):
        return None


def cache_problem(path: Path, key: str, size: tuple[int, int] | None) -> str | None:
    """Why a cached image must not be scored (None when it may): it must decode whole, carry the metadata
    it was written with, for exactly this key, and have the model's size (when known)."""
    try:
        with Image.open(path) as im:
            im.verify()  # chunk checksums; PIL needs a fresh open after verify
        with Image.open(path) as im:
            im.load()  # a truncated file fails here
            got, text = im.size, dict(getattr(im, "text", {}))
    except Exception:  # PIL raises many types for empty, truncated or garbage files
        return "undecodable"
    try:
        meta = json.loads(text.get("spo", ""))
    except ValueError:
        meta = None
    if _meta_key(meta) != key:
        return "written under other settings"
    if size is not None and got != size:
        return "wrong size"
    return None


def expected_size(model: ModelSpec) -> tuple[int, int] | None:
    """(width, height) the model draws at by default, read from its pipeline's config files (a local folder,
    or the hub cache); None when they cannot be read, and the size is then not checked."""
    from spo.plugins import resolve

    full = model.lora and (Path(model.lora) / "model_index.json").is_file()
    root = model.lora if full else resolve(model.pretrained)
    try:
        unet = json.loads(_pipeline_file(root, "unet/config.json").read_text())
        vae = json.loads(_pipeline_file(root, "vae/config.json").read_text())
        side = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)  # as diffusers' pipelines
    except Exception:  # no such file, a hub id not in the cache, an unusual config
        return None
    return side, side


def _pipeline_file(root: str, name: str) -> Path:
    if Path(root).is_dir():
        return Path(root) / name
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(root, name)
    if not isinstance(found, str):
        raise FileNotFoundError(name)
    return Path(found)


def _chunks(indices: list[int], size: int) -> list[tuple[int, int]]:
    """Sorted indices as [start, stop) ranges of consecutive indices, at most `size` long."""
    chunks: list[tuple[int, int]] = []
    for i in indices:
        if chunks and chunks[-1][1] == i and i - chunks[-1][0] < size:
            chunks[-1] = (chunks[-1][0], i + 1)
        else:
            chunks.append((i, i + 1))
    return chunks


def cached_images(model: ModelSpec, prompts: list[str], sampler: Sampler, cache_dir: Path, batch_size: int = 16,
                  device: str | None = None, log=print) -> list[Path]:
    """The PNG of the model's image for every prompt, generated only where the cache has none.

    Images are 8-bit PNGs (what a person would look at) and are always scored from the PNG, so a
    first and a later run score exactly the same pixels. Each batch is written as soon as it is
    drawn: an interrupted run keeps what it made.
    """
    from spo import generation

    identity = model.identity()
    keys = [image_key(identity, p, sampler.seed + i, sampler) for i, p in enumerate(prompts)]
    paths = [cache_dir / k[:2] / f"{k}.png" for k in keys]
    size = expected_size(model)
    # Every cached image is checked before it is used: a damaged or foreign file is drawn again, never scored.
    problems = {i: cache_problem(path, keys[i], size) for i, path in enumerate(paths) if path.is_file()}
    bad = Counter(why for why in problems.values() if why)
    todo = [i for i in range(len(paths)) if problems.get(i, "missing")]
    if bad:
        log(f"[evaluate] {model.name}: regenerating {sum(bad.values())} cached images that failed verification "
            f"({', '.join(f'{n} {why}' for why, n in sorted(bad.items()))})")
    log(f"[evaluate] {model.name}: {len(prompts) - len(todo)} of {len(prompts)} images cached, generating {len(todo)}")
    if todo:
        pipe = _pipeline_for(model, device)
        for start, stop in _chunks(todo, batch_size):  # consecutive prompts keep prompt i on seed + i
            images = generation.generate(pipe, prompts[start:stop], sampler.seed + start, sampler.steps,
                                         sampler.guidance, sampler.eta, batch=batch_size, desc=model.name)
            for i, image in zip(range(start, stop), images):
                _write_png(paths[i], image, dict(model=identity, prompt=prompts[i], seed=sampler.seed + i,
                                                 sampler=asdict(sampler)))
        del pipe
    return paths


def read_images(paths: list[Path]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in paths])


def _pipeline_for(model: ModelSpec, device: str | None):
    import torch
    from spo import generation
    from spo.models import SAMPLING_SCHEDULERS, pipeline_family

    pipe = generation.load_model(model.pretrained, model.lora)
    expected = SAMPLING_SCHEDULERS[pipeline_family(pipe)]
    if type(pipe.scheduler).__name__ != expected:
        raise SPOError(f"{model.spec} samples with {type(pipe.scheduler).__name__}; evaluation uses {expected}")
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _write_png(path: Path, image: np.ndarray, meta: dict) -> None:
    from PIL.PngImagePlugin import PngInfo

    from spo.images import to_uint8

    info = PngInfo()
    info.add_text("spo", json.dumps(meta))  # each cached image says where it came from
    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(png, format="PNG", pnginfo=info)
    atomic_write_bytes(path, png.getvalue())


def mean_ci(values, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean over prompts with a bootstrap 95% CI."""
    v = np.asarray(values, float)
    boots = v[np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))].mean(1)
    return dict(mean=float(v.mean()), std=float(v.std()), ci95=[float(np.percentile(boots, 2.5)),
                                                                 float(np.percentile(boots, 97.5))], n=int(len(v)))


def default_scorers(prompts: list[str]) -> list[str]:
    """A plug-in's judges for prompts it owns (the world's on world prompts), else the paper's four metrics."""
    from spo import plugins

    return plugins.default_scorers(prompts) or ["pickscore", "hpsv2", "imagereward", "aesthetic"]


def evaluate_models(models: list[ModelSpec], scorer_specs: list[str], prompts: list[str], prompt_source: str,
                    sampler: Sampler, out: Path, cache_dir: Path, batch_size: int = 16, grid_prompts: int = 8,
                    device: str | None = None, log=print) -> dict:
    """Generate (or reuse) every model's images, score them with every scorer, write the reports to `out`."""
    from spo.scorers import load_scorer, parse_scorer_spec

    _check_unique([m.name for m in models], "model name")
    _check_unique([parse_scorer_spec(s)[0] for s in scorer_specs], "scorer")
    scorers = [load_scorer(s, device) for s in scorer_specs]  # before generating: missing weights fail fast
    scores: dict[str, dict[str, np.ndarray]] = {}
    grid_images = {}
    for m in models:
        paths = cached_images(m, prompts, sampler, cache_dir, batch_size, device, log)
        log(f"[evaluate] {m.name}: scoring with {', '.join(scorer_specs)}")
        scores[m.name] = _score_all(scorers, paths, prompts)
        grid_images[m.name] = read_images(paths[:grid_prompts])
    baseline = models[0].name
    report = dict(
        settings=dict(
            sampler=dict(asdict(sampler), seeds=f"prompt i is drawn from seed {sampler.seed} + i, for every model",
                         batch_size=batch_size),
            prompts=dict(source=prompt_source, n=len(prompts)),
            models=[dict(name=m.name, pretrained=m.pretrained, lora=m.lora, identity=m.identity()) for m in models],
            scorers=[dict(name=s.name, spec=spec) for s, spec in zip(scorers, scorer_specs)],
            baseline=baseline, cache_dir=str(cache_dir)),
        results={m: {s: mean_ci(v) for s, v in by_scorer.items()} for m, by_scorer in scores.items()},
        vs_baseline={m: {s: paired_difference(v, scores[baseline][s]) for s, v in by_scorer.items()}
                     for m, by_scorer in scores.items() if m != baseline},
    )
    write_evaluation(out, report, scores, prompts, grid_images)
    return report


def _score_all(scorers: list, paths: list[Path], prompts: list[str], chunk: int = 256) -> dict[str, np.ndarray]:
    """Every scorer on every image, reading the PNGs a chunk at a time so that memory stays flat."""
    parts: dict[str, list[np.ndarray]] = {s.name: [] for s in scorers}
    for start in range(0, len(paths), chunk):
        images = read_images(paths[start : start + chunk])
        for name, scores in score_images(images, prompts[start : start + chunk], scorers).items():
            parts[name].append(scores)
    return {name: np.concatenate(p) for name, p in parts.items()}


def _check_unique(names: list[str], what: str) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SPOError(f"{what} {dupes[0]!r} given twice; give each one once (name models with NAME=SPEC)")


def write_evaluation(out: Path, report: dict, scores: dict, prompts: list[str], grid_images: dict) -> None:
    """results.json/.csv/.md, per_prompt.csv and grid.png, each written whole or not at all."""
    s = report["settings"]
    sampler, scorer_names = s["sampler"], [x["name"] for x in s["scorers"]]
    spec_of = {m["name"]: m["identity"]["spec"] for m in s["models"]}
    # Settings repeated on every row, so that a CSV read on its own still says how it was made.
    settings = dict(scheduler=sampler["scheduler"], steps=sampler["steps"], guidance=sampler["guidance"],
                    eta=sampler["eta"], prompts=s["prompts"]["source"], n_prompts=s["prompts"]["n"])
    per_prompt = [dict(prompt_index=i, prompt=p, seed=sampler["seed"] + i, model=model,
                       **{k: float(scores[model][k][i]) for k in scorer_names}, model_spec=spec_of[model], **settings)
                  for model in scores for i, p in enumerate(prompts)]
    write_json(out / "results.json", report)
    _write_csv(out / "results.csv", _summary_rows(report, spec_of, dict(seed=sampler["seed"], **settings)))
    _write_csv(out / "per_prompt.csv", per_prompt)
    atomic_write_text(out / "results.md", render_evaluation_markdown(report))
    _evaluation_grid(out / "grid.png", report, scores, prompts, grid_images)


def _summary_rows(report: dict, spec_of: dict, settings: dict) -> list[dict]:
    """One row per (model, scorer); the comparison columns are empty for the baseline itself."""
    rows = []
    for model, by_scorer in report["results"].items():
        for scorer, r in by_scorer.items():
            d = report["vs_baseline"].get(model, {}).get(scorer, {})
            diff_ci, win_ci = d.get("diff_ci95", ["", ""]), d.get("win_rate_ci95", ["", ""])
            rows.append(dict(model=model, scorer=scorer, mean=r["mean"], ci95_low=r["ci95"][0], ci95_high=r["ci95"][1],
                             n=r["n"], baseline=report["settings"]["baseline"], diff_vs_baseline=d.get("diff", ""),
                             diff_ci95_low=diff_ci[0], diff_ci95_high=diff_ci[1], win_rate=d.get("win_rate", ""),
                             win_rate_ci95_low=win_ci[0], win_rate_ci95_high=win_ci[1], model_spec=spec_of[model],
                             **settings))
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _fmt(x: float, sign: str = "") -> str:
    return f"{x:{sign}.2f}" if abs(x) >= 10 else f"{x:{sign}.3f}"


def render_evaluation_markdown(report: dict) -> str:
    s = report["settings"]
    sampler, scorers = s["sampler"], [x["name"] for x in s["scorers"]]
    lines = [
        f"# Evaluation on {s['prompts']['n']} prompts from `{s['prompts']['source']}`", "",
        (f"Sampler: {sampler['scheduler']} {sampler['steps']} steps, CFG {sampler['guidance']:g}, "
         f"eta {sampler['eta']:g}; {sampler['seeds']}."), "",
        "Models:", "",
        *[f"- **{m['name']}**: `{m['identity']['spec']}`" for m in s["models"]], "",
        "Mean over prompts ± half-width of the bootstrap 95% CI:", "",
        "| model | " + " | ".join(scorers) + " |", "|---|" + "---|" * len(scorers),
    ]
    for model, by_scorer in report["results"].items():
        cells = [f"{_fmt(r['mean'])} ± {_fmt((r['ci95'][1] - r['ci95'][0]) / 2)}" for r in
                 (by_scorer[k] for k in scorers)]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if report["vs_baseline"]:
        lines += ["", f"Against the baseline **{s['baseline']}**, paired over prompts (ties count half a win):", "",
                  "| model | scorer | difference [95% CI] | win rate [95% CI] |", "|---|---|---|---|"]
        for model, by_scorer in report["vs_baseline"].items():
            for scorer in scorers:
                d = by_scorer[scorer]
                lo, hi = d["diff_ci95"]
                wlo, whi = d["win_rate_ci95"]
                lines.append(f"| {model} | {scorer} | {_fmt(d['diff'], '+')} [{_fmt(lo, '+')}, {_fmt(hi, '+')}] | "
                             f"{d['win_rate']:.2f} [{wlo:.2f}, {whi:.2f}] |")
    lines += ["", "Files: results.json (everything), results.csv, per_prompt.csv, grid.png."]
    return "\n".join(lines) + "\n"


def _evaluation_grid(path: Path, report: dict, scores: dict, prompts: list[str], images: dict) -> None:
    """The first prompts (columns) for every model (rows), captioned with the first scorer's score."""
    from spo.plots import captioned_grid

    n = len(next(iter(images.values())))
    first = report["settings"]["scorers"][0]["name"]
    tiles, captions = [], []
    for model in images:
        for i in range(n):
            tiles.append(images[model][i])
            captions.append(f"{model} {scores[model][first][i]:.3g}: {prompts[i]}")
    sampler = report["settings"]["sampler"]
    cell = 128 if images[next(iter(images))].shape[1] <= 128 else 256
    captioned_grid(tiles, captions, path, cols=n, cell=cell,
                   title=f"rows: {', '.join(images)}; number = {first}; {sampler['scheduler']} {sampler['steps']} "
                         f"steps, CFG {sampler['guidance']:g}, seed {sampler['seed']}+i")
