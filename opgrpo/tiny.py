"""Tiny, randomly initialised SD3 pipelines built from the real diffusers/transformers classes.

Nothing is downloaded: the tokenizers are built here from a character vocabulary, and every
model is constructed from a small config with a fixed seed. Tests and the first demo use these to
exercise the real-model code paths (loading by path, prompt encoding, VAE decode, LoRA) on CPU.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import pre_tokenizers

# Characters the T5 unigram vocabulary knows; anything else maps to <unk>.
_T5_CHARS = string.ascii_lowercase + string.digits + string.punctuation


def build_clip_tokenizer(model_max_length: int = 77):
    """A byte-level CLIP BPE tokenizer with no merges: every character is one token."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def build_t5_tokenizer(model_max_length: int = 77):
    """A unigram T5 tokenizer over single characters (and word-initial characters)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _T5_CHARS]
    pieces += [("\u2581" + c, -2.5) for c in _T5_CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def make_tiny_sd3_pipeline(
    seed: int = 0,
    sample_size: int = 32,
    with_vae: bool = True,
    with_t5: bool = True,
    shift: float = 3.0,
    sd35: bool = False,
):
    """Build a tiny random `StableDiffusion3Pipeline` (real classes, small configs).

    Args:
        seed: torch seed for the random weights (same seed, same weights).
        sample_size: image side in pixels.
        with_vae: an `AutoencoderKL` with one 2x downsampling (latents 4 x side/2 x side/2);
            without it the transformer works in pixel space (3 channels).
        with_t5: include `T5EncoderModel` as text_encoder_3 (SD3 also runs without it).
        shift: the flow-matching scheduler's timestep shift.
        sd35: SD3.5-Medium's block layout (MMDiT-X): a second self-attention in the first
            block and RMS-normalised queries and keys.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    torch.manual_seed(seed)
    clip_tokenizer = build_clip_tokenizer()
    clip_config = CLIPTextConfig(
        vocab_size=len(clip_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    text_encoder = CLIPTextModelWithProjection(clip_config)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config)
    t5_tokenizer = build_t5_tokenizer() if with_t5 else None
    joint_dim = 64  # >= the two CLIP hidden sizes concatenated (SD3 pads CLIP to the T5 width)
    text_encoder_3 = None
    if with_t5:
        text_encoder_3 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=joint_dim,
                d_kv=16,
                d_ff=64,
                num_layers=2,
                num_heads=2,
                relative_attention_num_buckets=8,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
            )
        )

    vae = None
    in_channels, latent_size = 3, sample_size
    if with_vae:
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=sample_size,
            scaling_factor=1.5,
            shift_factor=0.06,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        in_channels, latent_size = 4, sample_size // 2

    transformer = SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=2,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_dim,
        caption_projection_dim=32,
        pooled_projection_dim=2 * clip_config.projection_dim,
        pos_embed_max_size=latent_size // 2,
        **({"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if sd35 else {}),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )


def save_tiny_sd3(directory: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build a tiny SD3 pipeline and `save_pretrained` it (safetensors) into `directory`."""
    directory = Path(directory)
    pipeline = make_tiny_sd3_pipeline(seed=seed, **kwargs)
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


def make_tiny_flux_pipeline(seed: int = 0, sample_size: int = 32, guidance_embeds: bool = True):
    """A tiny random `FluxPipeline`: CLIP + T5 text encoders, an `AutoencoderKL` with one 2x
    downsampling (latents 4 x side/2 x side/2, packed 2x2 into 16-wide tokens), a
    `FluxTransformer2DModel` with a guidance embedding (as FLUX.1-dev) and the dynamic-shift
    flow-matching scheduler."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5_tokenizer = build_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=sample_size, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer, transformer=transformer)


def make_tiny_wan_pipeline(seed: int = 0):
    """A tiny random `WanPipeline`: a UMT5 text encoder, an `AutoencoderKLWan` that compresses
    time and space 2x (so 5 frames -> 3 latent frames), a `WanTransformer3DModel` and the
    UniPC scheduler with flow sigmas, as Wan2.1 ships."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer(model_max_length=226)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1))
    z_dim = 4
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[True], latents_mean=[0.1, -0.2, 0.05, 0.0],
        latents_std=[1.5, 2.0, 1.2, 1.8], scale_factor_temporal=2, scale_factor_spatial=2)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=z_dim,
        out_channels=z_dim, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2,
        rope_max_seq_len=32)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
        num_train_timesteps=1000)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       transformer=transformer, scheduler=scheduler)


def make_tiny_sd35_pipeline(seed: int = 0):
    """A tiny random SD3.5-Medium-style pipeline (MMDiT-X blocks, RMS q/k norm)."""
    return make_tiny_sd3_pipeline(seed=seed, sd35=True)


TINY_BUILDERS = {"sd3": make_tiny_sd3_pipeline, "sd35": make_tiny_sd35_pipeline,
                 "flux": make_tiny_flux_pipeline, "wan": make_tiny_wan_pipeline}


def save_tiny(family: str, directory: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build a tiny pipeline of `family` (sd3, sd35, flux, wan) and save it (safetensors)."""
    if family not in TINY_BUILDERS:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(TINY_BUILDERS)}")
    directory = Path(directory)
    TINY_BUILDERS[family](seed=seed, **kwargs).save_pretrained(directory,
                                                               safe_serialization=True)
    return directory


def save_tiny_clip(directory: str | Path, seed: int = 0) -> Path:
    """A tiny random `CLIPModel` with its `CLIPProcessor` (32 px images), saved by path: the
    model classes of the PickScore and aesthetic rewards."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    config = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, max_position_embeddings=77,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=1).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32,
                                       patch_size=8).to_dict(),
        projection_dim=16)
    directory = Path(directory)
    CLIPModel(config).save_pretrained(directory, safe_serialization=True)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(directory)
    return directory
