"""Scorers: each real scorer's loading and scoring path on tiny random weights of the same format,
checked against an independent computation from the same weights; the world judges against the
world's own code; and one-line errors for missing or wrong weights."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from spo.errors import SPOError
from spo.scorers import (
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    OPENAI_MEAN,
    OPENAI_STD,
    available_scorers,
    clip_pixels,
    load_scorer,
)

PROMPTS = ["a red circle", "a large blue square on the left", "a purple triangle above a green diamond"]


def _images(n=3, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, size, size, 3)) / 255).astype(np.float32)


def _normalise(images, mean, std):
    """What a CLIP processor does to an image already at the model's size: rescale, then normalise."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _processor_config(directory, size, mean=OPENAI_MEAN, std=OPENAI_STD):
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "crop_size": {"height": size, "width": size},
        "size": {"shortest_edge": size}, "image_mean": list(mean), "image_std": list(std), "resample": 3,
        "do_resize": True, "do_center_crop": True, "do_rescale": True, "do_normalize": True}))


def _clip_config(tokenizer, projection=40):
    from transformers import CLIPConfig

    text = dict(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=24, hidden_act="gelu",
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8, hidden_act="gelu")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection, logit_scale_init_value=3.0)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random transformers CLIPModel with tokenizer and processor config: PickScore_v1's layout."""
    from transformers import CLIPModel

    from spo.world.tokenizer import write_tokenizer

    d = tmp_path_factory.mktemp("clip")
    tokenizer = write_tokenizer(d)
    torch.manual_seed(0)
    CLIPModel(_clip_config(tokenizer)).save_pretrained(d)
    _processor_config(d, 32)
    return d


