"""Loading the step-aware preference models released with the paper (RockeyCoss/SPO).

A tiny random CLIP stands in for PickScore_v1; a state dict in the authors' key layout (their
`StepAwarePreferenceModel` wrapper around `HFTimeConditionedCLIPModel`, saved whole) is written
next to it, loaded through `load_scorer_model`, and compared with `their_scores`, a small
re-implementation of their forward (`get_preference_score`) that reads their keys directly.
"""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from spo.errors import SPOError
from spo.preference.judges import load_scorer_model
from spo.preference.spm import StepAwareCLIP

HIDDEN, LAYERS, PROJ, FREQ, SIZE = 32, 2, 24, 256, 32
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
CKPT_NAME = "sd-v1-5_step-aware_preference_model.bin"
CAPTIONS = ["a red circle", "a blue square above a yellow triangle", "", "a photo", "a small green diamond"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random CLIPModel + tokenizer + image processor: the role of yuvalkirstain/PickScore_v1."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from spo.world.tokenizer import write_tokenizer

    d = tmp_path_factory.mktemp("pickscore")
    tok = write_tokenizer(d)
    text = dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=4, max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(image_size=SIZE, patch_size=8, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                  num_hidden_layers=LAYERS, num_attention_heads=4)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJ)).save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                       image_mean=list(MEAN), image_std=list(STD)).save_pretrained(d)
    return d


