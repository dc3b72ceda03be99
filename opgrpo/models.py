"""The policy: a flow-matching model loaded from a local diffusers pipeline directory.

`FlowPolicy` owns the transformer (optionally with LoRA adapters), the scheduler's sigma grid,
the frozen text encoders (prompts are encoded once and cached) and the VAE decoder. It predicts
velocities with optional classifier-free guidance and turns final latents into images (or video
frames). What differs between model families lives in one adapter module each, chosen by the
pipeline class in `model_index.json`:

- `opgrpo/policies/sd3.py`: `StableDiffusion3Pipeline` (SD3, SD3.5; pixel-space tiny models too)
- `opgrpo/policies/flux.py`: `FluxPipeline` (packed latents, guidance embedding)
- `opgrpo/policies/wan.py`: `WanPipeline` (video latents with a frame axis)

Latents are always kept unpacked, (C, h, w) for images and (C, f, h, w) for video, so the SDE
math, the trajectory codec and the learner never see a family's internal layout.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from opgrpo.config import DEFAULT_LORA_TARGETS
from opgrpo.sde import sigma_grid

log = logging.getLogger(__name__)

# Optional file in a model directory with the settings the model was trained for (e.g. the
# shapes model was trained with one zero T5 token, not diffusers' default of 256).
MODEL_DEFAULTS_FILE = "opgrpo_model.json"
DEFAULT_MAX_SEQUENCE_LENGTH = 77
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_PROMPT_CACHE_SIZE = 1024
HOST = torch.device("cpu")  # where offloaded text encoders and cached embeddings live
# A cached prompt: (prompt_embeds (L, D), pooled (P,) or None).
_CacheRow = tuple[torch.Tensor, "torch.Tensor | None"]


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch: prompt_embeds (B, L, D) and pooled (B, P) (None for
    families without a pooled embedding, e.g. Wan)."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def index(self, rows: torch.Tensor | list[int]) -> PromptEmbeds:
        pooled = None if self.pooled is None else self.pooled[rows]
        return PromptEmbeds(self.prompt_embeds[rows], pooled)

    @staticmethod
    def cat(parts: list[PromptEmbeds]) -> PromptEmbeds:
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return PromptEmbeds(torch.cat([p.prompt_embeds for p in parts]), pooled)


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


def model_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `model.dtype` string."""
    if name not in _DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def is_text_encoder(component: str) -> bool:
    """Whether a pipeline component (a model_index.json name) is a frozen text encoder."""
    return component.startswith("text_encoder")


def component_dtype(component: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a pipeline component is held in when the model dtype is `dtype` (Flow-GRPO's
    rule): the transformer(s) and the frozen text encoders in `dtype`, everything else (the
    VAE) in float32, as it is small and decoding in half precision is lossy. LoRA parameters
    train in float32 whatever the transformer's dtype (`_add_lora`)."""
    if component.startswith("transformer") or is_text_encoder(component):
        return dtype
    return torch.float32


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move `module` to `device` in `dtype`. A module already in `dtype` is only moved, so
    the float32 layers transformers keeps in a float16 T5 (`_keep_in_fp32_modules`) stay."""
    if module.dtype == dtype:
        module.to(device)
    else:
        module.to(device=device, dtype=dtype)


def _loads_dtype_per_component() -> bool:
    """diffusers >= 0.33 takes a {component: dtype} dict in from_pretrained."""
    import diffusers
    from packaging.version import Version

    return Version(diffusers.__version__).release >= (0, 33)


def model_defaults(path: str | Path) -> dict:
    """The model directory's opgrpo_model.json (settings it was trained for), or {}."""
    file = Path(path) / MODEL_DEFAULTS_FILE
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from exc


def _read_lora(directory: Path, pipeline_class) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict keyed as peft's `get_peft_model_state_dict` of the transformer, the saved
    LoraConfig fields r / lora_alpha / target_modules where recorded) of a LoRA directory."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    peft_config = directory / "adapter_config.json"
    if peft_config.is_file():  # peft's save_pretrained (Flow-GRPO's checkpoints)
        weights = directory / "adapter_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"model.init_lora {directory}: adapter_config.json but no "
                                    "adapter_model.safetensors (.bin files are not loaded)")
        state = {k.removeprefix("base_model.model."): v
                 for k, v in load_file(str(weights)).items()}
        return state, json.loads(peft_config.read_text())
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    name = "pytorch_lora_weights.safetensors"  # diffusers' default name
    if name not in files:
        if len(files) != 1:
            raise FileNotFoundError(f"model.init_lora {directory}: no {name} and not exactly "
                                    f"one *.safetensors file ({files})")
        name = files[0]
    with safe_open(str(directory / name), framework="pt") as f:
        metadata = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    state = pipeline_class.lora_state_dict(str(directory), weight_name=name,
                                           use_safetensors=True)
    if isinstance(state, tuple):  # FLUX may return (state, network alphas)
        state = state[0]
    others = sorted({k.split(".", 1)[0] for k in state if not k.startswith("transformer.")})
    if others:
        raise ValueError(f"model.init_lora {directory}: LoRA layers for {others}; only the "
                         "transformer's are trained here")
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    if state and "lora_A" not in next(iter(state)):  # older diffusers names (lora.down / up)
        from diffusers.utils import convert_unet_state_dict_to_peft

        state = convert_unet_state_dict_to_peft(state)
    saved = {k.removeprefix("transformer."): v for k, v in metadata.items()
             if k.startswith("transformer.")}
    return state, saved


