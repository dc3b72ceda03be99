"""Pretraining machinery on a few steps: reproducible, loadable, normalised latents, EMA."""

import json

import torch

from opgrpo.models import FlowPolicy
from tasks.shapes.pretrain import EMA, PretrainSettings, pretrain, set_latent_normalisation

TINY = PretrainSettings(seed=5, batch_size=8, vae_steps=3, flow_steps=3, dataset_size=64,
                        warmup_steps=1, num_layers=1)


def _weights(directory):
    policy = FlowPolicy.from_pretrained(directory)
    return {k: v.clone() for k, v in policy.transformer.state_dict().items()}, policy


def test_pretrain_writes_a_loadable_pipeline_and_is_reproducible(tmp_path):
    record = pretrain(tmp_path / "a", TINY)
    pretrain(tmp_path / "b", TINY)
    first, policy = _weights(tmp_path / "a")
    second, _ = _weights(tmp_path / "b")
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert policy.latent_shape(32, 32) == (8, 8, 8) and policy.default_image_size == 32
    assert policy.pipeline.text_encoder_3 is None
    embeds = policy.encode_prompts(["three blue circles", "a red square"])
    assert embeds.prompt_embeds.shape == (2, 16 + 1, 128)  # 16 CLIP tokens + 1 zero T5 token
    ids = policy.pipeline.tokenizer("three blue circles")["input_ids"]
    assert len(ids) == 5  # <start> three blue circles <end>: one token per word
    assert record["parameters"]["transformer"] > 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "pretrain_metrics.jsonl").open()]
    assert {r["stage"] for r in rows} == {"vae", "flow"}
    saved = json.loads((tmp_path / "a" / "pretrain_record.json").read_text())
    assert saved["settings"]["seed"] == 5


def test_latent_normalisation_is_stored_in_the_vae_config():
    from tasks.shapes.model import build_vae

    vae = build_vae()
    latents = torch.randn(500, 8, 8, 8) * 3 + 2
    normalised = set_latent_normalisation(vae, latents)
    assert abs(float(normalised.mean())) < 1e-4 and abs(float(normalised.std()) - 1) < 1e-4
    assert abs(vae.config.shift_factor - float(latents.mean())) < 1e-6
    assert abs(vae.config.scaling_factor - 1 / float(latents.std())) < 1e-6


def test_ema_tracks_parameters_with_warmup():
    layer = torch.nn.Linear(2, 2)
    ema = EMA([layer], decay=0.9)
    start = [p.detach().clone() for p in layer.parameters()]
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    ema.update(step=0)  # warm-up decay min(0.9, 1/10) = 0.1
    for shadow, s in zip(ema.shadow, start):
        torch.testing.assert_close(shadow, s + 0.9)
    ema.copy_to_params()
    for p, s in zip(layer.parameters(), start):
        torch.testing.assert_close(p, s + 0.9)
