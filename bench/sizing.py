"""What each Ray role holds for the shipped real-size configs, counted on the real classes (no
weights, no GPU needed).

For `sd35m_geneval` (SD3.5-Medium), `flux_pickscore` (FLUX.1-dev) and `wan21_ocr`
(Wan2.1-T2V-1.3B), every pipeline component is built on the meta device from its published
config with the diffusers / transformers class the service loads, in the dtype
`opgrpo.models.component_dtype` gives it, and handed to the family's policy class
(`SD3Policy`, `FluxPolicy`, `WanPolicy`) with the config's `model` section: the policy's own
code places the components, adds the LoRA adapter (float32) and decides what an offloaded text
encoder leaves in host memory. Parameters are then counted per component, per dtype and per
place (device or host), and summed per role:

- rollout actor: everything the policy holds on the device (LoRA included);
- learner rank (LoRA): the same policy plus the adapter's gradient, AdamW's two moments and
  DeepSpeed's float32 partition (one rank: an upper bound, ZeRO shards the last three);
- learner rank (full fine-tuning, SD3.5-M): bf16 weights and gradients, float32 master weights
  and AdamW moments sharded by ZeRO-2 / ZeRO-3, and the frozen bf16 KL reference copy;
- host memory: offloaded text encoders and the prompt-embedding cache at
  `model.prompt_cache_size`.

Also: the LoRA push per step, a LoRA checkpoint's size (the adapter in DeepSpeed's model file,
the safetensors copy `opgrpo export` reads, and the optimizer's float32 partition and two
moments: 20 bytes per trainable parameter, the layout `tests/test_learner_engine.py` checks
on a real engine) and one stored trajectory. Activations are not counted: they depend on the
GPU kernels and batch (`bench/gpu_check.py` measures peak memory on a GPU).

    python bench/sizing.py           # writes bench/results/sizing.json, prints the tables
    python bench/sizing.py --docs    # also rewrites the tables in docs/models-and-rewards.md and
                                     # deploy/README.md (between `sizing:` markers)
    python bench/sizing.py --check   # exits 1 when those tables differ from the counts
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GIB, MIB = 2**30, 2**20
CONFIGS = {"sd35m_geneval": "sd3", "flux_pickscore": "flux", "wan21_ocr": "wan"}
MODEL_NAMES = {"sd3": "SD3.5-M", "flux": "FLUX.1-dev", "wan": "Wan2.1-T2V-1.3B"}
DOCS = {"docs/models-and-rewards.md": "roles", "deploy/README.md": "sd35m"}
# Bytes per trainable LoRA parameter in a checkpoint: the adapter in DeepSpeed's model file
# (4), its safetensors copy (4), the optimizer's float32 partition (4) and two moments (8).
LORA_CHECKPOINT_BYTES = 20
# On a learner rank, per LoRA parameter beyond its weight: gradient (4), DeepSpeed's float32
# partition (4), AdamW moments (8).
LORA_TRAIN_BYTES = 16

# Published configs of the components.
SD35M_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
    "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm"}
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
          "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
          "projection_dim": 768, "hidden_act": "quick_gelu"}
CLIP_G = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120,
          "num_hidden_layers": 32, "num_attention_heads": 20, "max_position_embeddings": 77,
          "projection_dim": 1280, "hidden_act": "gelu"}
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
          "num_heads": 64, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False}
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 16,
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
       "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
       "use_quant_conv": False, "use_post_quant_conv": False, "scaling_factor": 1.5305,
       "shift_factor": 0.0609}
FLUX_DEV_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
FLUX_VAE = {**VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
WAN_1_3B_TRANSFORMER = {
    "patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128,
    "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
    "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-6}
UMT5_XXL = {"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
            "num_heads": 64, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False}
CLIP_L_TEXT = {k: v for k, v in CLIP_L.items() if k != "projection_dim"}


def build_components(family: str, dtype) -> dict:
    """{component: module} of a family's published pipeline on the meta device, each in the
    dtype `component_dtype` gives it for model dtype `dtype`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        AutoencoderKLWan,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        WanTransformer3DModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
        UMT5Config,
        UMT5EncoderModel,
    )

    from opgrpo.models import component_dtype

    makers = {
        "sd3": {
            "transformer": lambda: SD3Transformer2DModel(**SD35M_TRANSFORMER),
            "text_encoder": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
            "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
            "text_encoder_3": lambda: T5EncoderModel(T5Config(**T5_XXL)),
            "vae": lambda: AutoencoderKL(**VAE),
        },
        "flux": {
            "transformer": lambda: FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER),
            "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)),
            "text_encoder_2": lambda: T5EncoderModel(T5Config(**T5_XXL)),
            "vae": lambda: AutoencoderKL(**FLUX_VAE),
        },
        "wan": {
            "transformer": lambda: WanTransformer3DModel(**WAN_1_3B_TRANSFORMER),
            "text_encoder": lambda: UMT5EncoderModel(UMT5Config(**UMT5_XXL)),
            "vae": lambda: AutoencoderKLWan(),
        },
    }[family]
    with torch.device("meta"):
        return {name: as_loaded(make(), component_dtype(name, dtype))
                for name, make in makers.items()}


