"""Tiny, randomly initialized diffusers folders for tests (written with ``save_pretrained``, offline).

Shared by tests/test_diffusers.py and the config-option test of tests/test_training.py; needs the
``diffusers`` extra (callers skip without it).
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
import transformers

#: data shape of the tiny UNet2DModels
SHAPE = (3, 8, 8)
#: the noise table they are saved with (a DDPM linear table)
TABLE = {"beta_schedule": "linear", "num_train_timesteps": 1000}
DDPM = {**TABLE, "clip_sample": False}


def tiny_unet(**kwargs: object) -> diffusers.UNet2DModel:
    """A two-level UNet2DModel without attention (``num_class_embeds`` etc. through ``kwargs``)."""
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=SHAPE[1],
        in_channels=SHAPE[0],
        out_channels=SHAPE[0],
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        **kwargs,
    )


def save_unet_pipeline(root: Path, unet: torch.nn.Module | None = None, **scheduler: object) -> Path:
    """A pipeline-layout folder: unet/ and scheduler/ (a DDPMScheduler config)."""
    (unet if unet is not None else tiny_unet()).save_pretrained(root / "unet")
    diffusers.DDPMScheduler(**{**DDPM, **scheduler}).save_pretrained(root / "scheduler")
    return root


def write_tokenizer(folder: Path) -> transformers.CLIPTokenizer:
    """A CLIP BPE tokenizer over single letters (no merges): enough to tell prompts apart offline."""
    folder.mkdir(parents=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(letter + "</w>" for letter in letters)]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8
    )


def tiny_text_encoder(vocab_size: int) -> transformers.CLIPTextModel:
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return transformers.CLIPTextModel(config)


def save_text_to_image(root: Path) -> Path:
    """A Stable-Diffusion-style folder: CLIP text encoder + tokenizer, VAE (factor 2), conditional UNet
    on 8x8 latents (16x16 images) and SD 1.5's scheduler config."""
    tokenizer = write_tokenizer(root / "tokenizer_source")
    tokenizer.save_pretrained(root / "tokenizer")
    tiny_text_encoder(len(tokenizer)).save_pretrained(root / "text_encoder")
    diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    ).save_pretrained(root / "unet")
    diffusers.AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(root / "vae")
    diffusers.PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    ).save_pretrained(root / "scheduler")
    return root
