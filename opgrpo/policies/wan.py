"""Wan2.1 text-to-video (`WanPipeline`, `WanTransformer3DModel`, `AutoencoderKLWan`).

Differences from SD3 that this adapter hides from the rest of the service:
- **Video latents** (C, f, h, w): f = (num_frames - 1) / 4 + 1 latent frames (the VAE
  compresses time 4x and space 8x). The SDE math reduces log-densities over every non-batch
  element, so a video trajectory is one sample like an image.
- **Decoded frames.** `decode` returns (B, F, 3, H, W); rewards score frames (see
  `actors/reward.py`).
- **Latent normalisation** by the VAE's per-channel `latents_mean` / `latents_std`.
- **Conditioning:** UMT5 token embeddings only (no pooled embedding), padded with zeros to
  `max_sequence_length` (226). The timestep is sigma x num_train_timesteps.
- **Scheduler.** Wan ships `UniPCMultistepScheduler` with flow sigmas (`flow_shift`); its
  sigma grid is the shifted flow-matching grid ending at 0, which the SDE steps use.
"""

from __future__ import annotations

import torch

from opgrpo.models import FlowPolicy, PromptEmbeds

DEFAULT_VIDEO_SIZE = 480  # Wan2.1-T2V-1.3B's shorter side


class WanPolicy(FlowPolicy):
    pipeline_class = "WanPipeline"
    optional_components = ("transformer_2",)
    frozen_names = ("text_encoder", "vae")
    default_max_sequence_length = 226
    is_video = True

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor_spatial)

    @property
    def temporal_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor_temporal)

    @property
    def default_image_size(self) -> int:
        return DEFAULT_VIDEO_SIZE

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, f, h, w) for `self.num_frames` frames of height x width pixels."""
        frames, temporal = self.num_frames, self.temporal_factor
        if frames < 1 or (frames - 1) % temporal:
            raise ValueError(f"model.num_frames ({frames}) must be {temporal} k + 1 for this "
                             f"model (its VAE compresses time {temporal}x), e.g. 1, 5, 81")
        self._check_size(height, width,
                         self.vae_scale_factor * self.transformer.config.patch_size[1])
        return (self.transformer.config.in_channels, (frames - 1) // temporal + 1,
                height // self.vae_scale_factor, width // self.vae_scale_factor)

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, None]:
        embeds, _ = self.pipeline.encode_prompt(
            prompt=prompts, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length, device=self.device,
            dtype=torch.float32,
        )
        return embeds, None

    def _forward(self, latents: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds,
                 guidance: float | None = None) -> torch.Tensor:
        return self._call_transformer(latents, sigma, embeds)

    def _decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, f, h, w) latents -> (B, F, 3, H, W) frames in [-1, 1]."""
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(config.latents_std, device=latents.device).view(shape)
        video = self.vae.decode((latents * std + mean).to(self.vae.dtype),
                                return_dict=False)[0].float()
        return video.permute(0, 2, 1, 3, 4)