# Pipeline class in model_index.json -> the module and class of its adapter.
FAMILIES = {
    "StableDiffusion3Pipeline": ("opgrpo.policies.sd3", "SD3Policy"),
    "FluxPipeline": ("opgrpo.policies.flux", "FluxPolicy"),
    "WanPipeline": ("opgrpo.policies.wan", "WanPolicy"),
}


def policy_class(path: str | Path) -> type[FlowPolicy]:
    """The adapter class for the pipeline saved in `path` (by its model_index.json)."""
    import importlib

    index = Path(path) / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name")
    if name not in FAMILIES:
        raise ValueError(f"{index}: pipeline class {name!r} is not supported; supported: "
                         f"{sorted(FAMILIES)}")
    module, cls = FAMILIES[name]
    return getattr(importlib.import_module(module), cls)


class FlowPolicy:
    """Velocity model + text encoders + decoder of one flow-matching pipeline.

    `FlowPolicy.from_pretrained(DIR)` returns the adapter subclass for DIR's pipeline class.
    A subclass provides `_encode`, `_forward`, `latent_shape`, `_decode_latents` and, where
    they differ, `sigmas` and `default_image_size`.
    """

    pipeline_class = ""  # the diffusers pipeline class (model_index.json `_class_name`)
    optional_components: tuple[str, ...] = ()  # may be null in model_index.json
    frozen_names: tuple[str, ...] = ("text_encoder", "vae")
    default_max_sequence_length = DEFAULT_MAX_SEQUENCE_LENGTH
    is_video = False

    def __init__(
        self,
        pipeline,
        dtype: str = "float32",
        device: str | torch.device = "cpu",
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_target_modules: tuple[str, ...] | list[str] = DEFAULT_LORA_TARGETS,
        keep_reference: bool = False,
        max_sequence_length: int | None = None,
        gradient_checkpointing: bool = False,
        num_frames: int = 1,
        offload_text_encoders: bool = False,
        prompt_cache_size: int = DEFAULT_PROMPT_CACHE_SIZE,
    ) -> None:
        if prompt_cache_size < 0:
            raise ValueError(f"model.prompt_cache_size must be >= 0, got {prompt_cache_size}")
        self.pipeline = pipeline
        self.device = torch.device(device)
        self.dtype = model_dtype(dtype)
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        self.num_frames = num_frames
        self.transformer = pipeline.transformer.to(self.device)
        if self.transformer.dtype != self.dtype:
            self.transformer.to(self.dtype)
        self.scheduler = pipeline.scheduler
        self.vae = getattr(pipeline, "vae", None)
        self.offload_text_encoders = offload_text_encoders
        for name, module in self._frozen_named_modules():
            home = HOST if offload_text_encoders and is_text_encoder(name) else self.device
            _place(module, home, component_dtype(name, self.dtype))
            module.requires_grad_(False).eval()
        self.lora_rank = lora_rank
        self._reference: torch.nn.Module | None = None
        if lora_rank > 0:
            self._add_lora(lora_rank, lora_alpha or float(lora_rank), list(lora_target_modules))
        elif keep_reference:
            self._reference = copy.deepcopy(self.transformer).requires_grad_(False).eval()
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.prompt_cache_size = prompt_cache_size
        # prompt -> (prompt_embeds (L, D), pooled (P,) or None), host memory, model dtype;
        # least recently used first.
        self._prompt_cache: OrderedDict[str, _CacheRow] = (
            OrderedDict())

    @classmethod
    def from_pretrained(
        cls, path: str | Path, max_sequence_length: int | None = None, **kwargs
    ) -> FlowPolicy:
        """Load a local diffusers pipeline directory (nothing is downloaded) with the adapter
        of its pipeline class.

        `max_sequence_length` None takes the model directory's own setting (opgrpo_model.json)
        or the family's default.
        """
        path = check_model_dir(path)
        if cls is FlowPolicy:
            cls = policy_class(path)
        if max_sequence_length is None:
            max_sequence_length = model_defaults(path).get("max_sequence_length")
        pipeline = cls.load_pipeline(path, dtype=kwargs.get("dtype", "float32"))
        return cls(pipeline, max_sequence_length=max_sequence_length, **kwargs)

    @classmethod
    def from_config(cls, config, device: str = "cpu", **kwargs) -> FlowPolicy:
        """The policy a run's `model` section describes (rollout actors, learner ranks)."""
        model = config.model
        policy = cls.from_pretrained(
            model.path, dtype=model.dtype, device=device, lora_rank=model.lora_rank,
            lora_alpha=model.lora_alpha, lora_target_modules=model.lora_target_modules,
            max_sequence_length=model.max_sequence_length, num_frames=model.num_frames,
            offload_text_encoders=model.offload_text_encoders,
            prompt_cache_size=model.prompt_cache_size, **kwargs)
        if model.init_lora:
            policy.init_lora_from(model.init_lora)
        return policy

    def init_lora_from(self, directory: str | Path) -> None:
        """Set the trainable LoRA adapter to the LoRA saved in `directory` (`model.init_lora`),
        so that training continues from it. Unlike `load_lora` (a second, frozen adapter for
        sampling) the weights go INTO the adapter the optimizer trains. Formats: diffusers'
        (`opgrpo export`, `save_lora_weights`; read with the pipeline's `lora_state_dict`) and
        peft's (`adapter_model.safetensors` + `adapter_config.json`, as Flow-GRPO saves).
        Its modules, rank and alpha must be the adapter's: a mismatch is an error naming the
        `model.lora_*` setting to change."""
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        where = f"model.init_lora {directory}"
        if self.lora_rank == 0:
            raise ValueError(f"{where}: needs model.lora_rank > 0")
        state, saved = _read_lora(Path(directory), type(self.pipeline))
        ours = get_peft_model_state_dict(self.transformer)
        missing, extra = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
        if missing or extra:
            hint = (f" (its target modules: {saved['target_modules']})"
                    if saved.get("target_modules") else "")
            raise ValueError(
                f"{where}: its LoRA layers are not those of model.lora_target_modules "
                f"{list(self.transformer.peft_config['default'].target_modules)}{hint}: "
                f"{len(missing)} missing, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. "
                f"{extra[:2]}")
        adapter = self.transformer.peft_config["default"]
        for name, value in ours.items():
            if state[name].shape != value.shape:
                raise ValueError(f"{where}: {name} has shape {tuple(state[name].shape)}, the "
                                 f"adapter {tuple(value.shape)}: its rank is "
                                 f"{saved.get('r', '?')}, model.lora_rank {adapter.r}")
        alpha = saved.get("lora_alpha")
        if alpha is not None and float(alpha) != float(adapter.lora_alpha):
            raise ValueError(f"{where}: its lora_alpha is {alpha}, model.lora_alpha "
                             f"{adapter.lora_alpha} (the scale alpha / rank must be the same)")
        if alpha is None:
            log.warning("%s records no lora_alpha: assuming model.lora_alpha (%s)", where,
                        adapter.lora_alpha)
        result = set_peft_model_state_dict(self.transformer, state, adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{where}: peft did not place {result.unexpected_keys[:3]}")
        log.info("%s: %d LoRA tensors loaded into the trainable adapter", where, len(state))

    @classmethod
    def load_pipeline(cls, path: Path, dtype: str = "float32"):
        """The pipeline, safetensors only, each component read in its `component_dtype` for
        model dtype `dtype` (no float32 copy of a bf16 T5-XXL on the way); optional
        components may be absent. A diffusers without per-component dtypes loads float32 and
        the policy casts."""
        import diffusers

        index = json.loads((path / "model_index.json").read_text())
        if index.get("_class_name") != cls.pipeline_class:
            raise ValueError(f"{path / 'model_index.json'}: pipeline class "
                             f"{index.get('_class_name')!r}, expected {cls.pipeline_class!r}")
        absent = {name: None for name in cls.optional_components
                  if index.get(name, [None])[0] is None}
        dtypes: torch.dtype | dict[str, torch.dtype] = torch.float32
        if _loads_dtype_per_component():
            dtypes = {"default": torch.float32, **{
                name: component_dtype(name, model_dtype(dtype))
                for name in index if not name.startswith("_")}}
        try:  # safetensors only: a pickled .bin checkpoint could run code when loaded
            return getattr(diffusers, cls.pipeline_class).from_pretrained(
                path, local_files_only=True, use_safetensors=True,
                **{_dtype_kwarg(): dtypes}, **absent
            )
        except OSError as exc:
            raise FileNotFoundError(
                f"model.path {path}: cannot load it with safetensors weights only ({exc}); "
                "pickled .bin weights are not loaded: convert them with save_pretrained("
                "safe_serialization=True)") from None

    def _frozen_named_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """(component name, module) of the frozen components this pipeline has."""
        return [(n, m) for n in self.frozen_names
                if (m := getattr(self.pipeline, n, None)) is not None]

    def _frozen_modules(self) -> list[torch.nn.Module]:
        return [m for _, m in self._frozen_named_modules()]

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

    def _check_size(self, height: int, width: int, multiple: int) -> None:
        if height % multiple or width % multiple:
            raise ValueError(
                f"image size {height}x{width} must be a multiple of {multiple} for this "
                "model (VAE factor x patch size); change model.height/model.width")

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Unpacked latent shape for an image (or video) of height x width pixels."""
        raise NotImplementedError

    def sigmas(self, num_steps: int, height: int | None = None,
               width: int | None = None) -> torch.Tensor:
        """The sigma grid (T+1,) of `num_steps` steps, float32 on the host (it is schedule
        metadata: each step reads its two sigmas as numbers), computed once per size from the
        model's scheduler config (`height`/`width` matter only for resolution-dependent
        shifting). Treat it as read-only."""
        key = (num_steps, height, width)
        cache = self.__dict__.setdefault("_sigma_grids", {})
        if key not in cache:
            cache[key] = self._sigma_grid(num_steps, height, width)
        return cache[key]

    def _sigma_grid(self, num_steps: int, height: int | None,
                    width: int | None) -> torch.Tensor:
        return sigma_grid(self.scheduler, num_steps)

    # ----- text ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Embeddings of `prompts` on the policy device, in the model dtype.

        Each distinct prompt of the batch is encoded once. The `prompt_cache_size` distinct
        prompts used last are kept in host memory (least recently used evicted first), so a
        prompt seen again skips the text encoders.
        """
        rows = {p: self._prompt_cache.get(p) for p in dict.fromkeys(prompts)}
        missing = [p for p, row in rows.items() if row is None]
        if missing:
            rows.update(self._encode_to_host(missing))
        self._remember(rows)
        embeds = torch.stack([rows[p][0] for p in prompts]).to(self.device)
        if rows[prompts[0]][1] is None:
            return PromptEmbeds(embeds)
        return PromptEmbeds(embeds, torch.stack([rows[p][1] for p in prompts]).to(self.device))

    def _encode_to_host(self, prompts: list[str]) -> dict[str, _CacheRow]:
        """prompt -> (prompt_embeds (L, D), pooled (P,) or None) of distinct prompts, host
        copies in the model dtype (each its own storage, so evicting one frees it)."""
        with self._text_encoders_on_device():
            embeds, pooled = self._encode(prompts)
        embeds = embeds.to(HOST, self.dtype)
        pooled = None if pooled is None else pooled.to(HOST, self.dtype)
        return {p: (embeds[i].clone(), None if pooled is None else pooled[i].clone())
                for i, p in enumerate(prompts)}

    def _remember(self, rows: dict[str, _CacheRow]) -> None:
        """Put a batch's rows in the cache as the most recently used; evict beyond its size."""
        if self.prompt_cache_size == 0:
            return
        for prompt, row in rows.items():
            self._prompt_cache[prompt] = row
            self._prompt_cache.move_to_end(prompt)
        while len(self._prompt_cache) > self.prompt_cache_size:
            self._prompt_cache.popitem(last=False)

    @contextlib.contextmanager
    def _text_encoders_on_device(self) -> Iterator[None]:
        """With `offload_text_encoders`, the text encoders visit the policy device for one
        encode and go back to host memory after it."""
        encoders = [m for n, m in self._frozen_named_modules()
                    if self.offload_text_encoders and is_text_encoder(n)]
        for module in encoders:
            module.to(self.device)
        try:
            yield
        finally:
            for module in encoders:
                module.to(HOST)

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds (n, L, D), pooled (n, P) or None) of distinct prompts."""
        raise NotImplementedError

    # ----- velocity -------------------------------------------------------------------------
    @property
    def guidance_embedded(self) -> bool:
        """Guidance-distilled models (FLUX.1-dev) take the guidance scale as an input instead
        of running classifier-free guidance."""
        return False

    def velocity(
        self,
        latents: torch.Tensor,
        sigma: float | torch.Tensor,
        embeds: PromptEmbeds,
        guidance_scale: float = 1.0,
        negative: PromptEmbeds | None = None,
        detach_uncond: bool = False,
    ) -> torch.Tensor:
        """v_theta(x, sigma, c), shape of `latents`, on the policy's device, with CFG when
        guidance_scale > 1.

        Args:
            latents: (B, *latent_shape), unpacked.
            sigma: scalar or (B,) noise level(s) in [0, 1].
            embeds: conditioning of the B rows.
            negative: unconditional embeddings (default: the empty prompt) for CFG.
            detach_uncond: no gradient through the unconditional half of the guided velocity
                (Flow-GRPO's trainer); the value is unchanged, so log-probs match the
                rollout's exactly.
        """
        batch = latents.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.device).expand(batch)
        if self.guidance_embedded:
            return self._forward(latents, sigma, embeds, guidance_scale)
        if guidance_scale > 1.0:
            if negative is None:
                negative = self.encode_prompts([""] * batch)
            both = PromptEmbeds.cat([negative, embeds])
            out = self._forward(torch.cat([latents, latents]), sigma.repeat(2), both)
            uncond, cond = out.chunk(2)
            if detach_uncond:
                uncond = uncond.detach()
            return uncond + guidance_scale * (cond - uncond)
        return self._forward(latents, sigma, embeds)

    def _forward(self, latents: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds,
                 guidance: float | None = None) -> torch.Tensor:
        """The transformer's velocity for unpacked `latents` at noise levels `sigma` (B,)."""
        raise NotImplementedError

    def _call_transformer(self, latents: torch.Tensor, sigma: torch.Tensor,
                          embeds: PromptEmbeds, **extra) -> torch.Tensor:
        """transformer(latents, timestep = sigma x num_train_timesteps, text tokens, **extra):
        the call of the families whose timestep is on the 0-1000 scale (SD3, Wan). The
        timestep stays float32, as diffusers' pipelines pass it (in bf16, 1000 x sigma would
        be rounded to a multiple of 4 near 1000)."""
        timestep = sigma.to(self.device, torch.float32) * self.scheduler.config.num_train_timesteps
        return self.transformer(
            hidden_states=latents.to(self.device, self.dtype),
            timestep=timestep,
            encoder_hidden_states=embeds.prompt_embeds.to(self.device, self.dtype),
            return_dict=False, **extra,
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
        """Final latents -> images (B, 3, H, W), or video frames (B, F, 3, H, W), in [0, 1],
        float32."""
        latents = latents.to(self.device, torch.float32)
        images = latents if self.vae is None else self._decode_latents(latents)
        return (images / 2 + 0.5).clamp(0, 1)

    def _decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode of unpacked latents to [-1, 1] pixels."""
        config = self.vae.config
        scaled = latents / config.scaling_factor + (config.shift_factor or 0.0)
        return self.vae.decode(scaled.to(self.vae.dtype), return_dict=False)[0].float()

    # ----- weights ---------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def load_lora(self, directory: str | Path) -> None:
        """Put a LoRA adapter in diffusers' format (`opgrpo export`, or any
        `save_lora_weights` output) on this policy's transformer, with diffusers'
        `load_lora_weights`, so sampling and evaluation use it."""
        directory = Path(directory)
        files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
        if not files:
            raise FileNotFoundError(f"{directory} holds no LoRA weights (*.safetensors); "
                                    "write them with `opgrpo export RUN --out DIR`")
        self.pipeline.load_lora_weights(str(directory), weight_name=files[0].name)

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
