"""The embedded world's judges, added to the core's scorer registry by `spo.world.plugin`.

- `world-utility`: the ground truth (`spo/world/utility.py`), in [0, 1]; the world's "humans" in expectation.
- `world-utility-logit`: the same divided by the label model's tau: the simulated humans' Bradley–Terry logit.
- `world-pickscore`: the world's CLIP PickScore, logit_scale * cos(text, image) [world:pickscore].

Also what `spo evaluate-spm` adds on the world's preference pairs (`spm_references`).
"""

from __future__ import annotations

import numpy as np

from spo.errors import SPOError
from spo.world import resolve, scenes

DEFAULT_SCORERS = ["world-utility", "world-pickscore"]


class WorldUtility:
    """The embedded world's ground-truth utility (`spo.world.utility`), its "humans" in expectation."""

    name = "world-utility"

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        from spo.world.utility import utilities

        size = scenes.IMAGE_SIZE
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise SPOError(f"world-utility judges the embedded world's {size}x{size} images, "
                           f"got shape {images.shape}; use another --scorer for other models")
        if bad := scenes.outside_grammar(prompts):
            raise SPOError(f"world-utility needs prompts in the world's grammar, got {bad[0]!r}; "
                           "use --prompts world:test or another --scorer")
        return np.asarray(utilities(images, list(prompts)), dtype=np.float64)


class WorldUtilityLogit(WorldUtility):
    """The simulated humans' Bradley–Terry logit, utility / tau: on the same scale as a preference model's
    logits, so a keep threshold means the same for it (the oracle step judge)."""

    name = "world-utility-logit"

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        from spo.world.labels import LabelModel

        return super().score(images, prompts) / LabelModel().tau


def world_utility_logit(weights: str | None, device: str) -> WorldUtilityLogit:
    if weights:
        raise SPOError("world-utility-logit has no weights: use --scorer world-utility-logit")
    return WorldUtilityLogit()


def world_utility(weights: str | None, device: str) -> WorldUtility:
    if weights:
        raise SPOError("world-utility has no weights: use --scorer world-utility")
    return WorldUtility()


def world_pickscore(weights: str | None, device: str, processor: str | None = None):
    from spo.scorers import clip_scorer, pickscore_logits

    source = resolve(weights or "world:pickscore")
    hint = "rebuild the world with `spo world build`, or pass --scorer world-pickscore=/path/to/pickscore"
    return clip_scorer("world-pickscore", source, resolve(processor or source), pickscore_logits, device, hint)


def default_scorers(prompts: list[str]) -> list[str] | None:
    """The world's judges for prompts that are all world captions."""
    return list(DEFAULT_SCORERS) if not scenes.outside_grammar(prompts) else None


def spm_references(pairs) -> dict:
    """For world preference pairs (they carry the true utilities): the label-noise ceiling, and the true
    utility of the x0-predictions as a judge beside the models when every caption is a world caption."""
    from spo.evaluation import label_accuracy

    if "utility_0" not in pairs.column_names:
        return {}
    found = dict(ceiling=label_accuracy(pairs["utility_0"], pairs["utility_1"], pairs["label_0"]))
    if not scenes.outside_grammar(pairs["caption"]):
        found["reference_judges"] = {"utility on x0-prediction": utility_of_model_images}
    return found


def utility_of_model_images(images, captions: list[str]) -> list[float]:
    """True utility of NCHW images in [-1, 1] (x0-predictions); NaN for images of another size."""
    from spo.world.utility import utilities

    arr = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    if arr.shape[1] != scenes.IMAGE_SIZE:
        return [float("nan")] * len(captions)
    return utilities(arr, captions).tolist()
