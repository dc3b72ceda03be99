"""Trajectory record and its Arrow IPC codec (no pickle, float32 or bfloat16 latents)."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from opgrpo.trajectory import (
    ARROW_SCHEMA,
    Trajectory,
    bfloat16_bits_to_float32,
    decode_trajectories,
    encode_trajectories,
    float32_to_bfloat16_bits,
)


def _trajectory(seed=0, steps=5, replayed=False):
    rng = np.random.default_rng(seed)
    mask = np.zeros(steps, dtype=bool)
    if replayed:
        mask[:3] = True
    return Trajectory(
        prompt_key=f"k{seed}",
        prompt=f"prompt number {seed}",
        latents=rng.standard_normal((steps + 1, 4, 8, 8)).astype(np.float32),
        sigmas=np.linspace(1, 0, steps + 1),
        behaviour_logprobs=rng.standard_normal(steps),
        old_logprobs=rng.standard_normal(steps) if replayed else None,
        off_policy_mask=mask,
        behaviour_version=3 + seed,
        noise_level=0.7,
        seed=1234 + seed,
        reward=0.25 * seed,
        replayed=replayed,
        extras={"rollout_version": 7.0},
    )


def test_float32_roundtrip_is_exact():
    trajs = [_trajectory(0), _trajectory(1, replayed=True)]
    back = decode_trajectories(encode_trajectories(trajs, "float32"))
    assert len(back) == 2
    for a, b in zip(trajs, back):
        assert np.array_equal(a.latents, b.latents)
        assert np.array_equal(a.behaviour_logprobs, b.behaviour_logprobs)
        assert np.array_equal(a.off_policy_mask, b.off_policy_mask)
        assert a.prompt_key == b.prompt_key and a.prompt == b.prompt
        assert a.behaviour_version == b.behaviour_version and a.seed == b.seed
        assert a.reward == b.reward and a.replayed == b.replayed and a.extras == b.extras
    assert back[0].old_logprobs is None
    assert np.array_equal(back[1].old_logprobs, trajs[1].old_logprobs)


def test_bfloat16_storage_halves_latents_and_keeps_logprobs_exact():
    traj = _trajectory(2)
    full = encode_trajectories([traj], "float32")
    half = encode_trajectories([traj], "bfloat16")
    saved = len(full) - len(half)
    assert abs(saved - traj.latents.nbytes // 2) <= 64  # only the latents shrink, by half
    back = decode_trajectories(half)[0]
    assert np.array_equal(back.behaviour_logprobs, traj.behaviour_logprobs)
    np.testing.assert_allclose(back.latents, traj.latents, rtol=2**-8, atol=1e-30)


def test_bfloat16_rounding_matches_torch():
    values = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 100
    values[:4] = [0.0, -0.0, np.inf, -np.inf]
    ours = float32_to_bfloat16_bits(values)
    reference = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    assert np.array_equal(ours.view(np.int16), reference)
    back = bfloat16_bits_to_float32(ours)
    assert np.array_equal(back, torch.from_numpy(values).to(torch.bfloat16).float().numpy())


def test_refuses_foreign_bytes_and_other_schema_versions():
    with pytest.raises(ValueError, match="Arrow IPC"):
        decode_trajectories(b"\x80\x04not arrow at all")
    other = ARROW_SCHEMA.with_metadata({"schema": "something/else"})
    table = pa.Table.from_batches([], schema=other)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, other) as writer:
        writer.write_table(table)
    with pytest.raises(ValueError, match="schema"):
        decode_trajectories(sink.getvalue().to_pybytes())


def test_inconsistent_shapes_are_refused():
    with pytest.raises(ValueError, match="latents"):
        Trajectory("k", "p", np.zeros((3, 2)), np.zeros(3), np.zeros(5), 0, 0.7, 0)
    with pytest.raises(ValueError, match="off_policy_mask"):
        Trajectory("k", "p", np.zeros((3, 2)), np.zeros(3), np.zeros(2), 0, 0.7, 0,
                   off_policy_mask=np.zeros(4, dtype=bool))


def test_derived_properties():
    traj = _trajectory(0, replayed=True)
    assert traj.num_steps == 5 and traj.latent_shape == (4, 8, 8)
    assert traj.num_off_policy_steps == 3
