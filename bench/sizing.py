"""Memory sizing for SD3.5-Medium, FLUX.1-dev and Wan2.1-T2V-1.3B, counted on the real classes
(no weights, no GPU needed).

Every component of the SD3.5-M pipeline is built on the meta device from its published config
with the diffusers / transformers class the service loads, and its parameters are counted. From
the counts: the bytes each Ray role holds (rollout actor, learner rank) in bf16, the LoRA
adapter with its AdamW state, full fine-tuning under ZeRO-2/3, and one stored trajectory.
Activations are not included: they depend on the GPU kernels and are measured on a GPU.

    python bench/sizing.py      # writes bench/results/sizing_sd35m.json and sizing_models.json
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30

# Published configs of the SD3.5-Medium pipeline's components.
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
       "use_quant_conv": False, "use_post_quant_conv": False}


FLUX_DEV_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
WAN_1_3B_TRANSFORMER = {
    "patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128,
    "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
    "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-6}
UMT5_XXL = {"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
            "num_heads": 64, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False}
CLIP_L_TEXT = {k: v for k, v in CLIP_L.items() if k != "projection_dim"}


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def components() -> dict[str, int]:
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        return {
            "transformer": count(SD3Transformer2DModel(**SD35M_TRANSFORMER)),
            "text_encoder (CLIP-L)": count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L))),
            "text_encoder_2 (CLIP-G)": count(CLIPTextModelWithProjection(
                CLIPTextConfig(**CLIP_G))),
            "text_encoder_3 (T5-XXL)": count(T5EncoderModel(T5Config(**T5_XXL))),
            "vae": count(AutoencoderKL(**VAE)),
        }


def lora_parameters(rank: int, targets: list[str]) -> int:
    import torch
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    with torch.device("meta"):
        model = SD3Transformer2DModel(**SD35M_TRANSFORMER)
    model = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets), model)
    return sum(t.numel() for t in get_peft_model_state_dict(model).values())


def families() -> dict[str, dict[str, int]]:
    """Parameters per component of FLUX.1-dev and Wan2.1-T2V-1.3B."""
    import torch
    from diffusers import (
        AutoencoderKL,
        AutoencoderKLWan,
        FluxTransformer2DModel,
        WanTransformer3DModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        T5Config,
        T5EncoderModel,
        UMT5Config,
        UMT5EncoderModel,
    )

    with torch.device("meta"):
        return {
            "flux1_dev": {
                "transformer": count(FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)),
                "text_encoder (CLIP-L)": count(CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))),
                "text_encoder_2 (T5-XXL)": count(T5EncoderModel(T5Config(**T5_XXL))),
                "vae": count(AutoencoderKL(**VAE)),
            },
            "wan21_t2v_1_3b": {
                "transformer": count(WanTransformer3DModel(**WAN_1_3B_TRANSFORMER)),
                "text_encoder (UMT5-XXL)": count(UMT5EncoderModel(UMT5Config(**UMT5_XXL))),
                "vae": count(AutoencoderKLWan()),
            },
        }


def role_table(params: dict[str, int], lora: int) -> dict:
    weights = 2 * sum(params.values())
    return {"parameters": params,
            "bf16_GiB": {k: round(2 * v / GIB, 2) for k, v in params.items()},
            "all_weights_bf16_GiB": round(weights / GIB, 2),
            "lora_r32": {"parameters": lora, "push_MiB_fp32": round(4 * lora / 2**20, 1)},
            "rollout_actor_GiB_before_activations": round(weights / GIB, 2),
            "learner_rank_lora_GiB_before_activations": round((weights + 16 * lora) / GIB, 2)}


def lora_parameters_of(model_cls, config: dict, rank: int = 32) -> int:
    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    with torch.device("meta"):
        model = model_cls(**config)
    model = inject_adapter_in_model(LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), model)
    return sum(t.numel() for t in get_peft_model_state_dict(model).values())


def main_families() -> None:
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel

    counted = families()
    result = {
        "benchmark": "sizing_models",
        "what": "parameters of the real classes on the meta device, published configs",
        "flux1_dev": role_table(counted["flux1_dev"], lora_parameters_of(
            FluxTransformer2DModel, FLUX_DEV_TRANSFORMER)),
        "wan21_t2v_1_3b": role_table(counted["wan21_t2v_1_3b"], lora_parameters_of(
            WanTransformer3DModel, WAN_1_3B_TRANSFORMER)),
    }
    # Wan2.1 at 240x416, 33 frames: latents 16 x 9 x 30 x 52; 21 points for 20 SDE steps.
    result["wan21_t2v_1_3b"]["trajectory_MiB_float32_240x416x33f_20steps"] = round(
        21 * 16 * 9 * 30 * 52 * 4 / 2**20, 2)
    # FLUX at 512 px, 6 SDE steps: latents 16 x 64 x 64, 7 points.
    result["flux1_dev"]["trajectory_MiB_float32_512px_6steps"] = round(
        7 * 16 * 64 * 64 * 4 / 2**20, 2)
    out = RESULTS / "sizing_models.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


def main() -> None:
    params = components()
    bf16 = {name: 2 * n for name, n in params.items()}
    all_weights = sum(bf16.values())
    lora = lora_parameters(32, ["to_q", "to_k", "to_v", "to_out.0"])
    # LoRA in fp32 (weights 4 + gradients 4 + AdamW moments 8 bytes per parameter).
    lora_train = 16 * lora
    n_transformer = params["transformer"]
    # Full fine-tuning in mixed precision: bf16 weights 2 + bf16 grads 2 + fp32 master 4 +
    # AdamW moments 8 = 16 bytes per parameter; ZeRO-2 shards grads, master and moments over
    # the ranks, ZeRO-3 also the bf16 weights. The KL reference is a frozen bf16 copy.
    def full_per_rank(ranks: int, stage: int) -> int:
        weights = 2 * n_transformer / (ranks if stage == 3 else 1)
        return int(weights + 14 * n_transformer / ranks + 2 * n_transformer)
    # One trajectory at 512 px, 10 SDE steps: 11 latents of 16 x 64 x 64, log-probs, embeds.
    latent = 16 * 64 * 64
    trajectory = {"float32": 11 * latent * 4, "bfloat16": 11 * latent * 2}
    others = all_weights - bf16["transformer"]
    result = {
        "benchmark": "sizing_sd35m",
        "what": "parameters of the real classes on the meta device, published configs",
        "machine": platform.platform(),
        "parameters": params,
        "bf16_GiB": {k: round(v / GIB, 2) for k, v in bf16.items()},
        "all_weights_bf16_GiB": round(all_weights / GIB, 2),
        "lora_r32_attention": {"parameters": lora,
                               "push_MiB_fp32": round(4 * lora / 2**20, 1),
                               "train_state_GiB": round(lora_train / GIB, 2)},
        "rollout_actor_GiB_before_activations": round(all_weights / GIB, 2),
        "learner_rank_lora_GiB_before_activations": round((all_weights + lora_train) / GIB, 2),
        "learner_rank_full_GiB_before_activations": {
            f"zero{stage}_{ranks}ranks": round((full_per_rank(ranks, stage) + others) / GIB, 2)
            for stage in (2, 3) for ranks in (1, 4, 8)},
        "trajectory_MiB": {k: round(v / 2**20, 2) for k, v in trajectory.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "sizing_sd35m.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
    main_families()
