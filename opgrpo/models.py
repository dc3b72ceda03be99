"""The policy: an SD3-family flow-matching model loaded from a local diffusers directory.

`FlowPolicy` owns the transformer (optionally with LoRA adapters), the scheduler's sigma grid,
the frozen text encoders (prompts are encoded once and cached) and the VAE decoder. It predicts
velocities with optional classifier-free guidance and turns final latents into images. Pixel-space
models (no VAE in the pipeline) decode by identity.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from opgrpo.sde import sigma_grid

log = logging.getLogger(__name__)

# Optional file in a model directory with the settings the model was trained for (e.g. the
# shapes model was trained with one zero T5 token, not diffusers' default of 256).
MODEL_DEFAULTS_FILE = "opgrpo_model.json"
DEFAULT_MAX_SEQUENCE_LENGTH = 77
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch: prompt_embeds (B, L, D) and pooled (B, P)."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def index(self, rows: torch.Tensor | list[int]) -> PromptEmbeds:
        return PromptEmbeds(self.prompt_embeds[rows], self.pooled[rows])

    @staticmethod
    def cat(parts: list[PromptEmbeds]) -> PromptEmbeds:
        return PromptEmbeds(
            torch.cat([p.prompt_embeds for p in parts]), torch.cat([p.pooled for p in parts])
        )


def check_model_dir(path: str | Path) -> Path:
    """Fail early, naming the file, when `path` is not a diffusers pipeline directory."""
    path = Path(path)
    index = path / "model_index.json"
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not index.is_file():
        raise FileNotFoundError(
            f"{index} is missing: model.path must be a diffusers pipeline directory "
            "(saved with save_pretrained), e.g. one made by `opgrpo make-tiny-sd3 DIR`"
        )
    try:
        json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{index} is not valid JSON: {exc}") from exc
    if not (path / "transformer").is_dir():
        raise FileNotFoundError(f"{path / 'transformer'} is missing from the model directory")
    return path


def _dtype_kwarg() -> str:
    """diffusers renamed `torch_dtype` to `dtype` (the old name warns); use what it knows."""
    from diffusers.utils import deprecation_utils

    renamed = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    return "dtype" if renamed else "torch_dtype"


def model_defaults(path: str | Path) -> dict:
    """The model directory's opgrpo_model.json (settings it was trained for), or {}."""
    file = Path(path) / MODEL_DEFAULTS_FILE
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from exc


