"""The policy wrapper on tiny random SD3 pipelines loaded back by path (nothing downloaded)."""

import json

import pytest
import torch

from opgrpo.models import FlowPolicy, check_model_dir


@pytest.fixture(scope="module")
def policy(tiny_sd3_dir):
    return FlowPolicy.from_pretrained(tiny_sd3_dir)


def test_loads_real_classes_by_path(policy):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    assert isinstance(policy.transformer, SD3Transformer2DModel)
    assert isinstance(policy.vae, AutoencoderKL)
    assert isinstance(policy.pipeline.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(policy.pipeline.text_encoder_3, T5EncoderModel)
    assert policy.latent_shape(32, 32) == (4, 16, 16)
    assert policy.vae_scale_factor == 2 and policy.default_image_size == 32


def test_prompt_embeddings_are_cached_and_match_the_pipeline(policy):
    first = policy.encode_prompts(["a red circle", "two blue squares", "a red circle"])
    assert len(policy._prompt_cache) >= 2
    assert torch.equal(first.prompt_embeds[0], first.prompt_embeds[2])
    embeds, _, pooled, _ = policy.pipeline.encode_prompt(
        "two blue squares", None, None, do_classifier_free_guidance=False,
        max_sequence_length=policy.max_sequence_length,
    )
    torch.testing.assert_close(first.prompt_embeds[1], embeds[0])
    torch.testing.assert_close(first.pooled[1], pooled[0])
    calls = []
    original = policy.pipeline.encode_prompt
    policy.pipeline.encode_prompt = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        policy.encode_prompts(["a red circle", "two blue squares"])
    finally:
        policy.pipeline.encode_prompt = original
    assert calls == []  # served from the cache


def test_guidance_combines_conditional_and_unconditional(policy):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = policy.encode_prompts(["a red circle", "a green triangle"])
    uncond = policy.encode_prompts(["", ""])
    with torch.no_grad():
        guided = policy.velocity(x, 0.6, cond, guidance_scale=3.0)
        v_c = policy.velocity(x, 0.6, cond, guidance_scale=1.0)
        v_u = policy.velocity(x, 0.6, uncond, guidance_scale=1.0)
    torch.testing.assert_close(guided, v_u + 3.0 * (v_c - v_u), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(v_c, v_u)


def test_decode_through_vae_gives_images_in_unit_range(policy):
    images = policy.decode(torch.randn(3, 4, 16, 16))
    assert images.shape == (3, 3, 32, 32)
    assert images.min() >= 0 and images.max() <= 1


def test_pixel_space_model_decodes_by_identity(tiny_pixel_dir):
    policy = FlowPolicy.from_pretrained(tiny_pixel_dir)
    assert policy.is_pixel_space and policy.latent_shape(32, 32) == (3, 32, 32)
    assert policy.default_image_size == 32
    x = torch.linspace(-1.5, 1.5, 3 * 32 * 32).reshape(1, 3, 32, 32)
    torch.testing.assert_close(policy.decode(x), (x / 2 + 0.5).clamp(0, 1))


def test_lora_trains_only_adapters_and_reference_turns_them_off(tiny_sd3_dir):
    base = FlowPolicy.from_pretrained(tiny_sd3_dir)
    lora = FlowPolicy.from_pretrained(tiny_sd3_dir, lora_rank=4)
    names = [n for n, p in lora.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any("to_q" in n for n in names) and any("to_out" in n for n in names)
    state = lora.trainable_state_dict()
    assert set(state) == set(names)
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    c = lora.encode_prompts(["a red circle"])
    with torch.no_grad():
        v_lora = lora.velocity(x, 0.5, c)
        with lora.reference():
            v_ref = lora.velocity(x, 0.5, c)
        v_base = base.velocity(x, 0.5, base.encode_prompts(["a red circle"]))
    torch.testing.assert_close(v_ref, v_base)
    assert not torch.allclose(v_lora, v_base, atol=1e-4)
    # pushing the adapter weights to another copy makes it identical
    other = FlowPolicy.from_pretrained(tiny_sd3_dir, lora_rank=4)
    other.load_trainable_state_dict(lora.trainable_state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other.velocity(x, 0.5, c), v_lora)


def test_full_finetune_reference_is_a_frozen_copy(tiny_sd3_dir):
    policy = FlowPolicy.from_pretrained(tiny_sd3_dir, keep_reference=True)
    assert len(policy.trainable_parameters()) == len(list(policy.transformer.parameters()))
    x = torch.randn(1, 4, 16, 16)
    c = policy.encode_prompts(["x"])
    with torch.no_grad():
        before = policy.velocity(x, 0.5, c)
        for p in policy.trainable_parameters():
            p.mul_(1.1)
        with policy.reference():
            ref = policy.velocity(x, 0.5, c)
    torch.testing.assert_close(ref, before)
    no_ref = FlowPolicy.from_pretrained(tiny_sd3_dir)
    with pytest.raises(RuntimeError, match="no reference policy"), no_ref.reference():
        pass


def test_bad_model_directories_are_named(tmp_path, tiny_sd3_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_model_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        check_model_dir(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        check_model_dir(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X"}))
    with pytest.raises(FileNotFoundError, match="transformer"):
        check_model_dir(tmp_path)


def test_pickled_weights_are_refused_not_loaded(tmp_path, tiny_sd3_dir):
    import shutil

    from safetensors.torch import load_file

    model = tmp_path / "pickled"
    shutil.copytree(tiny_sd3_dir, model)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), model / "transformer" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="safetensors weights only"):
        FlowPolicy.from_pretrained(model)


def test_image_size_must_fit_vae_and_patch(policy):
    with pytest.raises(ValueError, match="multiple of 4"):
        policy.latent_shape(30, 32)
