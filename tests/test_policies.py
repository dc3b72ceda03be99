"""The FLUX and Wan2.1 adapters on tiny random pipelines of the real diffusers classes, saved
with `save_pretrained` and loaded by path: each is checked against the diffusers pipeline's own
sampling and decoding, and the SDE and trajectory code on their latents (5-D for video)."""

import json

import numpy as np
import pytest
import torch

from actors.rewards import get_reward, score_frames
from opgrpo.images import to_uint8
from opgrpo.models import FlowPolicy
from opgrpo.policies.flux import FluxPolicy
from opgrpo.policies.sd3 import SD3Policy
from opgrpo.policies.wan import WanPolicy
from opgrpo.sampling import (
    SamplingSpec,
    rescore_transitions,
    sample_ode,
    sample_trajectories,
    trajectory_seed,
)
from opgrpo.tiny import save_tiny
from opgrpo.trajectory import decode_trajectories, encode_trajectories

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: save_tiny(family, root / family) for family in ("sd3", "flux", "wan")}


def _noise(shape, seeds):
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s))
                        for s in seeds])


def test_the_pipeline_class_picks_the_adapter(model_dirs, tmp_path):
    classes = {"sd3": SD3Policy, "flux": FluxPolicy, "wan": WanPolicy}
    for family, directory in model_dirs.items():
        assert type(FlowPolicy.from_pretrained(directory)) is classes[family]
    odd = tmp_path / "odd"
    (odd / "transformer").mkdir(parents=True)
    (odd / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="KandinskyPipeline.*not supported"):
        FlowPolicy.from_pretrained(odd)


def test_flux_ode_sampling_equals_the_diffusers_pipeline(model_dirs):
    """Same noise, same steps: our unpacked latents, sigma grid (dynamic shift), guidance
    embedding and VAE decode reproduce FluxPipeline's output."""
    from diffusers import FluxPipeline

    policy = FlowPolicy.from_pretrained(model_dirs["flux"])
    assert policy.guidance_embedded
    steps, guidance, seeds = 4, 3.5, [3, 4]
    ours = sample_ode(policy, PROMPTS, seeds, steps, guidance, 32, 32)
    shape = policy.latent_shape(32, 32)
    assert ours.shape == (2, *shape) == (2, 4, 16, 16)

    pipe = FluxPipeline.from_pretrained(model_dirs["flux"], local_files_only=True)
    packed = FluxPipeline._pack_latents(_noise(shape, seeds), 2, shape[0], *shape[1:])
    out = pipe(PROMPTS, height=32, width=32, num_inference_steps=steps,
               guidance_scale=guidance, latents=packed, output_type="latent",
               max_sequence_length=policy.max_sequence_length)[0]
    theirs = FluxPipeline._unpack_latents(out, 32, 32, pipe.vae_scale_factor)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(policy.sigmas(steps, 32, 32), pipe.scheduler.sigmas.float())

    images = pipe(PROMPTS, height=32, width=32, num_inference_steps=steps,
                  guidance_scale=guidance, latents=packed, output_type="pt",
                  max_sequence_length=policy.max_sequence_length)[0]
    torch.testing.assert_close(policy.decode(ours), images.float(), rtol=1e-3, atol=1e-4)


def test_flux_guidance_is_an_input_not_a_second_pass(model_dirs):
    policy = FlowPolicy.from_pretrained(model_dirs["flux"])
    calls = []
    policy.transformer.register_forward_hook(lambda *_: calls.append(1))
    x = _noise(policy.latent_shape(32, 32), [0, 1])
    embeds = policy.encode_prompts(PROMPTS)
    v1 = policy.velocity(x, 0.5, embeds, guidance_scale=1.0)
    v2 = policy.velocity(x, 0.5, embeds, guidance_scale=3.5)
    assert len(calls) == 2  # one forward each: no unconditional pass
    assert v1.shape == x.shape and not torch.allclose(v1, v2)


