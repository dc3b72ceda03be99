"""`model.init_lora`: training starts from an existing LoRA, loaded INTO the trainable adapter of
the learner's and the rollout actors' policies (both build it with `FlowPolicy.from_config`),
from what `opgrpo export` writes (diffusers' format) or what peft's `save_pretrained` writes
(Flow-GRPO's checkpoints)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from opgrpo.config import ConfigError, build_config, dump_config
from opgrpo.export import LORA_FILE, WEIGHTS_FILE, export_checkpoint
from opgrpo.models import FlowPolicy

# Flow-GRPO's train_sd3.py targets (peft matches them as suffixes)
FLOW_GRPO_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                     "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]


def _perturb(params, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.add_(0.05 * torch.randn_like(param))  # LoRA B starts at zero: make it act


def _exported_lora(tmp_path, model_dir, rank=4, alpha=8.0):
    """`opgrpo export` of a run whose checkpoint holds perturbed LoRA weights (rank 4, alpha
    8: the scale 2 must travel with the file); returns (the LoRA directory, trained policy)."""
    config = build_config({"model": {"path": str(model_dir), "lora_rank": rank,
                                     "lora_alpha": alpha}})
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step1").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    trained = FlowPolicy.from_pretrained(model_dir, lora_rank=rank, lora_alpha=alpha)
    _perturb(trained.trainable_parameters(), seed=1)
    save_file({k: v.contiguous() for k, v in trained.trainable_state_dict().items()},
              str(run_dir / "checkpoints" / "step1" / WEIGHTS_FILE))
    (run_dir / "checkpoints" / "latest.json").write_text(json.dumps({"step": 1, "tag": "step1"}))
    out = export_checkpoint(run_dir, tmp_path / "lora")
    assert (out / LORA_FILE).is_file()
    return out, trained


def _velocity(policy, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((2, *policy.latent_shape(32, 32)), generator=generator)
    embeds = policy.encode_prompts(["a red circle", "two blue squares"])
    with torch.no_grad():
        return policy.velocity(latents, torch.tensor([0.8, 0.3]), embeds)


def _config(model_dir, lora, **model):
    return build_config({"model": {"path": str(model_dir), "lora_rank": 4, "lora_alpha": 8.0,
                                   "init_lora": str(lora), **model}})


def test_training_starts_from_an_exported_lora(tmp_path, tiny_sd3_dir):
    from actors.rollout import RolloutWorker

    lora, trained = _exported_lora(tmp_path, tiny_sd3_dir)
    config = _config(tiny_sd3_dir, lora)
    # the learner's construction (learner/worker.py)
    policy = FlowPolicy.from_config(config, keep_reference=False, gradient_checkpointing=True)
    expected = trained.trainable_state_dict()
    got = policy.trainable_state_dict()
    assert set(got) == set(expected)  # the one trainable adapter, no second one
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)
    assert all(p.requires_grad and p.dtype == torch.float32
               for p in policy.trainable_parameters())
    torch.testing.assert_close(_velocity(policy), _velocity(trained), rtol=1e-5, atol=1e-6)
    fresh = FlowPolicy.from_config(build_config({"model": {
        "path": str(tiny_sd3_dir), "lora_rank": 4, "lora_alpha": 8.0}}))
    assert not torch.allclose(_velocity(fresh), _velocity(policy), atol=1e-3)
    with policy.reference():  # the KL reference is the base model, as with a fresh adapter
        torch.testing.assert_close(_velocity(policy), _velocity(fresh), rtol=1e-5, atol=1e-6)
    # a rollout actor builds the same policy from the config it is sent
    rollout = RolloutWorker(config.model_dump(mode="json"))
    for name, value in rollout.policy.trainable_state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)


def test_a_peft_checkpoint_as_flow_grpo_saves_it(tmp_path, tiny_sd3_dir):
    """Flow-GRPO: get_peft_model(transformer, LoraConfig(...)), later
    transformer.save_pretrained(checkpoint-N/lora) (adapter_model.safetensors + config)."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, get_peft_model

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3_dir / "transformer")
    peft_model = get_peft_model(transformer, LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=FLOW_GRPO_TARGETS))
    _perturb([p for n, p in peft_model.named_parameters() if "lora_" in n], seed=2)
    peft_model.save_pretrained(tmp_path / "checkpoint-60" / "lora")
    saved = {n.removeprefix("base_model.model.").replace(".default", ""): p.detach()
             for n, p in peft_model.named_parameters() if "lora_" in n}
    config = _config(tiny_sd3_dir, tmp_path / "checkpoint-60" / "lora",
                     lora_target_modules=FLOW_GRPO_TARGETS)
    policy = FlowPolicy.from_config(config)
    got = {n.replace(".default", ""): v for n, v in policy.trainable_state_dict().items()}
    assert set(got) == set(saved)
    for name, value in saved.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)


def test_mismatches_are_errors_naming_the_setting(tmp_path, tiny_sd3_dir):
    lora, _ = _exported_lora(tmp_path, tiny_sd3_dir)
    with pytest.raises(ValueError, match=r"its rank is 4, model.lora_rank 2"):
        FlowPolicy.from_config(_config(tiny_sd3_dir, lora, lora_rank=2, lora_alpha=4.0))
    with pytest.raises(ValueError, match=r"its lora_alpha is 8.0, model.lora_alpha 4.0"):
        FlowPolicy.from_config(_config(tiny_sd3_dir, lora, lora_alpha=4.0))
    with pytest.raises(ValueError, match=r"not those of model.lora_target_modules .*"
                                         r"its target modules: \["):
        FlowPolicy.from_config(_config(tiny_sd3_dir, lora, lora_target_modules=["to_q"]))


def test_config_checks_the_directory_and_the_rank(tmp_path, tiny_sd3_dir):
    with pytest.raises(ConfigError, match=r"model.init_lora: .*directory .*nowhere does not "
                                          r"exist"):
        _config(tiny_sd3_dir, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "pytorch_lora_weights.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match=r"model.init_lora: .*holds no \*.safetensors file"):
        _config(tiny_sd3_dir, tmp_path / "empty")
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"model.init_lora needs model.lora_rank > 0"):
        _config(tiny_sd3_dir, tmp_path / "ok", lora_rank=0)
    config = build_config({"model": {"path": str(tiny_sd3_dir), "lora_rank": 4,
                                     "init_lora": str(tmp_path / "ok")}})
    assert config.model.init_lora == str((tmp_path / "ok").resolve())
