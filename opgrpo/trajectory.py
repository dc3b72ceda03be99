"""The trajectory record and its Arrow schema: the one definition of every trajectory field.

A trajectory travels between rollout actors, the replay buffer (Redis) and the learner. Its
storage form is Arrow IPC bytes, never pickle, so nothing read back from a store can run code.
Latents may be stored as bfloat16 (raw upper 16 bits of float32, round-to-nearest-even) to halve
their size; log-probabilities always stay float32 because ratios of 1e-4 must survive.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = "opgrpo.trajectory/1"
LatentDtype = Literal["float32", "bfloat16"]


@dataclass
class Trajectory:
    """One SDE trajectory x_0 (noise) ... x_T of one prompt.

    latents:            (T+1, *latent_shape) float32.
    sigmas:             (T+1,) the sigma grid the trajectory was sampled on.
    behaviour_logprobs: (T,) log mu(x_{t+1} | x_t) under the policy that drew each step.
    old_logprobs:       (T,) log pi_old(x_{t+1} | x_t) under this iteration's rollout weights;
                        equal to behaviour_logprobs for fresh steps, re-scored for replayed ones.
    off_policy_mask:    (T,) True for steps drawn by an older policy than pi_old (the kept
                        prefix of a replayed trajectory).
    behaviour_version:  weight version of the policy that drew the off-policy steps (or all
                        steps for a fresh trajectory).
    """

    prompt_key: str
    prompt: str
    latents: np.ndarray
    sigmas: np.ndarray
    behaviour_logprobs: np.ndarray
    behaviour_version: int
    noise_level: float
    seed: int
    reward: float = float("nan")
    replayed: bool = False
    off_policy_mask: np.ndarray | None = None
    old_logprobs: np.ndarray | None = None
    extras: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.latents = np.asarray(self.latents, dtype=np.float32)
        self.sigmas = np.asarray(self.sigmas, dtype=np.float32)
        self.behaviour_logprobs = np.asarray(self.behaviour_logprobs, dtype=np.float32)
        steps = self.num_steps
        if self.latents.shape[0] != steps + 1 or self.sigmas.shape != (steps + 1,):
            raise ValueError(
                f"trajectory {self.prompt_key!r}: {steps} log-probs need {steps + 1} latents and "
                f"sigmas, got {self.latents.shape[0]} and {self.sigmas.shape[0]}"
            )
        if self.off_policy_mask is None:
            self.off_policy_mask = np.zeros(steps, dtype=bool)
        self.off_policy_mask = np.asarray(self.off_policy_mask, dtype=bool)
        if self.old_logprobs is not None:
            self.old_logprobs = np.asarray(self.old_logprobs, dtype=np.float32)
        for name in ("off_policy_mask", "old_logprobs"):
            value = getattr(self, name)
            if value is not None and value.shape != (steps,):
                raise ValueError(
                    f"trajectory {self.prompt_key!r}: {name} must have shape ({steps},)"
                )

    @property
    def num_steps(self) -> int:
        return int(self.behaviour_logprobs.shape[0])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape[1:])

    @property
    def rollout_version(self) -> int:
        """Weight version of the rollout actor that drew the fresh steps (all steps of a fresh
        trajectory, the regenerated tail of a replayed one)."""
        return int(self.extras.get("rollout_version", self.behaviour_version))

    @property
    def num_off_policy_steps(self) -> int:
        return int(self.off_policy_mask.sum())

    def with_updates(self, **changes) -> Trajectory:
        return replace(self, **changes)


ARROW_SCHEMA = pa.schema(
    [
        pa.field("prompt_key", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("latents", pa.large_binary(), nullable=False),
        pa.field("latent_dtype", pa.string(), nullable=False),
        pa.field("latent_shape", pa.list_(pa.int32()), nullable=False),
        pa.field("sigmas", pa.list_(pa.float32()), nullable=False),
        pa.field("behaviour_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("old_logprobs", pa.list_(pa.float32()), nullable=True),
        pa.field("off_policy_mask", pa.list_(pa.bool_()), nullable=False),
        pa.field("behaviour_version", pa.int64(), nullable=False),
        pa.field("noise_level", pa.float32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("reward", pa.float64(), nullable=False),
        pa.field("replayed", pa.bool_(), nullable=False),
        pa.field("extras", pa.map_(pa.string(), pa.float64()), nullable=False),
    ],
    metadata={"schema": SCHEMA_VERSION},
)


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the 16-bit patterns."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = np.where(np.isnan(values), bits | np.uint32(0x00400000), bits + rounding)
    return (rounded >> 16).astype(np.uint16)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _encode_latents(latents: np.ndarray, dtype: LatentDtype) -> bytes:
    if dtype == "float32":
        return np.ascontiguousarray(latents, dtype=np.float32).tobytes()
    if dtype == "bfloat16":
        return float32_to_bfloat16_bits(latents).tobytes()
    raise ValueError(f"latent dtype must be 'float32' or 'bfloat16', got {dtype!r}")


def _decode_latents(blob: bytes, dtype: str, shape: list[int]) -> np.ndarray:
    if dtype == "float32":
        return np.frombuffer(blob, dtype=np.float32).reshape(shape).copy()
    if dtype == "bfloat16":
        return bfloat16_bits_to_float32(np.frombuffer(blob, dtype=np.uint16)).reshape(shape)
    raise ValueError(f"stored latent dtype {dtype!r} is not one this version can read")


def to_record_batch(trajectories: list[Trajectory], latent_dtype: LatentDtype) -> pa.RecordBatch:
    columns: dict[str, list] = {name: [] for name in ARROW_SCHEMA.names}
    for traj in trajectories:
        columns["prompt_key"].append(traj.prompt_key)
        columns["prompt"].append(traj.prompt)
        columns["latents"].append(_encode_latents(traj.latents, latent_dtype))
        columns["latent_dtype"].append(latent_dtype)
        columns["latent_shape"].append(list(traj.latents.shape))
        columns["sigmas"].append(traj.sigmas)
        columns["behaviour_logprobs"].append(traj.behaviour_logprobs)
        columns["old_logprobs"].append(traj.old_logprobs)
        columns["off_policy_mask"].append(traj.off_policy_mask)
        columns["behaviour_version"].append(traj.behaviour_version)
        columns["noise_level"].append(traj.noise_level)
        columns["seed"].append(traj.seed)
        columns["reward"].append(traj.reward)
        columns["replayed"].append(traj.replayed)
        columns["extras"].append(list(traj.extras.items()))
    return pa.RecordBatch.from_pydict(columns, schema=ARROW_SCHEMA)


def from_record_batch(batch: pa.RecordBatch | pa.Table) -> list[Trajectory]:
    version = (batch.schema.metadata or {}).get(b"schema", b"").decode()
    if version != SCHEMA_VERSION:
        raise ValueError(f"trajectory data has schema {version!r}, expected {SCHEMA_VERSION!r}")
    rows = batch.to_pylist()
    out = []
    for row in rows:
        old = row["old_logprobs"]
        out.append(
            Trajectory(
                prompt_key=row["prompt_key"],
                prompt=row["prompt"],
                latents=_decode_latents(row["latents"], row["latent_dtype"], row["latent_shape"]),
                sigmas=np.asarray(row["sigmas"], dtype=np.float32),
                behaviour_logprobs=np.asarray(row["behaviour_logprobs"], dtype=np.float32),
                old_logprobs=None if old is None else np.asarray(old, dtype=np.float32),
                off_policy_mask=np.asarray(row["off_policy_mask"], dtype=bool),
                behaviour_version=row["behaviour_version"],
                noise_level=row["noise_level"],
                seed=row["seed"],
                reward=row["reward"],
                replayed=row["replayed"],
                extras=dict(row["extras"]),
            )
        )
    return out


def encode_trajectories(
    trajectories: list[Trajectory], latent_dtype: LatentDtype = "float32"
) -> bytes:
    """Trajectories -> Arrow IPC stream bytes (one record batch)."""
    batch = to_record_batch(trajectories, latent_dtype)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, ARROW_SCHEMA) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def decode_trajectories(data: bytes) -> list[Trajectory]:
    """Arrow IPC stream bytes -> trajectories; refuses data of another schema version."""
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        table = reader.read_all()
    except pa.ArrowInvalid as exc:
        raise ValueError(f"trajectory bytes are not an Arrow IPC stream: {exc}") from exc
    return from_record_batch(table)
