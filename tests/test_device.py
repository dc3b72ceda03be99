"""Device discipline without a GPU: every tensor of sampling, re-scoring, regeneration,
decoding, evaluation and the loss lives on the policy's device.

The policy is moved to PyTorch's `meta` device, a second device that every CPU build has: an
operator that mixes a meta tensor with a non-scalar CPU tensor raises ("Tensor on device cpu is
not on the expected device meta"), the check CUDA makes for a cpu/cuda mix, and like CUDA it
lets 0-dim CPU scalars through. Meta tensors carry shapes and no data, so these tests also
show that the hot paths never read a device value back (no `.item()`, no boolean indexing),
which on a GPU would be a synchronisation per step.

(PyTorch's `FakeTensorMode` with a fake `cuda` device was tried first: on a CPU-only build
Python indexing of a fake CUDA tensor raises "PyTorch is not linked with support for cuda
devices", and every diffusers transformer indexes.)

Tests that need a real GPU carry the `gpu` marker and skip without CUDA.
"""

import numpy as np
import pytest
import torch

from learner.loss import stats_to_floats
from learner.objective import LossSettings, MicroBatch, UpdateSize, accumulate_gradients
from opgrpo.images import to_uint8
from opgrpo.policies.flux import FluxPolicy
from opgrpo.policies.sd3 import SD3Policy
from opgrpo.policies.wan import WanPolicy
from opgrpo.sampling import (
    SamplingSpec,
    regenerate_tensors,
    rescore_tensors,
    sample_ode,
    sample_tensors,
    sample_trajectories,
)
from opgrpo.tiny import make_tiny_flux_pipeline, make_tiny_sd3_pipeline, make_tiny_wan_pipeline

META = torch.device("meta")
PROMPTS = ["a red cube", "two blue dogs"]
STEPS = 3


def _on_meta(policy, spec: SamplingSpec):
    """The policy with every module on the meta device. Prompt embeddings (the text encoders'
    output, prompts and CFG's empty prompt) are encoded first on the CPU: the cache keeps them
    in host memory and each batch moves them to the policy's device, which is what is checked
    here; the encoders themselves run in diffusers/transformers code."""
    policy.encode_prompts([*PROMPTS, ""])
    policy.sigmas(spec.num_steps, spec.height, spec.width)  # host metadata, computed once
    for module in (policy.transformer, *policy._frozen_modules()):
        module.to(META)
    policy.device = META
    return policy


POLICIES = {
    "sd3": lambda: SD3Policy(make_tiny_sd3_pipeline(seed=0, sample_size=32), lora_rank=4),
    "flux": lambda: FluxPolicy(make_tiny_flux_pipeline(seed=0), lora_rank=4),
    "wan": lambda: WanPolicy(make_tiny_wan_pipeline(seed=0), lora_rank=4, num_frames=5),
}


@pytest.fixture(scope="module", params=sorted(POLICIES))
def meta_case(request):
    """(policy on meta, spec, a stored CPU trajectory of that policy)."""
    policy = POLICIES[request.param]()
    guidance = 1.0 if policy.guidance_embedded else 4.5
    spec = SamplingSpec(STEPS, 0.7, guidance, 32, 32)
    stored = sample_trajectories(policy, PROMPTS, ["k0", "k1"], [1, 2], spec, version=0)
    return _on_meta(policy, spec), spec, stored


def test_sampling_stays_on_the_policy_device(meta_case):
    policy, spec, _ = meta_case
    latents, logps = sample_tensors(policy, PROMPTS, [1, 2], spec)
    assert latents.device == logps.device == META
    assert latents.shape[:2] == (2, STEPS + 1) and logps.shape == (2, STEPS)
    images = policy.decode(latents[:, -1])
    assert images.device == META and images.dtype == torch.float32
    final = sample_ode(policy, PROMPTS, [1, 2], STEPS, spec.guidance_scale, 32, 32)
    assert final.device == META


def test_rescoring_and_regeneration_move_stored_trajectories_to_the_device(meta_case):
    policy, spec, stored = meta_case
    scores = rescore_tensors(policy, stored, list(range(STEPS)), spec)
    assert scores.device == META and scores.shape == (2, STEPS)
    tail, tail_logps, prefix_old = regenerate_tensors(policy, stored, 2, [5, 6], spec)
    assert tail.device == tail_logps.device == prefix_old.device == META
    assert prefix_old.shape == (2, 2) and tail_logps.shape == (2, STEPS - 2)


def test_the_loss_and_its_gradients_stay_on_the_device(meta_case):
    policy, spec, stored = meta_case
    batch = MicroBatch.from_trajectories(stored, torch.tensor([1.0, -1.0]),
                                         torch.tensor([True, True]), device=policy.device)
    settings = LossSettings(kl_beta=0.04, timestep_fraction=1.0)
    # the update's sizes come from the host (the driver's valid flags), not from the device
    stats = accumulate_gradients(policy, batch, spec, settings, lambda loss: loss.backward(),
                                 update=UpdateSize(2.0, 2.0))
    assert {t.device for t in stats.values()} == {META}
    grads = [p.grad for p in policy.trainable_parameters()]
    assert grads and all(g is not None and g.device == META for g in grads)
    for p in policy.trainable_parameters():
        p.grad = None
    cpu_batch = MicroBatch.from_trajectories(stored, torch.tensor([1.0, -1.0]),
                                             torch.tensor([True, True]))
    with pytest.raises(ValueError, match="micro-batch is on cpu, the policy on meta"):
        accumulate_gradients(policy, cpu_batch, spec, settings, lambda loss: loss.backward(),
                             update=UpdateSize(2.0, 2.0))


def test_a_cpu_tensor_in_the_sde_step_is_caught():
    """The mechanism these tests rely on: a cpu/meta mix raises, as a cpu/cuda mix does."""
    with pytest.raises(RuntimeError, match="expected device"):
        torch.ones(2, 3, device=META) + torch.ones(2, 3)


def test_statistics_cross_to_the_host_once():
    stats = {"a": torch.tensor(0.25), "b": torch.tensor(float("nan"))}
    floats = stats_to_floats(stats)
    assert floats["a"] == 0.25 and np.isnan(floats["b"])
    assert all(type(v) is float for v in floats.values())


def test_images_are_quantised_before_they_leave_the_device():
    images = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    out = to_uint8(images)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 2, 3)
    assert out[0, 0, 0].tolist() == [0, 128, 255]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampling_on_cuda_matches_cpu():
    """On a GPU: the same seeds give the same noise (CPU generators), and CUDA trajectories
    agree with CPU ones up to float error."""
    spec = SamplingSpec(STEPS, 0.7, 4.5, 32, 32)
    cpu = SD3Policy(make_tiny_sd3_pipeline(seed=0, sample_size=32), lora_rank=4)
    gpu = SD3Policy(make_tiny_sd3_pipeline(seed=0, sample_size=32), lora_rank=4, device="cuda")
    a = sample_trajectories(cpu, PROMPTS, ["k0", "k1"], [1, 2], spec, 0)
    b = sample_trajectories(gpu, PROMPTS, ["k0", "k1"], [1, 2], spec, 0)
    np.testing.assert_allclose(a[0].latents[0], b[0].latents[0], atol=0)
    np.testing.assert_allclose(a[1].latents, b[1].latents, atol=1e-3)
