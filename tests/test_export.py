"""`opgrpo export`: a checkpoint's trainable weights (safetensors) as a diffusers LoRA that
`load_lora_weights` puts on the base pipeline, or (fused / full fine-tuning) as a whole diffusers
pipeline; either gives the trained policy's outputs and samples."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from opgrpo.config import build_config, dump_config
from opgrpo.export import WEIGHTS_FILE, export_checkpoint
from opgrpo.models import FlowPolicy


def _fake_run(tmp_path, model_dir, lora_rank: int, step: int = 2, dtype: str = "float32"):
    """A run directory whose checkpoint holds trained-looking (perturbed) trainable weights,
    written the way learner rank 0 writes them; returns (run_dir, the trained policy)."""
    config = build_config({"model": {"path": str(model_dir), "lora_rank": lora_rank,
                                     "lora_alpha": 2.0 * lora_rank if lora_rank else None,
                                     "dtype": dtype}})
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / f"step{step}").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    torch.manual_seed(1)
    policy = FlowPolicy.from_pretrained(model_dir, lora_rank=lora_rank,
                                        lora_alpha=config.model.lora_alpha)
    with torch.no_grad():
        for param in policy.trainable_parameters():
            param.add_(0.05 * torch.randn_like(param))  # LoRA B starts at zero: make it act
    save_file({k: v.contiguous() for k, v in policy.trainable_state_dict().items()},
              str(run_dir / "checkpoints" / f"step{step}" / WEIGHTS_FILE), {"version": "7"})
    (run_dir / "checkpoints" / "latest.json").write_text(
        json.dumps({"step": step, "tag": f"step{step}", "version": 7}))
    return run_dir, policy


def _velocity(policy, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((2, *policy.latent_shape(32, 32)), generator=generator)
    embeds = policy.encode_prompts(["a red circle", "two blue squares"])
    with torch.no_grad():
        return policy.velocity(latents, torch.tensor([0.8, 0.3]), embeds)


def _diffusers_sample(pipe):
    """Plain diffusers sampling (its own scheduler and loop), no opgrpo code."""
    return pipe("a red circle", num_inference_steps=3, guidance_scale=2.0, height=32,
                width=32, generator=torch.Generator().manual_seed(0), output_type="np").images


def test_export_writes_a_diffusers_lora_that_load_lora_weights_reads(tmp_path, tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    from opgrpo.export import LORA_FILE

    run_dir, trained = _fake_run(tmp_path, tiny_sd3_dir, lora_rank=4)
    out = export_checkpoint(run_dir, tmp_path / "lora")
    assert sorted(p.name for p in out.iterdir()) == ["opgrpo_export.json", LORA_FILE]
    info = json.loads((out / "opgrpo_export.json").read_text())
    assert info["format"] == "diffusers_lora" and info["dtype"] == "float32"
    # the adapter alone: a fraction of the transformer
    transformer = sum(p.stat().st_size for p in (tiny_sd3_dir / "transformer").iterdir())
    assert (out / LORA_FILE).stat().st_size < transformer / 2
    # a diffusers pipeline of the base model with the exported LoRA samples as the policy
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    base_images = _diffusers_sample(pipe)
    pipe.load_lora_weights(out)
    trained.pipeline.set_progress_bar_config(disable=True)
    expected = _diffusers_sample(trained.pipeline)
    np.testing.assert_allclose(_diffusers_sample(pipe), expected, atol=1e-5)
    assert np.abs(base_images - expected).max() > 1e-3  # the adapter matters
    # lora_alpha (2 x rank here) travels as adapter metadata: the scale is alpha / r = 2
    loaded = FlowPolicy.from_pretrained(tiny_sd3_dir)
    loaded.load_lora(out)
    torch.testing.assert_close(_velocity(loaded), _velocity(trained), rtol=1e-4, atol=1e-5)


def test_fused_export_in_the_model_dtype(tmp_path, tiny_sd3_dir):
    run_dir, trained = _fake_run(tmp_path, tiny_sd3_dir, lora_rank=4, dtype="bfloat16")
    out = export_checkpoint(run_dir, tmp_path / "fused", fused=True)
    from safetensors import safe_open

    def on_disk(component):
        dtypes = set()
        for path in (out / component).glob("*.safetensors"):
            with safe_open(str(path), framework="pt") as f:
                dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
        return dtypes

    # as the service holds them: transformer and text encoders bf16, the VAE float32
    assert on_disk("transformer") == {"BF16"} and on_disk("text_encoder") == {"BF16"}
    assert on_disk("vae") == {"F32"}
    assert json.loads((out / "opgrpo_export.json").read_text())["lora_fused"]
    exported = FlowPolicy.from_pretrained(out, dtype="bfloat16")
    assert not any("lora" in name for name, _ in exported.transformer.named_parameters())
    torch.testing.assert_close(_velocity(exported).float(), _velocity(trained), rtol=0.05,
                               atol=0.02)  # bf16 weights against the float32 policy


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_export_reproduces_the_trained_policy(tmp_path, tiny_sd3_dir, lora_rank):
    run_dir, trained = _fake_run(tmp_path, tiny_sd3_dir, lora_rank)
    out = export_checkpoint(run_dir, tmp_path / "exported", fused=True)
    exported = FlowPolicy.from_pretrained(out)  # no LoRA: the adapter is fused
    assert not any("lora" in name for name, _ in exported.transformer.named_parameters())
    torch.testing.assert_close(_velocity(exported), _velocity(trained), rtol=1e-4, atol=1e-5)
    base = FlowPolicy.from_pretrained(tiny_sd3_dir)
    assert not torch.allclose(_velocity(base), _velocity(trained), atol=1e-3)
    info = json.loads((out / "opgrpo_export.json").read_text())
    assert info["checkpoint"] == "step2" and info["weight_version"] == "7"
    assert info["lora_fused"] == (lora_rank > 0)


def test_export_errors_name_the_problem(tmp_path, tiny_sd3_dir):
    run_dir, _ = _fake_run(tmp_path, tiny_sd3_dir, lora_rank=4)
    with pytest.raises(FileNotFoundError, match=r"step5 does not exist; checkpoints: \['step2'\]"):
        export_checkpoint(run_dir, tmp_path / "a", step=5)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        export_checkpoint(tmp_path / "nowhere", tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_checkpoint(run_dir, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"  # nothing lost
    # LoRA weights against a config that says full fine-tuning
    config = build_config({"model": {"path": str(tiny_sd3_dir), "lora_rank": 0}})
    (run_dir / "config.yaml").write_text(dump_config(config))
    with pytest.raises(ValueError, match="does not match model.lora_rank=0"):
        export_checkpoint(run_dir, tmp_path / "b")


def test_export_command_output_evaluates(tmp_path, tiny_sd3_dir):
    """As a user runs it: `opgrpo export`, then `opgrpo eval --model` on the result."""
    run_dir, _ = _fake_run(tmp_path, tiny_sd3_dir, lora_rank=4)
    out = tmp_path / "exported"

    def opgrpo(*args):
        return subprocess.run([sys.executable, "-m", "opgrpo", *args], capture_output=True,
                              text=True, timeout=300)

    done = opgrpo("export", str(run_dir), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "load_lora_weights" in done.stdout
    again = opgrpo("export", str(run_dir), "--out", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr
    missing = opgrpo("export", str(run_dir), "--out", str(tmp_path / "x"), "--step", "9")
    assert missing.returncode == 2 and "step9 does not exist" in missing.stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    evaluated = opgrpo("eval", "--model", str(tiny_sd3_dir), "--lora", str(out), "--prompts",
                       str(prompts), "--reward", "shapes_partial", "--steps", "2",
                       "--n-per-prompt", "2")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "partial" in json.loads(evaluated.stdout.strip().splitlines()[-1])
