"""FLUX.1 (`FluxPipeline`, `FluxTransformer2DModel`).

Differences from SD3 that this adapter hides from the rest of the service:
- **Packed latents.** The transformer takes 2x2 patches of the (C, h, w) latents as tokens,
  (h/2 * w/2, 4C), with position ids per token. The policy keeps latents unpacked and packs
  them around each forward, so trajectories, the SDE math and the buffer see (C, h, w).
- **Guidance embedding.** FLUX.1-dev is guidance-distilled: the guidance scale is an input of
  the transformer (`guidance_embeds` in its config) and no unconditional pass runs. Without a
  guidance embedding (FLUX.1-schnell) CFG works as for SD3.
- **Resolution-dependent shift.** The scheduler shifts sigmas by mu(image tokens)
  (`use_dynamic_shifting`), so the sigma grid depends on the image size.
- **Conditioning:** T5 token embeddings and the CLIP pooled embedding; text position ids are
  zeros. The timestep is sigma itself (the pipeline divides by 1000).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from opgrpo.models import FlowPolicy, PromptEmbeds


class FluxPolicy(FlowPolicy):
    pipeline_class = "FluxPipeline"
    optional_components = ("image_encoder", "feature_extractor")
    frozen_names = ("text_encoder", "text_encoder_2", "vae")
    default_max_sequence_length = 512

    @property
    def guidance_embedded(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    @property
    def default_image_size(self) -> int:
        return int(self.vae.config.sample_size)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        factor = self.vae_scale_factor
        self._check_size(height, width, factor * 2)  # 2x2 packing
        return (self.transformer.config.in_channels // 4, height // factor, width // factor)

    def _sigma_grid(self, num_steps: int, height: int | None,
                    width: int | None) -> torch.Tensor:
        """FluxPipeline's grid: linspace(1, 1/T, T) shifted by mu(image tokens), then 0."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scheduler = copy.deepcopy(self.scheduler)
        config = scheduler.config
        base = np.linspace(1.0, 1.0 / num_steps, num_steps)
        if not config.get("use_dynamic_shifting", False):
            scheduler.set_timesteps(sigmas=base)
            return scheduler.sigmas.to(torch.float32).clone()
        if height is None or width is None:
            height = width = self.default_image_size
        _, h, w = self.latent_shape(height, width)
        mu = calculate_shift((h // 2) * (w // 2), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=base, mu=mu)
        return scheduler.sigmas.to(torch.float32).clone()

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def _forward(self, latents: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds,
                 guidance: float | None = None) -> torch.Tensor:
        batch, channels, h, w = latents.shape
        packed = (latents.to(self.device, self.dtype)
                  .view(batch, channels, h // 2, 2, w // 2, 2)
                  .permute(0, 2, 4, 1, 3, 5)
                  .reshape(batch, (h // 2) * (w // 2), channels * 4))
        image_ids = torch.zeros(h // 2, w // 2, 3, device=self.device)
        image_ids[..., 1] += torch.arange(h // 2, device=self.device)[:, None]
        image_ids[..., 2] += torch.arange(w // 2, device=self.device)[None, :]
        text_ids = torch.zeros(embeds.prompt_embeds.shape[1], 3, device=self.device)
        guidance_in = None
        if self.guidance_embedded:
            guidance_in = torch.full((batch,), float(guidance or 1.0), device=self.device,
                                     dtype=torch.float32)
        out = self.transformer(
            hidden_states=packed,
            timestep=sigma.to(self.device, self.dtype),
            guidance=guidance_in,
            pooled_projections=embeds.pooled.to(self.device, self.dtype),
            encoder_hidden_states=embeds.prompt_embeds.to(self.device, self.dtype),
            txt_ids=text_ids.to(self.dtype),
            img_ids=image_ids.reshape(-1, 3).to(self.dtype),
            return_dict=False,
        )[0]
        return (out.view(batch, h // 2, w // 2, channels, 2, 2)
                .permute(0, 3, 1, 4, 2, 5)
                .reshape(batch, channels, h, w))
