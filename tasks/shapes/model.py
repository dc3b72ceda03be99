"""Components of the shapes base model, all of the real SD3 pipeline classes.

- two `CLIPTextModelWithProjection` text encoders with a word-level tokenizer built from the
  grammar's words (16 tokens per prompt); no T5 (SD3 runs without it);
- an `AutoencoderKL` that maps 32 x 32 x 3 images to 8 x 8 x 8 latents;
- an `SD3Transformer2DModel` on those latents with patch size 1 (64 image tokens).

Why a latent model: a pixel-space model this small, trained for minutes, leaves speckle on flat
shapes; a VAE decoder trained only on clean shapes maps slightly-off latents back to clean
images, and 8 x 8 latents give 64 tokens, which the CPU speed budget of RL can afford.
"""

from __future__ import annotations

from tasks.shapes.grammar import vocabulary

TEXT_TOKENS = 16
CLIP_HIDDEN = 64
CLIP_PROJECTION = 32
JOINT_DIM = 2 * CLIP_HIDDEN  # SD3 concatenates the two CLIP encoders' hidden states
LATENT_CHANNELS = 8
BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<unk>"


def build_word_tokenizer():
    """A word-level tokenizer over the grammar's words: one token per word, 16 per prompt.

    Built by construction (sorted vocabulary), so every build is identical; a trained BPE
    assigns ids in an order that varies between runs. CLIP's conventions are kept: a start
    token, an end token that also pads, lower-casing.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, UNK]
    vocab = {token: index for index, token in enumerate(specials + vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS,
        model_max_length=TEXT_TOKENS,
    )


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
