"""SD3 / SD3.5 (`StableDiffusion3Pipeline`, `SD3Transformer2DModel`).

Conditioning: CLIP-L + CLIP-G (+ T5-XXL when present) token embeddings and the two CLIPs'
pooled embeddings. Latents (C, h, w) go to the transformer as they are; the timestep is
sigma x num_train_timesteps. Tiny pipelines may leave out the VAE (pixel space) or T5.
"""

from __future__ import annotations

import torch

from opgrpo.models import FlowPolicy, PromptEmbeds


class SD3Policy(FlowPolicy):
    pipeline_class = "StableDiffusion3Pipeline"
    optional_components = ("vae", "text_encoder_3", "tokenizer_3")
    frozen_names = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
    default_max_sequence_length = 128  # T5 tokens, as Flow-GRPO (diffusers' default is 256)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents for an image of height x width pixels."""
        factor = self.vae_scale_factor
        self._check_size(height, width, factor * self.transformer.config.patch_size)
        return (self.transformer.config.in_channels, height // factor, width // factor)

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def _forward(self, latents: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds,
                 guidance: float | None = None) -> torch.Tensor:
        return self._call_transformer(
            latents, sigma, embeds, pooled_projections=embeds.pooled.to(self.device, self.dtype))
