"""`opgrpo export RUN_DIR --out DIR`: a checkpoint's policy for diffusers.

Every checkpoint holds, beside DeepSpeed's own state (for resuming), the trainable weights as
`checkpoints/<tag>/trainable.safetensors` (written by learner rank 0, gathered under ZeRO-3).
Export reads only that file and the base model directory: nothing is unpickled (DeepSpeed's
own files are safetensors too, see `learner/safe_state.py`).

- A LoRA run exports, by default, the adapter alone in diffusers' LoRA format
  (`pytorch_lora_weights.safetensors`, with its rank and alpha as adapter metadata): a few
  tens of MB that `pipe.load_lora_weights(DIR)` puts on the base pipeline (or
  `opgrpo eval/sample --model BASE --lora DIR`).
- `fused=True` (`--fused`), and every full fine-tuning run, writes the whole pipeline with the
  trained transformer (LoRA fused in): it loads with `<Pipeline>.from_pretrained(DIR)` and
  needs no peft. Components are stored as the service holds them in the run's model dtype
  (transformer and text encoders in it, the VAE in float32), or all in `dtype`'s dtype for the
  transformer when given.
- `ema=True` (`--ema`) writes, in either format, the exponential moving average of the trainable
  weights that a run with `learner.ema: true` keeps (`checkpoints/<tag>/ema_weights.safetensors`)
  instead of the live weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from opgrpo.config import load_config
from opgrpo.models import FlowPolicy

WEIGHTS_FILE = "trainable.safetensors"
EMA_FILE = "ema_weights.safetensors"  # learner.ema: the EMA of the trainable weights
# files of the base model directory that describe it to opgrpo (sampling defaults)
_CARRIED = ("opgrpo_model.json",)


def checkpoint_tag(run_dir: Path, step: int | None) -> str:
    """`stepN` of the requested step, or the latest checkpoint's tag."""
    checkpoints = run_dir / "checkpoints"
    if step is not None:
        tag = f"step{step}"
        if not (checkpoints / tag).is_dir():
            have = sorted((p.name for p in checkpoints.glob("step*") if p.is_dir()),
                          key=lambda name: int(name[4:]))
            raise FileNotFoundError(f"{checkpoints / tag} does not exist; checkpoints: {have}")
        return tag
    latest = checkpoints / "latest.json"
    if not latest.is_file():
        raise FileNotFoundError(f"{latest} is missing: {run_dir} has no checkpoint")
    return json.loads(latest.read_text())["tag"]


def load_trainable(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint was written before "
                                f"trainable weights were saved with it")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return load_file(str(path)), meta