def _authors_state_dict(base_dir, seed=1, legacy_buffers=True):
    """What their training writes: the whole fine-tuned model under `model.`, fp32."""
    from transformers import CLIPModel

    g = torch.Generator().manual_seed(seed)
    clip = CLIPModel.from_pretrained(base_dir)
    state = {}
    for k, v in clip.state_dict().items():  # fine-tuned: every CLIP weight moved away from the base
        state[f"model.{k}"] = v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
    if legacy_buffers:  # transformers < 4.31 saved these buffers; zero_to_fp32 keeps them
        state["model.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        state["model.vision_model.embeddings.position_ids"] = torch.arange((SIZE // 8) ** 2 + 1)[None]
    rnd = lambda *shape, s=0.1: s * torch.randn(*shape, generator=g)  # noqa: E731
    state["model.t_embedder.mlp.0.weight"], state["model.t_embedder.mlp.0.bias"] = rnd(HIDDEN, FREQ, s=0.3), rnd(HIDDEN)
    state["model.t_embedder.mlp.2.weight"], state["model.t_embedder.mlp.2.bias"] = rnd(HIDDEN, HIDDEN, s=0.3), rnd(HIDDEN)
    for i in range(LAYERS):
        bias = rnd(6 * HIDDEN)
        bias[2 * HIDDEN : 3 * HIDDEN] += 1  # their gates start at 1
        bias[5 * HIDDEN :] += 1
        state[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.weight"] = rnd(6 * HIDDEN, HIDDEN)
        state[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.bias"] = bias
    state["model.vision_model.adaLN_modulation.1.weight"] = rnd(2 * HIDDEN, HIDDEN)
    state["model.vision_model.adaLN_modulation.1.bias"] = rnd(2 * HIDDEN)
    return state


@pytest.fixture(scope="module")
def authors(base_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("model_ckpts")
    state = _authors_state_dict(base_dir)
    torch.save(state, d / CKPT_NAME)
    return d / CKPT_NAME, state


# ------------------------------------------------------------------ their forward, from their code


def _their_preprocess(images, size):
    """get_preference_score: bicubic (no antialias) to shortest side, crop if not square, [0, 1], normalise."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new = (int(h * scale + 0.5), int(w * scale + 0.5))
    x = F.interpolate(images, size=new, mode="bicubic", align_corners=False)
    if new[0] != new[1]:  # torchvision CenterCrop
        top, left = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
        x = x[..., top : top + size, left : left + size]
    x = (x / 2 + 0.5).clamp(0, 1).float()
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def their_scores(state, base_dir, images, input_ids, timesteps):
    """HFTimeConditionedCLIPModel.get_image_features / get_text_features and the logit-scaled cosine."""
    from transformers import CLIPModel

    w = lambda name: state["model." + name]  # noqa: E731
    clip = CLIPModel.from_pretrained(base_dir).eval()
    plain = {k[len("model."):]: v for k, v in state.items()
             if "adaLN" not in k and "t_embedder" not in k and not k.endswith("position_ids")}
    clip.load_state_dict(plain)

    half = FREQ // 2  # TimestepEmbedder: [cos, sin] of t * 10000^(-i/half), then Linear-SiLU-Linear
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps.float()[:, None] * freqs[None]
    c = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = F.linear(F.silu(F.linear(c, w("t_embedder.mlp.0.weight"), w("t_embedder.mlp.0.bias"))),
                 w("t_embedder.mlp.2.weight"), w("t_embedder.mlp.2.bias"))

    vm = clip.vision_model
    x = vm.pre_layrnorm(vm.embeddings(_their_preprocess(images, SIZE)))
    for i, layer in enumerate(vm.encoder.layers):
        p = f"vision_model.encoder.layers.{i}.adaLN_modulation.1."
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            F.linear(F.silu(c), w(p + "weight"), w(p + "bias")).chunk(6, dim=1))
        h = layer.layer_norm1(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        h = layer.self_attn(hidden_states=h, attention_mask=None)[0]
        x = x + h * gate_msa[:, None]
        h = layer.layer_norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + layer.mlp(h) * gate_mlp[:, None]
    pooled = vm.post_layernorm(x[:, 0, :])
    shift, scale = F.linear(F.silu(c), w("vision_model.adaLN_modulation.1.weight"),
                            w("vision_model.adaLN_modulation.1.bias")).chunk(2, dim=1)
    image = clip.visual_projection(pooled * (1 + scale) + shift)
    text = clip.text_projection(clip.text_model(input_ids=input_ids).pooler_output)
    image = image / torch.norm(image, dim=-1, keepdim=True)
    text = text / torch.norm(text, dim=-1, keepdim=True)
    return clip.logit_scale.exp() * (image * text).sum(dim=-1)


# ------------------------------------------------------------------ the loader gives their outputs


@pytest.mark.parametrize("shape", [(SIZE, SIZE), (48, 40), (64, 96)])
def test_authors_checkpoint_scores_like_their_forward(base_dir, authors, shape):
    file, state = authors
    spm = load_scorer_model(f"authors:{file}", base=base_dir)
    assert isinstance(spm, StepAwareCLIP) and spm.config.preprocessing == "authors"
    g = torch.Generator().manual_seed(2)
    images = torch.rand(5, 3, *shape, generator=g) * 2.4 - 1.2  # x0-predictions overshoot [-1, 1]
    ids = spm.tokenize(CAPTIONS)
    with torch.no_grad():
        per_t = []
        for t in (0, 1, 250, 501, 999):
            ts = torch.full((5,), t)
            ours = spm(images, CAPTIONS, ts)
            torch.testing.assert_close(ours, their_scores(state, base_dir, images, ids, ts), rtol=1e-5, atol=1e-5)
            per_t.append(ours)
        mixed = torch.tensor([0, 10, 500, 900, 999])
        torch.testing.assert_close(spm(images, CAPTIONS, mixed), their_scores(state, base_dir, images, ids, mixed),
                                   rtol=1e-5, atol=1e-5)
    assert not torch.allclose(per_t[0], per_t[-1], atol=1e-3)  # the conditioning is really exercised


def test_weights_come_from_the_checkpoint_not_the_base(base_dir, authors):
    from transformers import CLIPModel

    file, state = authors
    spm = load_scorer_model(f"authors:{file}", base=base_dir)
    base = CLIPModel.from_pretrained(base_dir)
    assert torch.equal(spm.clip.visual_projection.weight, state["model.visual_projection.weight"])
    assert torch.equal(spm.clip.text_model.final_layer_norm.weight, state["model.text_model.final_layer_norm.weight"])
    assert not torch.equal(spm.clip.visual_projection.weight, base.visual_projection.weight)
    gate = spm.conditioning.blocks[0][1].bias[2 * HIDDEN : 3 * HIDDEN]  # ours = theirs - 1
    theirs = state["model.vision_model.encoder.layers.0.adaLN_modulation.1.bias"][2 * HIDDEN : 3 * HIDDEN]
    torch.testing.assert_close(gate + 1, theirs)


def test_the_three_spellings_load_the_same_model(base_dir, authors, tmp_path):
    file, _ = authors
    layout = tmp_path / "authors_spm"  # directory convention: the checkpoint plus base/
    layout.mkdir()
    shutil.copy(file, layout / CKPT_NAME)
    shutil.copytree(base_dir, layout / "base")
    models = [load_scorer_model(f"authors:{file}", base=base_dir), load_scorer_model(file, base=str(base_dir)),
              load_scorer_model(layout), load_scorer_model(f"authors:{layout}")]
    assert models[2].config.base_model == str(layout / "base") and models[2].config.processor == str(layout / "base")
    images = torch.rand(3, 3, 40, 40) * 2 - 1
    t = torch.tensor([0, 400, 999])
    with torch.no_grad():
        first = models[0](images, CAPTIONS[:3], t)
        for m in models[1:]:
            torch.testing.assert_close(m(images, CAPTIONS[:3], t), first, rtol=0, atol=0)


def test_converted_model_saves_in_our_format_and_reloads(base_dir, authors, tmp_path):
    file, _ = authors
    spm = load_scorer_model(f"authors:{file}", base=base_dir)
    spm.save_pretrained(tmp_path / "converted")
    assert json.loads((tmp_path / "converted" / "spm_config.json").read_text())["preprocessing"] == "authors"
    again = load_scorer_model(tmp_path / "converted").eval()
    assert again.config == spm.config
    images, t = torch.rand(2, 3, 48, 40) * 2 - 1, torch.tensor([0, 700])
    with torch.no_grad():
        torch.testing.assert_close(again(images, CAPTIONS[:2], t), spm(images, CAPTIONS[:2], t), rtol=0, atol=0)


def test_our_own_models_keep_their_saved_format(base_dir, tmp_path):
    from spo.plugins import resolve

    StepAwareCLIP.from_base(base_dir).save_pretrained(tmp_path / "ours")
    assert "preprocessing" not in json.loads((tmp_path / "ours" / "spm_config.json").read_text())
    assert load_scorer_model(tmp_path / "ours").config.preprocessing == "spo"
    assert load_scorer_model(resolve("world:spm")).config.preprocessing == "spo"
    assert load_scorer_model(base_dir).conditioning is None  # a plain CLIP dir is still the naive scorer


# ------------------------------------------------------------------ errors say what is wrong, on one line


def _one_line_error(match, *args, **kwargs):
    with pytest.raises(SPOError, match=match) as info:
        load_scorer_model(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_missing_or_unreadable_checkpoint_is_an_spo_error(base_dir, tmp_path):
    _one_line_error("no such file or directory", f"authors:{tmp_path / 'nope.bin'}", base=base_dir)
    _one_line_error("needs a path", "authors:")
    (tmp_path / "garbage.bin").write_text("this is not a checkpoint")
    _one_line_error("not a readable PyTorch state dict", f"authors:{tmp_path / 'garbage.bin'}", base=base_dir)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    _one_line_error("does not hold a state dict", tmp_path / "list.pt", base=base_dir)
    (tmp_path / "empty").mkdir()
    _one_line_error("holds no authors' SPM checkpoint", f"authors:{tmp_path / 'empty'}", base=base_dir)


def test_wrong_state_dicts_are_spo_errors(base_dir, tmp_path):
    from transformers import CLIPModel

    torch.save(CLIPModel.from_pretrained(base_dir).state_dict(), tmp_path / "plain.bin")
    _one_line_error("no timestep embedder", tmp_path / "plain.bin", base=base_dir)

    state = _authors_state_dict(base_dir, legacy_buffers=False)
    del state["model.text_projection.weight"]
    torch.save(state, tmp_path / "partial.bin")
    _one_line_error("does not fit the CLIP .*missing text_projection.weight", tmp_path / "partial.bin", base=base_dir)

    state = _authors_state_dict(base_dir)
    state[f"model.vision_model.encoder.layers.{LAYERS}.adaLN_modulation.1.weight"] = torch.zeros(6 * HIDDEN, HIDDEN)
    torch.save(state, tmp_path / "deeper.bin")
    _one_line_error("time conditioning does not fit", tmp_path / "deeper.bin", base=base_dir)


def test_missing_base_is_an_spo_error(authors, tmp_path, base_dir):
    file, _ = authors
    _one_line_error("could not read the CLIP config .* base/", f"authors:{file}", base=tmp_path / "no_base")
    _one_line_error("base/processor do not apply", base_dir, base=base_dir)


def test_authors_prefix_on_a_clip_directory_is_an_spo_error(base_dir):
    _one_line_error("not an authors' SPM checkpoint", f"authors:{base_dir}")
