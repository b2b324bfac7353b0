"""The world's models: the classes of Stable Diffusion 1.5, Stable Diffusion 3 and PickScore, at toy size.

Everything is a stock `diffusers`/`transformers` class built from a config, so that saving and
loading them is exactly the code path of `runwayml/stable-diffusion-v1-5` and
`yuvalkirstain/PickScore_v1`. `tiny=True` gives even smaller versions for tests.
"""

from __future__ import annotations

from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       UNet2DConditionModel)
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from spo.world.scenes import IMAGE_SIZE
from spo.world.tokenizer import MAX_LENGTH

TEXT_DIM = 64


def clip_model(tokenizer: CLIPTokenizer, tiny: bool = False) -> CLIPModel:
    width, layers = (32, 1) if tiny else (TEXT_DIM, 3)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=width,
    )
    vision = dict(
        image_size=IMAGE_SIZE, patch_size=4, num_channels=3, hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=layers, num_attention_heads=4, projection_dim=width,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=width))


def clip_image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )


def vae(tiny: bool = False) -> AutoencoderKL:
    channels = (8, 16) if tiny else (32, 64)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=IMAGE_SIZE,
    )


def unet(cross_attention_dim: int, tiny: bool = False) -> UNet2DConditionModel:
    channels = (16, 32, 32) if tiny else (32, 64, 128)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=channels,
        layers_per_block=1, norm_num_groups=8 if tiny else 16, cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        # Attention only at 8x8 and 4x4: at 16x16 it costs most of the CPU time for little gain.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )


def scheduler() -> DDIMScheduler:
    """Stable Diffusion 1.5's scheduler configuration."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


# The flow world's T5 slot: SD3 without T5 feeds the transformer this many zero tokens after the CLIP tokens
# (the pipeline's max_sequence_length, 256 by default). Eight keep the joint attention short on a CPU; the
# checkpoint declares it (spo_pipeline.json) so that spo and stock calls use the same length.
FLOW_T5_TOKENS = 8


def flow_transformer(text_dim: int, tiny: bool = False) -> SD3Transformer2DModel:
    """SD3's MMDiT at toy size on the SD world's 4-channel 16x16 latents (2x2 patches: 64 image tokens).

    Both CLIP slots hold the world's text tower, so the joint (token) width is 2 * text_dim and the pooled
    projection is the two pooled embeddings side by side, as in SD3.
    """
    heads, head_dim, layers = (2, 8, 2) if tiny else (4, 32, 4)  # 2: the last block has no text output (to_add_out)
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=2 * text_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=2 * text_dim, pos_embed_max_size=IMAGE_SIZE // 4,
    )


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """No timestep shift: SD3 shifts by 3 for 1024 px images; at 32 px the plain schedule is the natural one."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