def load_from_deepspeed(tag_dir: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """Fallback when `trainable.safetensors` is missing: the module weights DeepSpeed saved
    (ZeRO 0-2 keep them whole), in the learner's safetensors + JSON checkpoint format
    (`learner/safe_state.py`; a pickled file is refused, not loaded)."""
    from learner.safe_state import load_state

    path = tag_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{tag_dir / WEIGHTS_FILE} and {path} are both missing")
    module = load_state(path)["module"]
    state = {k: v for k, v in module.items() if k in names}
    if any(v.numel() == 0 for v in state.values()):
        raise ValueError(f"{path} holds ZeRO-3 partitions, not whole weights, and "
                         f"{WEIGHTS_FILE} is missing: this checkpoint cannot be exported")
    return state


LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA weight name


def export_checkpoint(run_dir: str | Path, out: str | Path, step: int | None = None,
                      dtype: str | None = None, overwrite: bool = False,
                      fused: bool = False, ema: bool = False) -> Path:
    """Write the policy of `run_dir`'s checkpoint (latest, or `step`) to `out`: the LoRA
    adapter in diffusers' format, or (`fused`, or a full fine-tuning run) the whole pipeline.
    `dtype`: the transformer's (or the adapter's) dtype on disk; default the run's model.dtype
    for a pipeline, float32 for an adapter (it trains in float32). `ema`: the EMA weights of
    a `learner.ema` run instead of the live ones."""
    run_dir, out = Path(run_dir), Path(out)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: {run_dir} is not a run directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (use --overwrite)")
    config = load_config(config_path)
    tag = checkpoint_tag(run_dir, step)
    tag_dir = run_dir / "checkpoints" / tag
    if ema and not (tag_dir / EMA_FILE).is_file():
        raise FileNotFoundError(f"{tag_dir / EMA_FILE} is missing: checkpoint {tag} has no EMA "
                                "weights (the run trained with learner.ema false); export it "
                                "without --ema")
    lora = config.model.lora_rank > 0
    whole = fused or not lora
    dtype = dtype or (config.model.dtype if whole else "float32")  # the adapter trains in fp32
    # the pipeline in the run's model dtype (VAE float32), as the service holds it
    policy = FlowPolicy.from_pretrained(
        config.model.path, dtype=config.model.dtype if whole else "float32",
        lora_rank=config.model.lora_rank, lora_alpha=config.model.lora_alpha,
        lora_target_modules=config.model.lora_target_modules, keep_reference=False)
    expected = set(policy.trainable_state_dict())
    source = EMA_FILE if ema else WEIGHTS_FILE
    if ema:
        state, meta = load_trainable(tag_dir / EMA_FILE)
    elif (tag_dir / WEIGHTS_FILE).is_file():
        state, meta = load_trainable(tag_dir / WEIGHTS_FILE)
    else:  # checkpoints written before the safetensors copy existed
        state, meta = load_from_deepspeed(tag_dir, expected), {}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{source} of {tag} does not match model.lora_rank="
                         f"{config.model.lora_rank}: missing {missing[:3]}, unexpected {extra[:3]}")
    policy.load_trainable_state_dict(state)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    base = Path(config.model.path)
    if whole:
        _write_pipeline(policy, out, lora, getattr(torch, dtype))
    else:
        _write_lora(policy, out, config, getattr(torch, dtype))
    for name in _CARRIED:
        if (base / name).is_file():
            shutil.copy(base / name, out / name)
    (out / "opgrpo_export.json").write_text(json.dumps({
        "run": run_dir.name, "checkpoint": tag, "weight_version": meta.get("version"),
        "weights": "ema" if ema else "live",
        "format": "pipeline" if whole else "diffusers_lora",
        "lora_rank": config.model.lora_rank, "lora_alpha": config.model.lora_alpha,
        "lora_fused": lora and whole, "dtype": dtype, "base_model": str(config.model.path),
        "pipeline_class": type(policy.pipeline).__name__}, indent=2) + "\n")
    return out


def _write_pipeline(policy: FlowPolicy, out: Path, lora: bool, dtype: torch.dtype) -> None:
    transformer = policy.transformer
    if lora:
        transformer.fuse_lora(lora_scale=1.0)  # W += B A * alpha / r, then drop the adapter
        transformer.unload_lora()
    policy.pipeline.transformer = transformer.to(dtype)
    policy.pipeline.save_pretrained(out, safe_serialization=True)


def _write_lora(policy: FlowPolicy, out: Path, config, dtype: torch.dtype) -> None:
    """The adapter in diffusers' LoRA layout (keys `transformer.<module>.lora_A.weight`), with
    its LoraConfig as metadata so `load_lora_weights` restores alpha / rank exactly."""
    from peft.utils import get_peft_model_state_dict

    layers = {k: v.detach().to(dtype).contiguous()
              for k, v in get_peft_model_state_dict(policy.transformer).items()}
    metadata = policy.transformer.peft_config["default"].to_dict()
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in metadata.items()}
    type(policy.pipeline).save_lora_weights(
        out, transformer_lora_layers=layers, weight_name=LORA_FILE, safe_serialization=True,
        transformer_lora_adapter_metadata=metadata)