class FlowPolicy:
    """Velocity model + text encoders + decoder of one SD3-family pipeline."""

    def __init__(
        self,
        pipeline,
        dtype: str = "float32",
        device: str | torch.device = "cpu",
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_target_modules: tuple[str, ...] | list[str] = DEFAULT_LORA_TARGETS,
        keep_reference: bool = False,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.pipeline = pipeline
        self.device = torch.device(device)
        self.dtype = _DTYPES[dtype]
        self.max_sequence_length = max_sequence_length
        self.transformer = pipeline.transformer.to(self.device)
        if self.transformer.dtype != self.dtype:
            self.transformer.to(self.dtype)
        self.scheduler = pipeline.scheduler
        self.vae = getattr(pipeline, "vae", None)
        for module in self._frozen_modules():
            module.to(self.device).requires_grad_(False).eval()
        self.lora_rank = lora_rank
        self._reference: torch.nn.Module | None = None
        if lora_rank > 0:
            self._add_lora(lora_rank, lora_alpha or float(lora_rank), list(lora_target_modules))
        elif keep_reference:
            self._reference = copy.deepcopy(self.transformer).requires_grad_(False).eval()
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_pretrained(
        cls, path: str | Path, max_sequence_length: int | None = None, **kwargs
    ) -> FlowPolicy:
        """Load a local diffusers SD3 pipeline directory (nothing is downloaded).

        `max_sequence_length` None takes the model directory's own setting (opgrpo_model.json)
        or DEFAULT_MAX_SEQUENCE_LENGTH.
        """
        from diffusers import StableDiffusion3Pipeline

        path = check_model_dir(path)
        if max_sequence_length is None:
            max_sequence_length = model_defaults(path).get(
                "max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH
            )
        index = json.loads((path / "model_index.json").read_text())
        absent = {
            name: None
            for name in ("vae", "text_encoder_3", "tokenizer_3")
            if index.get(name, [None])[0] is None
        }
        try:  # safetensors only: a pickled .bin checkpoint could run code when loaded
            pipeline = StableDiffusion3Pipeline.from_pretrained(
                path, local_files_only=True, use_safetensors=True,
                **{_dtype_kwarg(): torch.float32}, **absent
            )
        except OSError as exc:
            raise FileNotFoundError(
                f"model.path {path}: cannot load it with safetensors weights only ({exc}); "
                "pickled .bin weights are not loaded: convert them with save_pretrained("
                "safe_serialization=True)") from None
        return cls(pipeline, max_sequence_length=max_sequence_length, **kwargs)

    def _frozen_modules(self) -> list[torch.nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
        return [m for m in (getattr(self.pipeline, n, None) for n in names) if m is not None]

    def _add_lora(self, rank: int, alpha: float, targets: list[str]) -> None:
        from peft import LoraConfig

        self.transformer.requires_grad_(False)
        config = LoraConfig(
            r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets
        )
        self.transformer.add_adapter(config)
        # LoRA parameters train in float32 even when the base weights are bf16.
        for param in self.transformer.parameters():
            if param.requires_grad:
                param.data = param.data.float()

    # ----- shapes and schedule -------------------------------------------------------------
    @property
    def is_pixel_space(self) -> bool:
        return self.vae is None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (1 for pixel-space models)."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_image_size(self) -> int:
        """The image side the transformer was configured for (sample_size latent cells)."""
        return self.transformer.config.sample_size * self.vae_scale_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents for an image of height x width pixels."""
        factor = self.vae_scale_factor
        patch = self.transformer.config.patch_size
        if height % (factor * patch) or width % (factor * patch):
            raise ValueError(
                f"image size {height}x{width} must be a multiple of {factor * patch} "
                f"(VAE factor {factor} x patch size {patch}); change model.height/model.width"
            )
        return (self.transformer.config.in_channels, height // factor, width // factor)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The sigma grid (T+1,) of `num_steps` steps, from the model's scheduler config."""
        return sigma_grid(self.scheduler, num_steps)

    # ----- text ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Embeddings of `prompts`, encoding each distinct prompt once per policy lifetime."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=missing,
                prompt_2=None,
                prompt_3=None,
                device=self.device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
            for i, prompt in enumerate(missing):
                self._prompt_cache[prompt] = (embeds[i].float(), pooled[i].float())
        rows = [self._prompt_cache[p] for p in prompts]
        return PromptEmbeds(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))

    # ----- velocity -------------------------------------------------------------------------
    def velocity(
        self,
        latents: torch.Tensor,
        sigma: float | torch.Tensor,
        embeds: PromptEmbeds,
        guidance_scale: float = 1.0,
        negative: PromptEmbeds | None = None,
    ) -> torch.Tensor:
        """v_theta(x, sigma, c), shape of `latents`, with CFG when guidance_scale > 1.

        Args:
            latents: (B, C, h, w).
            sigma: scalar or (B,) noise level(s) in [0, 1].
            embeds: conditioning of the B rows.
            negative: unconditional embeddings (default: the empty prompt) for CFG.
        """
        batch = latents.shape[0]
        timestep = torch.as_tensor(sigma, dtype=torch.float32, device=self.device)
        timestep = timestep.expand(batch) * self.scheduler.config.num_train_timesteps
        if guidance_scale > 1.0:
            if negative is None:
                negative = self.encode_prompts([""] * batch)
            both = PromptEmbeds.cat([negative, embeds])
            out = self._forward(torch.cat([latents, latents]), timestep.repeat(2), both)
            uncond, cond = out.chunk(2)
            return uncond + guidance_scale * (cond - uncond)
        return self._forward(latents, timestep, embeds)

    def _forward(self, latents, timestep, embeds: PromptEmbeds) -> torch.Tensor:
        return self.transformer(
            hidden_states=latents.to(self.device, self.dtype),
            timestep=timestep.to(self.dtype),
            encoder_hidden_states=embeds.prompt_embeds.to(self.device, self.dtype),
            pooled_projections=embeds.pooled.to(self.device, self.dtype),
            return_dict=False,
        )[0]

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within this block `velocity` is the reference policy (LoRA off, or the frozen copy)."""
        if self.lora_rank > 0:
            self.transformer.disable_adapters()
            try:
                yield
            finally:
                self.transformer.enable_adapters()
        elif self._reference is not None:
            live, self.transformer = self.transformer, self._reference
            try:
                yield
            finally:
                self.transformer = live
        else:
            raise RuntimeError(
                "no reference policy: enable LoRA (model.lora_rank > 0) or build the policy "
                "with keep_reference=True (needed when learner.kl_beta > 0)"
            )

    # ----- images ----------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1], float32."""
        latents = latents.to(self.device, torch.float32)
        if self.vae is None:
            images = latents
        else:
            config = self.vae.config
            scaled = latents / config.scaling_factor + (config.shift_factor or 0.0)
            images = self.vae.decode(scaled.to(self.vae.dtype), return_dict=False)[0].float()
        return (images / 2 + 0.5).clamp(0, 1)

    # ----- weights ---------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a learner pushes to rollout actors: LoRA only when LoRA is on."""
        names = {id(p) for p in self.trainable_parameters()}
        return {
            k: v.detach().clone()
            for k, v in self.transformer.named_parameters()
            if id(v) in names
        }

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.transformer.named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise KeyError(f"weights for unknown parameters: {unknown[:5]}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