def test_wan_decode_equals_the_diffusers_pipeline(model_dirs):
    """The video path: (C, f, h, w) latents for num_frames frames; decoding with the VAE's
    latent mean/std gives WanPipeline's frames."""
    from diffusers import WanPipeline

    policy = FlowPolicy.from_pretrained(model_dirs["wan"], num_frames=5)
    shape = policy.latent_shape(32, 32)
    assert shape == (4, 3, 16, 16) and policy.is_video
    pipe = WanPipeline.from_pretrained(model_dirs["wan"], local_files_only=True)
    latents = _noise(shape, [5, 6])
    common = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 3,
              "guidance_scale": 1.0, "latents": latents, "max_sequence_length": 226}
    final = pipe(PROMPTS, output_type="latent", **common)[0]
    video = pipe(PROMPTS, output_type="pt", **common)[0]  # (B, F, 3, H, W) in [0, 1]
    ours = policy.decode(final)
    assert ours.shape == (2, 5, 3, 32, 32)
    torch.testing.assert_close(ours, video.float(), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(policy.sigmas(3), pipe.scheduler.sigmas.float())
    with pytest.raises(ValueError, match="model.num_frames"):
        FlowPolicy.from_pretrained(model_dirs["wan"], num_frames=4).latent_shape(32, 32)


@pytest.mark.parametrize("family,kwargs", [("flux", {}), ("wan", {"num_frames": 5})])
def test_sde_trajectories_rescore_and_round_trip(model_dirs, family, kwargs):
    """SDE trajectories of the unpacked latents: re-scoring the stored transitions gives the
    behaviour log-probs, and the Arrow codec keeps the latents' shape (5-D for video)."""
    policy = FlowPolicy.from_pretrained(model_dirs[family], lora_rank=4, **kwargs)
    spec = SamplingSpec(num_steps=3, noise_level=0.7, guidance_scale=3.5, height=32, width=32)
    seeds = [trajectory_seed(0, p) for p in PROMPTS]
    trajs = sample_trajectories(policy, PROMPTS, ["k0", "k1"], seeds, spec, version=0)
    assert trajs[0].latent_shape == policy.latent_shape(32, 32)
    again = rescore_transitions(policy, trajs, [0, 1, 2], spec)
    np.testing.assert_allclose(again, np.stack([t.behaviour_logprobs for t in trajs]),
                               rtol=1e-4, atol=1e-5)
    back = decode_trajectories(encode_trajectories(trajs, "bfloat16"))
    assert back[0].latents.shape == trajs[0].latents.shape
    # LoRA sits on the attention projections of both families, and `reference` is the base
    with torch.no_grad():
        for param in policy.trainable_parameters():
            param.normal_(0, 0.1)
    x = torch.from_numpy(np.stack([t.latents[0] for t in trajs]))
    embeds = policy.encode_prompts(PROMPTS)
    tuned = policy.velocity(x, 0.8, embeds, 3.5)
    with policy.reference():
        reference = policy.velocity(x, 0.8, embeds, 3.5)
    base = FlowPolicy.from_pretrained(model_dirs[family], **kwargs)
    torch.testing.assert_close(reference, base.velocity(x, 0.8, base.encode_prompts(PROMPTS),
                                                        3.5), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(tuned, reference, atol=1e-4)


def test_video_frames_are_scored_per_frame_and_averaged():
    spec = get_reward("shapes_partial")
    rng = np.random.default_rng(0)
    video = torch.from_numpy(rng.random((2, 3, 3, 32, 32), dtype=np.float32))
    uint8 = to_uint8(video)
    assert uint8.shape == (2, 3, 32, 32, 3)
    prompts = ["a red circle", "a blue square"]
    per_video = score_frames(spec, video, prompts)[spec.key]
    per_frame = [spec.score(video[:, f], prompts)[spec.key] for f in range(3)]
    np.testing.assert_allclose(per_video, np.mean(per_frame, axis=0))


SERVICE_CASES = [
    # FLUX with ZeRO-3, two optimizer steps per pass, gradient checkpointing and a replay
    ("flux", {}, {"zero_stage": 3, "optimizer_steps_per_pass": 2, "micro_batch_size": 2},
     {"gradient_checkpointing": True}),
    # Wan video (5 frames) with ZeRO-2
    ("wan", {}, {"zero_stage": 2}, {"num_frames": 5}),
]


@pytest.mark.slow
@pytest.mark.parametrize("family,_unused,learner,model", SERVICE_CASES,
                         ids=[c[0] for c in SERVICE_CASES])
def test_one_step_through_the_ray_service(model_dirs, tmp_path, family, _unused, learner,
                                          model):
    """A full iteration on the real service (Ray actors, embedded Redis, DeepSpeed ranks):
    rollout with replay, rewards on decoded images or frames, buffer, learner update, weight
    push; then an evaluation grid (a GIF for video), a checkpoint, and an export that loads
    back as the same family."""
    import ray

    from opgrpo.config import build_config
    from opgrpo.export import export_checkpoint
    from opgrpo.train import Trainer

    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    eval_file = tmp_path / "eval.jsonl"
    lines = (repo / "configs/shapes/test_metadata.jsonl").read_text().splitlines()[:2]
    eval_file.write_text("\n".join(lines) + "\n")
    data = {
        "model": {"path": str(model_dirs[family]), "height": 32, "width": 32,
                  "lora_rank": 4, **model},
        "sampling": {"num_steps": 3, "guidance_scale": 3.5, "eval_num_steps": 2},
        "rollout": {"num_actors": 1, "num_cpus": 0.5, "prompts_per_step": 4, "group_size": 2,
                    "chunk_size": 4},
        # weighted multi-reward: JPEG compressibility varies on random images, shapes is 0
        "reward": {"functions": {"jpeg": 1.0, "shapes_partial": 0.5}, "num_cpus": 0.25},
        "buffer": {"off_policy_fraction": 0.5, "truncate_step": 2},
        "learner": {"num_ranks": 2, "num_cpus": 0.5, "micro_batch_size": 4,
                    "kl_beta": 0.04, "learning_rate": 1e-3, **learner},
        # sync: step 2 replays step 1's winners (in async mode batch 2 is drawn before them)
        "train": {"num_steps": 2, "mode": "sync", "eval_every": 100, "eval_images_per_prompt": 1,
                  "prompts_file": str(repo / "configs/shapes/train_metadata.jsonl"),
                  "eval_prompts_file": str(eval_file)},
        "run": {"name": family, "output_dir": str(tmp_path), "seed": 0},
    }
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="opgrpo")
    try:
        trainer = Trainer(build_config(data), tmp_path / family)
        try:
            summary = trainer.run()
            weights = ray.get(trainer.rollout.workers[0].weights.remote())
        finally:
            trainer.shutdown()
    finally:
        ray.shutdown()
    rows = [json.loads(line) for line in (tmp_path / family / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["version"] == 2
    assert all(np.isfinite(r["loss/total"]) for r in rows)
    assert rows[-1]["buffer/size"] > 0  # the first step's winners were admitted
    assert rows[-1]["buffer/replayed_prompt_fraction"] > 0  # and replayed in the second
    assert "eval_before" in summary and "eval_last" in summary
    samples = tmp_path / family / "samples"
    assert (samples / "step00000.png").is_file()
    assert (samples / "step00000.gif").is_file() == (family == "wan")
    out = export_checkpoint(tmp_path / family, tmp_path / f"{family}-exported", fused=True)
    exported = FlowPolicy.from_pretrained(out, **({"num_frames": 5} if family == "wan" else {}))
    assert type(exported).__name__ == {"flux": "FluxPolicy", "wan": "WanPolicy"}[family]
    base = FlowPolicy.from_pretrained(model_dirs[family], lora_rank=4, **(
        {"num_frames": 5} if family == "wan" else {}))
    base.load_trainable_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    x = _noise(base.latent_shape(32, 32), [9])
    embeds = base.encode_prompts(["a circle"])
    torch.testing.assert_close(  # the export is the trained policy with LoRA fused in
        exported.velocity(x, 0.6, exported.encode_prompts(["a circle"])),
        base.velocity(x, 0.6, embeds), rtol=1e-3, atol=1e-4)
