"""The `--tiny` world build end to end, and its artifacts loaded through the stock library paths."""

import json

import numpy as np
import pytest
import torch

from spo.world import open_world, prompts, scenes
from spo.world.preference_data import COLUMNS, decode_image


def test_tiny_build_writes_every_artifact_and_a_manifest(tiny_world):
    assert open_world(tiny_world) == tiny_world
    manifest = json.loads((tiny_world / "world.json").read_text())
    assert manifest["tiny"] is True
    for stage in ("tokenizer", "clip", "sd", "sd3", "preference", "pickscore"):
        assert manifest["timings"][stage] >= 0
    assert (tiny_world / "report" / "base_samples.png").stat().st_size > 0
    assert not list(tiny_world.glob("*.partial"))


def test_stock_stable_diffusion_pipeline_loads_the_world_and_samples(tiny_world):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_world / "sd")
    assert isinstance(pipe.scheduler, DDIMScheduler)
    out = pipe(["a red circle", "a blue square above a yellow triangle"], num_inference_steps=2, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (2, 32, 32, 3)
    assert np.isfinite(out.images).all()


def test_the_flow_world_is_a_stock_sd3_pipeline_declaring_its_short_t5_slot(tiny_world):
    """world:sd3 loads with stock StableDiffusion3Pipeline (no T5) and samples; spo's loader finds the flow family
    and the declared text length, and stock sampling with that length gives spo's images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from spo.generation import generate
    from spo.models import FlowDiffusion, load_diffusion
    from spo.world.architecture import FLOW_T5_TOKENS

    stock = StableDiffusion3Pipeline.from_pretrained(tiny_world / "sd3", text_encoder_3=None, tokenizer_3=None)
    stock.set_progress_bar_config(disable=True)
    assert isinstance(stock.scheduler, FlowMatchEulerDiscreteScheduler) and stock.vae.config.shift_factor == 0.0
    prompts_ = ["a red circle", "a blue square above a yellow triangle"]
    expected = stock(prompts_, num_inference_steps=2, guidance_scale=5.0, max_sequence_length=FLOW_T5_TOKENS,
                     generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="np").images
    d = load_diffusion(tiny_world / "sd3")
    assert isinstance(d, FlowDiffusion) and d.family == "sd3"
    cond, _ = d.encode_prompts(prompts_)
    assert cond.embeds.shape[1] == d.pipe.tokenizer.model_max_length + FLOW_T5_TOKENS
    ours = generate(d.pipe, prompts_, seed=0, steps=2, guidance=5.0)
    assert ours.shape == (2, 32, 32, 3) and np.isfinite(ours).all()
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_the_flow_world_recipe_trains_on_the_tiny_flow_world(tiny_world, tiny_spm, tmp_path):
    """configs/flow_world.yaml end to end at toy size: SPO on world:sd3 with the SDE sampler, a LoRA out."""
    from pathlib import Path

    from spo.config import SPOConfig, load_config
    from spo.trainer import Trainer

    cfg = load_config(SPOConfig, Path(__file__).parents[1] / "configs" / "flow_world.yaml", [
        f"model.pretrained={tiny_world / 'sd3'}", f"model.spm={tiny_spm}", "sample.num_steps=4",
        "sample.divert_start_step=1", "sample.batch_size=2", "sample.threshold=0", "train.batch_size=2",
        "train.num_epochs=1", f"log.output_dir={tmp_path / 'run'}", "log.report_to=none"])
    trainer = Trainer(cfg, log=lambda m: None).setup()
    lora = trainer.train()
    assert trainer.diffusion.family == "sd3" and (Path(lora) / "pytorch_lora_weights.safetensors").is_file()
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert rows and '"pairs_trained": 0' not in rows[-1]


def test_preference_data_has_the_pick_a_pic_schema(tiny_world):
    import datasets

    ds = datasets.load_dataset(str(tiny_world / "preference"))
    assert set(ds) == {"train", "validation", "test"}
    train = ds["train"]
    assert tuple(train.column_names) == COLUMNS
    assert train.features["jpg_0"].dtype == "binary" and train.features["jpg_1"].dtype == "binary"
    assert train.features["caption"].dtype == "string"
    assert train.features["label_0"].dtype == "float64" and train.features["label_1"].dtype == "float64"
    row = train[0]
    assert decode_image(row["jpg_0"]).shape == (32, 32, 3)
    labels = np.array(train["label_0"])
    assert set(labels) <= {0.0, 0.5, 1.0}
    np.testing.assert_allclose(labels + np.array(train["label_1"]), 1.0)
    # also loadable as plain parquet and through save_to_disk / load_from_disk
    pq = datasets.Dataset.from_parquet(str(tiny_world / "preference" / "test.parquet"))
    assert pq.num_rows == ds["test"].num_rows


def test_preference_data_roundtrips_through_load_from_disk(tiny_world, tmp_path):
    import datasets

    ds = datasets.load_dataset(str(tiny_world / "preference"))
    ds.save_to_disk(str(tmp_path / "disk"))
    again = datasets.load_from_disk(str(tmp_path / "disk"))
    assert again["train"]["caption"] == ds["train"]["caption"]


def test_held_out_compositions_never_appear_in_training_prompts(tiny_world):
    import datasets

    splits = prompts.split_prompts(0)
    assert not set(splits["test"]) & (set(splits["train"]) | set(splits["validation"]))
    ds = datasets.load_dataset(str(tiny_world / "preference"))
    for split in ("train", "validation"):
        for caption in ds[split]["caption"]:
            assert not prompts.is_held_out(scenes.parse_caption(caption)), caption
    for caption in ds["test"]["caption"]:
        assert prompts.is_held_out(scenes.parse_caption(caption))


def test_stored_utilities_are_the_utility_of_the_stored_jpegs(tiny_world):
    import datasets

    from spo.world.utility import utility

    row = datasets.load_dataset(str(tiny_world / "preference"))["validation"][0]
    assert row["utility_0"] == pytest.approx(utility(decode_image(row["jpg_0"]), row["caption"]))


def test_world_clip_and_pickscore_load_as_stock_clip_models(tiny_world):
    from transformers import CLIPModel, CLIPProcessor

    for name in ("clip", "pickscore"):
        model = CLIPModel.from_pretrained(tiny_world / name)
        processor = CLIPProcessor.from_pretrained(tiny_world / name)
        inputs = processor(text=["a red circle"], images=[np.zeros((32, 32, 3), np.uint8)], return_tensors="pt",
                           padding="max_length")
        with torch.no_grad():
            out = model(**inputs)
        assert out.logits_per_image.shape == (1, 1)


def test_a_second_build_reuses_completed_stages(tiny_world):
    from spo.world.build import BuildConfig, build

    before = json.loads((tiny_world / "timings.json").read_text())
    messages = []
    build(tiny_world, BuildConfig.tiny_config(), log=messages.append)
    after = json.loads((tiny_world / "timings.json").read_text())
    assert all("already built" in m for m in messages)
    assert {k: after[k] for k in ("clip", "sd", "preference")} == {k: before[k] for k in ("clip", "sd", "preference")}
