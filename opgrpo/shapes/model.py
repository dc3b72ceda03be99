"""Components of the shapes base model, all of the real SD3 pipeline classes.

- two `CLIPTextModelWithProjection` text encoders with a word-level CLIP BPE tokenizer trained
  here on the grammar's prompts (16 tokens per prompt); no T5 (SD3 runs without it);
- an `AutoencoderKL` that maps 32 x 32 x 3 images to 8 x 8 x 8 latents;
- an `SD3Transformer2DModel` on those latents with patch size 1 (64 image tokens).

Why a latent model: a pixel-space model this small, trained for minutes, leaves speckle on flat
shapes; a VAE decoder trained only on clean shapes maps slightly-off latents back to clean
images, and 8 x 8 latents give 64 tokens, which the CPU speed budget of RL can afford.
"""

from __future__ import annotations

import json

from opgrpo.shapes.grammar import all_prompts

TEXT_TOKENS = 16
CLIP_HIDDEN = 64
CLIP_PROJECTION = 32
JOINT_DIM = 2 * CLIP_HIDDEN  # SD3 concatenates the two CLIP encoders' hidden states
LATENT_CHANNELS = 8


def build_word_tokenizer():
    """A CLIP BPE tokenizer whose merges spell every grammar word as one token."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    backend = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    # the same normalisation and pre-tokenisation as CLIPTokenizer, so the merges transfer
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(
            Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                  r"""[\p{N}]|[^\s\p{L}\p{N}]+"""),
            behavior="removed", invert=True,
        ),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([row["prompt"] for row in all_prompts()], trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    return CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=TEXT_TOKENS)


def build_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=2 * CLIP_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=TEXT_TOKENS,
        projection_dim=CLIP_PROJECTION,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    ))


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=32,
    )


def build_transformer(num_layers: int = 6, heads: int = 4, head_dim: int = 32):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=JOINT_DIM,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=2 * CLIP_PROJECTION,
        pos_embed_max_size=8,
    )


def assemble_pipeline(tokenizer, text_encoder, text_encoder_2, vae, transformer, shift: float):
    """An SD3 pipeline of the shapes components (no T5: SD3 runs without text_encoder_3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def build_untrained_pipeline(seed: int = 0, shift: float = 1.5, **transformer_kwargs):
    """All components freshly initialised from `seed` (the start of pretraining)."""
    import torch

    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer()
    return assemble_pipeline(
        tokenizer,
        build_text_encoder(len(tokenizer)),
        build_text_encoder(len(tokenizer)),
        build_vae(),
        build_transformer(**transformer_kwargs),
        shift,
    )
