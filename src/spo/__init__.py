"""SPO: Step-aware Preference Optimization for text-to-image diffusion models.

The top-level API, imported lazily (so `import spo` stays light):

    from spo import SPOConfig, Trainer, load_config
    cfg = load_config(SPOConfig, "world", ["train.num_epochs=2"])   # a shipped recipe by name, or a YAML path
    lora_dir = Trainer(cfg).setup().train()

A step judge is any callable `judge(images, captions, t) -> scores` (images in [-1, 1], B x 3 x H x W);
`model.spm` names one (an SPM directory, `authors:CKPT`, a CLIP directory, or `scorer:NAME` for a scorer
of the registry on the x0-predictions), and `spo.resampler.resample` takes any such callable.
"""

__version__ = "0.1.0"

_API = {
    "SPOConfig": "spo.config", "SPMTrainConfig": "spo.config", "load_config": "spo.config",
    "Trainer": "spo.trainer", "SPOTrainer": "spo.trainer", "resample": "spo.resampler",
    "register_method": "spo.methods", "load_step_judge": "spo.preference.judges", "train_spm": "spo.preference.train_spm",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'spo' has no attribute {name!r}")