def as_loaded(module, dtype):
    """`module` cast to `dtype` as `from_pretrained(..., torch_dtype=dtype)` leaves it: the
    modules a class lists in `_keep_in_fp32_modules` stay float32 (diffusers: for any dtype;
    transformers: for float16)."""
    import torch
    from diffusers import ModelMixin

    module.to(dtype)
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    applies = dtype != torch.float32 if isinstance(module, ModelMixin) else (
        dtype == torch.float16)
    if keep and applies:
        for name, param in module.named_parameters():
            if any(k in name.split(".") for k in keep):
                param.data = param.data.float()
    return module


def meta_policy(family: str, model_config):
    """The family's policy class over meta-device components, built with a config's `model`
    section exactly as a rollout actor or learner rank builds it (without reading weights).
    Offloaded text encoders are placed on the device here (meta tensors cannot move to the
    host); `count_policy` puts them on the host by the same rule the policy uses."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from opgrpo.models import model_dtype
    from opgrpo.policies.flux import FluxPolicy
    from opgrpo.policies.sd3 import SD3Policy
    from opgrpo.policies.wan import WanPolicy

    components = build_components(family, model_dtype(model_config.dtype))
    pipeline = SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                               **components)
    if family == "wan":
        down = components["vae"].config.temperal_downsample
        pipeline.vae_scale_factor_spatial = 2 ** len(down)
        pipeline.vae_scale_factor_temporal = 2 ** sum(down)
    cls = {"sd3": SD3Policy, "flux": FluxPolicy, "wan": WanPolicy}[family]
    return cls(pipeline, dtype=model_config.dtype, device="meta",
               lora_rank=model_config.lora_rank, lora_alpha=model_config.lora_alpha,
               lora_target_modules=model_config.lora_target_modules,
               max_sequence_length=model_config.max_sequence_length,
               num_frames=model_config.num_frames)


def prompt_bytes(family: str, policy) -> int:
    """Bytes of one cached prompt (token embeddings + pooled embedding) in the model dtype."""
    size = policy.transformer.dtype.itemsize
    config = policy.transformer.config
    if family == "sd3":  # CLIP-L/G tokens (77) then T5 tokens; pooled CLIP-L + CLIP-G
        return size * ((77 + policy.max_sequence_length) * config.joint_attention_dim
                       + config.pooled_projection_dim)
    if family == "flux":  # T5 tokens; pooled CLIP-L
        return size * (policy.max_sequence_length * config.joint_attention_dim
                       + config.pooled_projection_dim)
    return size * policy.max_sequence_length * config.text_dim  # Wan: UMT5 tokens


def count_policy(policy, offload: bool) -> dict:
    """Per component: parameters and bytes per dtype, and where the component lives."""
    from opgrpo.models import is_text_encoder

    out: dict[str, dict] = {}
    named = [("transformer", policy.transformer), *policy._frozen_named_modules()]
    for name, module in named:
        by_dtype: dict[str, int] = {}
        for param in module.parameters():
            if param.requires_grad:
                continue  # the LoRA adapter, counted on its own
            key = str(param.dtype).removeprefix("torch.")
            by_dtype[key] = by_dtype.get(key, 0) + param.numel()
        out[name] = {
            "class": type(module).__name__,
            "parameters": sum(by_dtype.values()),
            "parameters_by_dtype": by_dtype,
            "bytes": sum(n * _itemsize(d) for d, n in by_dtype.items()),
            "where": "host" if offload and is_text_encoder(name) else "device",
        }
    lora = sum(p.numel() for p in policy.trainable_parameters()) if policy.lora_rank else 0
    if lora:
        out["lora"] = {"class": "peft LoRA", "parameters": lora,
                       "parameters_by_dtype": {"float32": lora}, "bytes": 4 * lora,
                       "where": "device"}
    return out


def _itemsize(dtype: str) -> int:
    import torch

    return getattr(torch, dtype).itemsize


def trajectory_bytes(policy, config) -> int:
    """One stored trajectory: T+1 latents at the storage dtype, plus T float32 log-probs."""
    import math

    latent = math.prod(policy.latent_shape(config.model.height, config.model.width))
    size = 2 if config.sampling.latent_storage_dtype == "bfloat16" else 4
    steps = config.sampling.num_steps
    return (steps + 1) * latent * size + 4 * steps


def full_finetune(transformer: int, others_device: int) -> dict[str, float]:
    """GiB per learner rank for full fine-tuning in bf16: weights 2 + gradients 2 + float32
    master 4 + AdamW moments 8 bytes per parameter; ZeRO-2 shards master, moments and
    gradients over the ranks, ZeRO-3 also the weights; a frozen bf16 copy is the KL reference;
    the other components as loaded."""
    out = {}
    for stage in (2, 3):
        for ranks in (1, 4, 8):
            weights = 2 * transformer / (ranks if stage == 3 else 1)
            sharded = (2 + 4 + 8) * transformer / ranks
            out[f"zero{stage}_{ranks}ranks"] = round(
                (weights + sharded + 2 * transformer + others_device) / GIB, 2)
    return out


def size_config(name: str) -> dict:
    from opgrpo.config import load_config

    config = load_config(ROOT / "configs" / f"{name}.yaml")
    family = CONFIGS[name]
    policy = meta_policy(family, config.model)
    offload = config.model.offload_text_encoders
    components = count_policy(policy, offload)
    device = sum(c["bytes"] for c in components.values() if c["where"] == "device")
    host = sum(c["bytes"] for c in components.values() if c["where"] == "host")
    lora = components.get("lora", {}).get("parameters", 0)
    per_prompt = prompt_bytes(family, policy)
    cache = per_prompt * config.model.prompt_cache_size
    result = {
        "config": f"configs/{name}.yaml",
        "model": MODEL_NAMES[family],
        "model_settings": {"dtype": config.model.dtype, "lora_rank": config.model.lora_rank,
                           "lora_target_modules": list(config.model.lora_target_modules),
                           "offload_text_encoders": offload,
                           "prompt_cache_size": config.model.prompt_cache_size,
                           "max_sequence_length": policy.max_sequence_length},
        "components": components,
        "device_GiB": {"rollout_actor": round(device / GIB, 2),
                       "learner_rank_lora": round((device + LORA_TRAIN_BYTES * lora) / GIB, 2)},
        "host_GiB_per_process": {
            "offloaded_text_encoders": round(host / GIB, 2),
            "prompt_cache_full": round(cache / GIB, 2)},
        "prompt_cache_MiB_per_prompt": round(per_prompt / MIB, 2),
        "lora": {"parameters": lora, "push_MiB_fp32": round(4 * lora / MIB, 1),
                 "checkpoint_MiB": round(LORA_CHECKPOINT_BYTES * lora / MIB, 1)},
        "trajectory_MiB": round(trajectory_bytes(policy, config) / MIB, 2),
    }
    if family == "sd3":
        transformer = components["transformer"]["parameters"]
        others = device - components["transformer"]["bytes"] - components["lora"]["bytes"]
        result["device_GiB"]["learner_rank_full_finetune"] = full_finetune(transformer, others)
        result["full_checkpoint_GiB"] = round(
            (2 + 4 + 8) * transformer / GIB, 2)  # bf16 weights + fp32 master + moments
    return result


def measure() -> dict:
    import platform

    import diffusers
    import torch
    import transformers

    return {"benchmark": "sizing",
            "what": "parameters of the real classes on the meta device (published configs), "
                    "placed by the policy classes with the shipped configs' model sections",
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__},
            "machine": platform.platform(),
            "configs": {name: size_config(name) for name in CONFIGS}}


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / GIB:.2f}"


def roles_table(result: dict) -> str:
    """docs/models-and-rewards.md: per shipped config, what one process holds."""
    lines = ["| config | on the GPU, rollout actor | on the GPU, learner rank (LoRA) | "
             "host, per process | LoRA push / checkpoint | trajectory |",
             "|---|---|---|---|---|---|"]
    for name, r in result["configs"].items():
        parts = ", ".join(f"{k} {_gib(c['bytes'])}" for k, c in r["components"].items()
                          if c["where"] == "device" and c["bytes"] >= GIB)
        host = r["host_GiB_per_process"]
        held = (f"{host['offloaded_text_encoders']:.2f} GiB encoders + " if
                host["offloaded_text_encoders"] else "")
        lines.append(
            f"| {r['model']} (`{name}`) | {r['device_GiB']['rollout_actor']:.2f} GiB ({parts}) "
            f"| {r['device_GiB']['learner_rank_lora']:.2f} GiB | {held}"
            f"{host['prompt_cache_full']:.2f} GiB prompt cache "
            f"({r['model_settings']['prompt_cache_size']} x "
            f"{r['prompt_cache_MiB_per_prompt']:.2f} MiB) "
            f"| {r['lora']['push_MiB_fp32']:.1f} / {r['lora']['checkpoint_MiB']:.1f} MiB "
            f"| {r['trajectory_MiB']:.2f} MiB |")
    return "\n".join(lines)


def sd35m_table(result: dict) -> str:
    """deploy/README: SD3.5-M per component and per role."""
    r = result["configs"]["sd35m_geneval"]
    lines = ["| component | class | parameters | dtype | GiB | where |",
             "|---|---|---|---|---|---|"]
    for name, c in r["components"].items():
        dtypes = ", ".join(f"{d} {n / 1e9:.3f} B" for d, n in c["parameters_by_dtype"].items())
        lines.append(f"| {name} | `{c['class']}` | {c['parameters'] / 1e9:.3f} B | {dtypes} | "
                     f"{_gib(c['bytes'])} | {c['where']} |")
    full = r["device_GiB"]["learner_rank_full_finetune"]
    lines += ["", "| role | GiB on the GPU before activations |", "|---|---|",
              f"| rollout actor | {r['device_GiB']['rollout_actor']:.2f} |",
              f"| learner rank, LoRA r{r['model_settings']['lora_rank']} "
              f"({r['lora']['parameters'] / 1e6:.1f} M parameters) | "
              f"{r['device_GiB']['learner_rank_lora']:.2f} |",
              f"| learner rank, full fine-tuning, ZeRO-2, 8 ranks | {full['zero2_8ranks']} |",
              f"| learner rank, full fine-tuning, ZeRO-3, 8 ranks | {full['zero3_8ranks']} |",
              "", f"A LoRA checkpoint: {r['lora']['checkpoint_MiB']:.1f} MiB (adapter, its "
              f"safetensors copy, optimizer state); a full fine-tuning checkpoint: "
              f"{r['full_checkpoint_GiB']:.2f} GiB. The prompt cache holds "
              f"{r['prompt_cache_MiB_per_prompt']:.2f} MiB per prompt in host memory "
              f"({r['host_GiB_per_process']['prompt_cache_full']:.2f} GiB at "
              f"`prompt_cache_size: {r['model_settings']['prompt_cache_size']}`)."]
    return "\n".join(lines)


def replace_block(text: str, key: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- sizing:{key} -->\n).*?(\n<!-- /sizing:{key} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"no <!-- sizing:{key} --> block")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def render_docs(result: dict) -> dict[str, str]:
    """{doc path: text with its sizing block regenerated}."""
    tables = {"roles": roles_table(result), "sd35m": sd35m_table(result)}
    return {doc: replace_block((ROOT / doc).read_text(), key, tables[key])
            for doc, key in DOCS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", action="store_true", help="rewrite the docs' sizing tables")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the docs' sizing tables differ from the counts")
    args = parser.parse_args(argv)
    result = measure()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sizing.json").write_text(json.dumps(result, indent=2) + "\n")
    print(roles_table(result), "\n", sd35m_table(result), sep="\n")
    stale = [doc for doc, text in render_docs(result).items()
             if text != (ROOT / doc).read_text()]
    if args.docs:
        for doc, text in render_docs(result).items():
            (ROOT / doc).write_text(text)
        print(f"rewrote the sizing tables of {', '.join(DOCS)}")
    elif args.check and stale:
        print(f"sizing tables out of date in {', '.join(stale)}: run python bench/sizing.py "
              "--docs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