def _reference_clip(clip_dir, images, prompts):
    """(cos, logit scale, normalised image embeddings) from transformers' own CLIPModel forward."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    ids = AutoTokenizer.from_pretrained(clip_dir)(prompts, padding="max_length", max_length=24,
                                                  return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=_normalise(images, OPENAI_MEAN, OPENAI_STD))
        scale = model.logit_scale.exp()
    return out.logits_per_image.diag() / scale, scale, out.image_embeds


def test_registry_lists_every_scorer_and_rejects_unknown_names():
    assert available_scorers() == ["world-utility", "world-utility-logit", "world-pickscore", "pickscore",
                                   "clipscore", "aesthetic", "hpsv2", "imagereward"]
    with pytest.raises(SPOError, match="unknown scorer 'pickscor'.*world-utility"):
        load_scorer("pickscor")


def test_pickscore_and_clipscore_match_the_clip_forward(clip_dir):
    images = _images()
    cos, scale, _ = _reference_clip(clip_dir, images, PROMPTS)
    pick = load_scorer(f"pickscore={clip_dir}", device="cpu").score(images, PROMPTS)
    clip = load_scorer(f"clipscore={clip_dir}", device="cpu").score(images, PROMPTS)
    assert pick.shape == clip.shape == (3,) and np.isfinite(pick).all()
    np.testing.assert_allclose(pick, (scale * cos).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(clip, (100 * cos.clamp(min=0)).numpy(), rtol=1e-5, atol=1e-4)
    assert np.ptp(pick) > 0  # different prompts and images do get different scores


def test_images_of_another_size_are_resized_like_the_clip_processor():
    big = _images(2, size=64, seed=1)[:, :, :48]  # 64 x 48: shortest side 48 -> 32, then a centre crop
    pixels = clip_pixels(big, 32, OPENAI_MEAN, OPENAI_STD)
    assert pixels.shape == (2, 3, 32, 32)
    for img, got in zip(big, pixels):
        pil = Image.fromarray((img * 255).round().astype(np.uint8)).resize((32, 43), Image.BICUBIC)
        arr = np.asarray(pil, np.float32)[5:37] / 255  # (43 - 32) // 2 = 5 rows off the top
        expected = _normalise(arr[None], OPENAI_MEAN, OPENAI_STD)[0]
        assert (got - expected).abs().mean() < 0.03  # PIL and torch bicubic differ only slightly


def test_aesthetic_is_the_mlp_on_normalised_clip_image_embeddings(clip_dir, tmp_path):
    torch.manual_seed(1)
    # The original's layout: dropout between the first linear layers, so the linear ones are 0, 2, 4, 6, 7.
    mlp = nn.Sequential(nn.Linear(40, 32), nn.Dropout(0.2), nn.Linear(32, 16), nn.Dropout(0.2), nn.Linear(16, 8),
                        nn.Dropout(0.1), nn.Linear(8, 4), nn.Linear(4, 1)).eval()
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    images = _images()
    _, _, embeds = _reference_clip(clip_dir, images, PROMPTS)
    scorer = load_scorer(f"aesthetic={tmp_path / 'sac+logos+ava1-l14-linearMSE.pth'}", device="cpu", clip=str(clip_dir))
    with torch.no_grad():
        expected = mlp(embeds).squeeze(-1).numpy()
    np.testing.assert_allclose(scorer.score(images, PROMPTS), expected, rtol=1e-5, atol=1e-6)
    # The prompt plays no part in an aesthetic score.
    np.testing.assert_allclose(scorer.score(images, ["x"] * 3), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ HPS v2: an open_clip checkpoint


def _random_open_clip_state(width_v=64, width_t=48, layers=2, vocab=0, context=24, patch=8, grid=4, embed=40):
    g = torch.Generator().manual_seed(2)
    r = lambda *shape, s=0.1: torch.randn(*shape, generator=g) * s  # noqa: E731
    state = {"visual.conv1.weight": r(width_v, 3, patch, patch), "visual.class_embedding": r(width_v),
             "visual.positional_embedding": r(grid * grid + 1, width_v), "visual.proj": r(width_v, embed),
             "token_embedding.weight": r(vocab, width_t), "positional_embedding": r(context, width_t),
             "text_projection": r(width_t, embed), "logit_scale": torch.tensor(2.5),
             "attn_mask": torch.full((context, context), float("-inf")).triu(1)}  # a buffer older checkpoints carry
    for ln in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        width = width_t if ln == "ln_final" else width_v
        state[f"{ln}.weight"], state[f"{ln}.bias"] = 1 + r(width), r(width)
    for prefix, width in (("visual.", width_v), ("", width_t)):
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            state.update({p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width),
                          p + "ln_2.weight": 1 + r(width), p + "ln_2.bias": r(width),
                          p + "attn.in_proj_weight": r(3 * width, width, s=0.3), p + "attn.in_proj_bias": r(3 * width),
                          p + "attn.out_proj.weight": r(width, width, s=0.3), p + "attn.out_proj.bias": r(width),
                          p + "mlp.c_fc.weight": r(4 * width, width, s=0.3), p + "mlp.c_fc.bias": r(4 * width),
                          p + "mlp.c_proj.weight": r(width, 4 * width, s=0.3), p + "mlp.c_proj.bias": r(width)})
    return state


def _ln(x, state, name, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)


def _open_clip_tower(x, state, prefix, layers, heads, mask=None):
    """open_clip's residual attention blocks, on torch's own nn.MultiheadAttention as open_clip runs them."""
    width = x.shape[-1]
    for i in range(layers):
        p = f"{prefix}transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict({"in_proj_weight": state[p + "attn.in_proj_weight"],
                              "in_proj_bias": state[p + "attn.in_proj_bias"],
                              "out_proj.weight": state[p + "attn.out_proj.weight"],
                              "out_proj.bias": state[p + "attn.out_proj.bias"]})
        h = _ln(x, state, p + "ln_1")
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.gelu(F.linear(_ln(x, state, p + "ln_2"), state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
    return x


def _open_clip_cosine(state, pixels, ids, heads=4, layers=2):
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=state["visual.conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + state["visual.positional_embedding"]
    x = _open_clip_tower(_ln(x, state, "visual.ln_pre"), state, "visual.", layers, heads)
    image = _ln(x[:, 0], state, "visual.ln_post") @ state["visual.proj"]
    t = state["token_embedding.weight"][ids] + state["positional_embedding"]
    t = _ln(_open_clip_tower(t, state, "", layers, heads, mask=state["attn_mask"]), state, "ln_final")
    text = t[torch.arange(len(ids)), ids.argmax(-1)] @ state["text_projection"]  # open_clip pools at the EOT id
    return F.cosine_similarity(image, text, dim=-1)


def test_hpsv2_loads_an_open_clip_checkpoint_and_scores_like_open_clip(tmp_path):
    from transformers import AutoTokenizer

    from spo.world.tokenizer import write_tokenizer

    base = tmp_path / "base"
    tokenizer = write_tokenizer(base)
    _clip_config(tokenizer).save_pretrained(base)
    _processor_config(base, 32)
    state = _random_open_clip_state(vocab=len(tokenizer))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "HPS_v2.1.pt")

    scorer = load_scorer(f"hpsv2={tmp_path / 'HPS_v2.1.pt'}", device="cpu", base=str(base))
    images = _images()
    got = scorer.score(images, PROMPTS)
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer(PROMPTS, padding="max_length", max_length=24, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = _open_clip_cosine(state, _normalise(images, OPENAI_MEAN, OPENAI_STD), ids)
    assert got.shape == (3,) and np.isfinite(got).all()
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_hpsv2_rejects_a_checkpoint_of_another_shape(tmp_path):
    from spo.world.tokenizer import write_tokenizer

    base = tmp_path / "base"
    tokenizer = write_tokenizer(base)
    _clip_config(tokenizer).save_pretrained(base)
    _processor_config(base, 32)
    torch.save({"state_dict": _random_open_clip_state(width_v=32, vocab=len(tokenizer))}, tmp_path / "other.pt")
    with pytest.raises(SPOError, match="does not fit"):
        load_scorer(f"hpsv2={tmp_path / 'other.pt'}", device="cpu", base=str(base))


# ------------------------------------------------------------------ ImageReward: a BLIP checkpoint

WORDS = ["a", "red", "blue", "green", "purple", "circle", "square", "triangle", "diamond", "large", "on", "the",
         "left", "above"]


def _bert_tokenizer(directory):
    from transformers import BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(directory)
    return directory


def _random_imagereward_state(vocab, width_v=128, width_t=128, layers=2, patch=8, grid=4, positions=40):
    g = torch.Generator().manual_seed(3)
    r = lambda *shape, s=0.1: torch.randn(*shape, generator=g) * s  # noqa: E731
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    # Small patch embeddings: the first layer norm then sees a variance near its eps, so a wrong eps shows.
    state = {v + "cls_token": r(1, 1, width_v, s=0.003), v + "pos_embed": r(1, grid * grid + 1, width_v, s=0.003),
             v + "patch_embed.proj.weight": r(width_v, 3, patch, patch, s=0.0003),
             v + "patch_embed.proj.bias": r(width_v, s=0.003),
             v + "norm.weight": 1 + r(width_v), v + "norm.bias": r(width_v),
             t + "embeddings.word_embeddings.weight": r(vocab, width_t),
             t + "embeddings.position_embeddings.weight": r(positions, width_t),
             t + "embeddings.LayerNorm.weight": 1 + r(width_t), t + "embeddings.LayerNorm.bias": r(width_t),
             t + "embeddings.position_ids": torch.arange(positions)[None],
             "blip.vision_proj.weight": r(8, width_v), "blip.text_proj.weight": r(8, width_t)}  # unused by ImageReward
    for i in range(layers):
        p = f"{v}blocks.{i}."
        state.update({p + "norm1.weight": 1 + r(width_v), p + "norm1.bias": r(width_v),
                      p + "norm2.weight": 1 + r(width_v), p + "norm2.bias": r(width_v),
                      p + "attn.qkv.weight": r(3 * width_v, width_v, s=0.2), p + "attn.qkv.bias": r(3 * width_v),
                      p + "attn.proj.weight": r(width_v, width_v, s=0.2), p + "attn.proj.bias": r(width_v),
                      p + "mlp.fc1.weight": r(4 * width_v, width_v, s=0.2), p + "mlp.fc1.bias": r(4 * width_v),
                      p + "mlp.fc2.weight": r(width_v, 4 * width_v, s=0.2), p + "mlp.fc2.bias": r(width_v)})
        p = f"{t}encoder.layer.{i}."
        for block, kv_width in (("attention", width_t), ("crossattention", width_v)):
            state.update({f"{p}{block}.self.query.weight": r(width_t, width_t, s=0.2),
                          f"{p}{block}.self.query.bias": r(width_t),
                          f"{p}{block}.self.key.weight": r(width_t, kv_width, s=0.2),
                          f"{p}{block}.self.key.bias": r(width_t),
                          f"{p}{block}.self.value.weight": r(width_t, kv_width, s=0.2),
                          f"{p}{block}.self.value.bias": r(width_t),
                          f"{p}{block}.output.dense.weight": r(width_t, width_t, s=0.2),
                          f"{p}{block}.output.dense.bias": r(width_t),
                          f"{p}{block}.output.LayerNorm.weight": 1 + r(width_t),
                          f"{p}{block}.output.LayerNorm.bias": r(width_t)})
        state.update({p + "intermediate.dense.weight": r(4 * width_t, width_t, s=0.2),
                      p + "intermediate.dense.bias": r(4 * width_t),
                      p + "output.dense.weight": r(width_t, 4 * width_t, s=0.2), p + "output.dense.bias": r(width_t),
                      p + "output.LayerNorm.weight": 1 + r(width_t), p + "output.LayerNorm.bias": r(width_t)})
    for i, (d_in, d_out) in zip((0, 2, 4, 6, 7), ((width_t, 32), (32, 16), (16, 8), (8, 4), (4, 1))):
        state[f"mlp.layers.{i}.weight"], state[f"mlp.layers.{i}.bias"] = r(d_out, d_in, s=0.5), r(d_out)
    return state


def _heads(x, n):
    return x.reshape(*x.shape[:2], n, -1).transpose(1, 2)


def _bert_attention(x, context, state, p, heads, mask=None):
    q = _heads(F.linear(x, state[p + "self.query.weight"], state[p + "self.query.bias"]), heads)
    k = _heads(F.linear(context, state[p + "self.key.weight"], state[p + "self.key.bias"]), heads)
    v = _heads(F.linear(context, state[p + "self.value.weight"], state[p + "self.value.bias"]), heads)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + (0 if mask is None else mask)
    out = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
    out = F.linear(out, state[p + "output.dense.weight"], state[p + "output.dense.bias"])
    return _ln(out + x, state, p + "output.LayerNorm", eps=1e-12)


def _imagereward_reference(state, pixels, ids, attention_mask, heads=2, layers=2):
    """BLIP's ViT (timm layout, fused qkv) and med.py's BERT with cross-attention, written out by hand."""
    s = {k.removeprefix("blip.visual_encoder."): w for k, w in state.items()}
    x = F.conv2d(pixels, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=8).flatten(2).transpose(1, 2)
    x = torch.cat([s["cls_token"].expand(len(x), -1, -1), x], 1) + s["pos_embed"]
    for i in range(layers):
        p = f"blocks.{i}."
        h = _ln(x, s, p + "norm1", eps=1e-6)
        qkv = F.linear(h, s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(*x.shape[:2], 3, heads, -1).permute(2, 0, 3, 1, 4)
        h = ((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1) @ v).transpose(1, 2).flatten(2)
        x = x + F.linear(h, s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
        h = F.gelu(F.linear(_ln(x, s, p + "norm2", eps=1e-6), s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"])
    image = _ln(x, s, "norm", eps=1e-6)

    s = {k.removeprefix("blip.text_encoder."): w for k, w in state.items()}
    t = s["embeddings.word_embeddings.weight"][ids] + s["embeddings.position_embeddings.weight"][: ids.shape[1]]
    t = _ln(t, s, "embeddings.LayerNorm", eps=1e-12)
    mask = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for i in range(layers):
        p = f"encoder.layer.{i}."
        t = _bert_attention(t, t, s, p + "attention.", heads, mask)
        t = _bert_attention(t, image, s, p + "crossattention.", heads)
        h = F.gelu(F.linear(t, s[p + "intermediate.dense.weight"], s[p + "intermediate.dense.bias"]))
        t = _ln(F.linear(h, s[p + "output.dense.weight"], s[p + "output.dense.bias"]) + t, s, p + "output.LayerNorm",
                eps=1e-12)
    h = t[:, 0]
    for i in (0, 2, 4, 6, 7):
        h = F.linear(h, state[f"mlp.layers.{i}.weight"], state[f"mlp.layers.{i}.bias"])
    return (h.squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def test_imagereward_loads_a_blip_checkpoint_and_scores_like_blip(tmp_path):
    from transformers import AutoTokenizer

    tok_dir = _bert_tokenizer(tmp_path / "bert")
    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    state = _random_imagereward_state(vocab)
    torch.save(state, tmp_path / "ImageReward.pt")

    scorer = load_scorer(f"imagereward={tmp_path / 'ImageReward.pt'}", device="cpu", tokenizer=str(tok_dir))
    images = _images()
    got = scorer.score(images, PROMPTS)
    text = AutoTokenizer.from_pretrained(tok_dir)(PROMPTS, padding="max_length", max_length=35, truncation=True,
                                                  return_tensors="pt")
    assert text.attention_mask.sum(1).max() < 35  # padding is really masked in this check
    with torch.no_grad():
        expected = _imagereward_reference(state, _normalise(images, OPENAI_MEAN, OPENAI_STD), text.input_ids,
                                          text.attention_mask)
    assert got.shape == (3,) and np.isfinite(got).all() and np.ptp(got) > 0
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_imagereward_rejects_other_checkpoints(tmp_path):
    mlp = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 1))
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, tmp_path / "aesthetic.pth")
    with pytest.raises(SPOError, match="not an ImageReward checkpoint"):
        load_scorer(f"imagereward={tmp_path / 'aesthetic.pth'}", device="cpu")


# ------------------------------------------------------------------ missing weights and packages


@pytest.mark.parametrize("name, filename, repo", [
    ("hpsv2", "HPS_v2.1_compressed.pt", "xswu/HPSv2"),
    ("imagereward", "ImageReward.pt", "THUDM/ImageReward"),
    ("aesthetic", "aesthetic-model.pth", "trl-lib/ddpo-aesthetic-predictor"),
])
def test_missing_checkpoint_says_what_to_download_and_where_to_point(name, filename, repo, tmp_path):
    with pytest.raises(SPOError) as err:
        load_scorer(f"{name}={tmp_path / 'missing.pt'}", device="cpu")
    message = str(err.value)
    assert "not found" in message and filename in message and repo in message and f"--scorer {name}=" in message
    assert "\n" not in message


def test_missing_hub_model_says_how_to_get_it(tmp_path):
    with pytest.raises(SPOError, match=r"could not load the pickscore model .*--scorer pickscore=/path/to/"):
        load_scorer(f"pickscore={tmp_path / 'no-such-model'}", device="cpu")


def test_missing_package_says_what_to_pip_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(SPOError, match=r'pip install "spo\[metrics\]"'):
        load_scorer("aesthetic", device="cpu")


# ------------------------------------------------------------------ the embedded world's judges


def test_world_pickscore_matches_the_world_build_code(tiny_world):
    from transformers import AutoTokenizer, CLIPModel

    from spo.world.common import clip_scores

    images = _images()
    scorer = load_scorer(f"world-pickscore={tiny_world / 'pickscore'}", device="cpu")
    clip = CLIPModel.from_pretrained(tiny_world / "pickscore").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_world / "pickscore")
    expected = clip_scores(clip, tokenizer, PROMPTS, torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1)
    np.testing.assert_allclose(scorer.score(images, PROMPTS), expected, rtol=1e-5, atol=1e-5)


def test_world_utility_is_the_ground_truth_and_refuses_other_images():
    from spo.world import scenes
    from spo.world.utility import utility

    rng = np.random.default_rng(0)
    clean = np.stack([scenes.render(scenes.layout(scenes.parse_caption(p), rng)) for p in PROMPTS]).astype(np.float32)
    images = np.concatenate([clean, _images(2, seed=5)])
    prompts = PROMPTS + PROMPTS[:2]
    scores = load_scorer("world-utility").score(images, prompts)
    np.testing.assert_allclose(scores, [utility(i, p) for i, p in zip(images, prompts)])
    assert scores[:3].min() > 0.9 and scores[3:].max() < 0.5  # clean renders on top, noise at the bottom
    with pytest.raises(SPOError, match="32x32"):
        load_scorer("world-utility").score(_images(1, size=48), PROMPTS[:1])
    with pytest.raises(SPOError, match="grammar"):
        load_scorer("world-utility").score(_images(1), ["a photo of a cat"])
