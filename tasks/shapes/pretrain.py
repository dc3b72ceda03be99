"""`opgrpo pretrain`: train the shapes base model from scratch on rendered data, on a CPU.

Stage 1 trains the `AutoencoderKL` to reconstruct rendered 32 x 32 images; its latent mean and
std become the VAE's `shift_factor` and `scaling_factor`. Stage 2 encodes a fixed set of rendered
images once and trains the `SD3Transformer2DModel` together with the two small CLIP text encoders
with the rectified-flow objective (x_sigma = (1 - sigma) x0 + sigma * noise, target noise - x0,
sigma from a logit-normal as in SD3), keeping an EMA of the weights. The EMA weights are saved as
a diffusers `StableDiffusion3Pipeline` directory in float16.

Everything is counted in steps, not minutes, so the same seed and settings give the same model.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from opgrpo.models import MODEL_DEFAULTS_FILE
from tasks.shapes.grammar import split_prompts
from tasks.shapes.render import render_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainSettings:
    seed: int = 0
    batch_size: int = 64
    vae_steps: int = 1200
    vae_lr: float = 5e-4
    vae_kl_weight: float = 1e-6
    flow_steps: int = 6000
    flow_lr: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    dataset_size: int = 40_000
    num_layers: int = 6
    num_heads: int = 4
    scheduler_shift: float = 1.5


def _images(rows: list[dict], seed: int) -> torch.Tensor:
    """Rendered images of `rows` as (N, 3, 32, 32) floats in [-1, 1]."""
    return torch.from_numpy(render_batch(rows, seed)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _cosine(step: int, total: int, peak: float, warmup: int = 0) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def _batches(rng: np.random.Generator, size: int, batch: int):
    while True:
        yield rng.integers(0, size, batch)


def train_vae(vae, rows: list[dict], settings: PretrainSettings, report) -> None:
    """Reconstruction + tiny KL on freshly rendered batches (a new image every draw)."""
    rng = np.random.default_rng(settings.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr)
    vae.train()
    batches = _batches(rng, len(rows), settings.batch_size)
    for step, index in zip(range(settings.vae_steps), batches):
        for group in optimizer.param_groups:
            group["lr"] = _cosine(step, settings.vae_steps, settings.vae_lr)
        images = _images([rows[i] for i in index], seed=settings.seed * 1_000_003 + step)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        mse = (recon - images).pow(2).mean()
        loss = mse + settings.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        report("vae", step, {"vae/mse": float(mse.detach())})
    vae.eval()


@torch.no_grad()
def encode_dataset(vae, rows: list[dict], settings: PretrainSettings):
    """Render `dataset_size` images of random training prompts and encode them once.

    Returns prompts and raw latents (N, C, 8, 8) (the posterior means).
    """
    rng = np.random.default_rng(settings.seed + 1)
    index = rng.integers(0, len(rows), settings.dataset_size)
    prompts = [rows[i]["prompt"] for i in index]
    latents = []
    for start in range(0, len(index), 500):
        chunk = [rows[i] for i in index[start : start + 500]]
        latents.append(vae.encode(_images(chunk, seed=7_000_000 + start)).latent_dist.mode())
    return prompts, torch.cat(latents)


def set_latent_normalisation(vae, latents: torch.Tensor) -> torch.Tensor:
    """Store the latents' mean/std in the VAE config (SD3's shift/scaling factors)."""
    shift = float(latents.mean())
    scale = float(1.0 / latents.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return (latents - shift) * scale


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(param.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for shadow, param in zip(self.shadow, self.params):
            param.copy_(shadow)


def train_flow(pipeline, prompts: list[str], latents: torch.Tensor, settings, report) -> None:
    """Rectified flow on normalised latents, text encoders trained jointly; EMA at the end."""
    modules = [pipeline.transformer, pipeline.text_encoder, pipeline.text_encoder_2]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=settings.flow_lr, weight_decay=1e-4)
    ema = EMA(modules, settings.ema_decay)
    rng = np.random.default_rng(settings.seed + 2)
    gen = torch.Generator().manual_seed(settings.seed + 3)
    batches = _batches(rng, len(prompts), settings.batch_size)
    for step, index in zip(range(settings.flow_steps), batches):
        for group in optimizer.param_groups:
            group["lr"] = _cosine(step, settings.flow_steps, settings.flow_lr,
                                  settings.warmup_steps)
        x0 = latents[torch.from_numpy(index)]
        drop = rng.random(len(index)) < settings.cfg_dropout
        batch_prompts = ["" if d else prompts[i] for d, i in zip(drop, index)]
        embeds, _, pooled, _ = pipeline.encode_prompt(
            batch_prompts, None, None, do_classifier_free_guidance=False,
            max_sequence_length=1,
        )
        sigma = torch.sigmoid(torch.randn(len(index), generator=gen))  # logit-normal(0, 1)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma[:, None, None, None]
        x_sigma = (1 - s) * x0 + s * noise
        velocity = pipeline.transformer(
            hidden_states=x_sigma, timestep=sigma * 1000, encoder_hidden_states=embeds,
            pooled_projections=pooled, return_dict=False,
        )[0]
        loss = (velocity - (noise - x0)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update(step)
        report("flow", step, {"flow/loss": float(loss.detach())})
    ema.copy_to_params()
    for m in modules:
        m.eval().requires_grad_(False)


def pretrain(out_dir: str | Path, settings: PretrainSettings, progress=None) -> dict:
    """Train the shapes base model into `out_dir`; returns the training record."""
    from tasks.shapes.model import build_untrained_pipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    pipeline = build_untrained_pipeline(
        seed=settings.seed, shift=settings.scheduler_shift, num_layers=settings.num_layers,
        heads=settings.num_heads,
    )
    train_rows, _ = split_prompts()
    started = time.time()
    metrics_file = (out_dir / "pretrain_metrics.jsonl").open("w")
    tasks = {}
    if progress is not None:
        tasks = {"vae": progress.add_task("VAE", total=settings.vae_steps),
                 "flow": progress.add_task("flow", total=settings.flow_steps)}

    def report(stage: str, step: int, values: dict) -> None:
        if progress is not None:
            progress.advance(tasks[stage])
        if step % 50 == 0:
            row = {"stage": stage, "step": step, "elapsed_s": round(time.time() - started, 1)}
            metrics_file.write(json.dumps({**row, **values}) + "\n")
            metrics_file.flush()

    train_vae(pipeline.vae, train_rows, settings, report)
    vae_seconds = time.time() - started
    prompts, raw = encode_dataset(pipeline.vae, train_rows, settings)
    latents = set_latent_normalisation(pipeline.vae, raw)
    train_flow(pipeline, prompts, latents, settings, report)
    metrics_file.close()
    total_seconds = time.time() - started
    pipeline.to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    # trained with one zero T5 token and without guidance: record it for every loader
    (out_dir / MODEL_DEFAULTS_FILE).write_text(
        json.dumps({"max_sequence_length": 1, "guidance_scale": 1.0}, indent=2) + "\n"
    )
    record = {
        "settings": asdict(settings),
        "seconds": {"vae": round(vae_seconds, 1), "total": round(total_seconds, 1)},
        "parameters": {
            name: sum(p.numel() for p in getattr(pipeline, name).parameters())
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2")
        },
        "torch_threads": torch.get_num_threads(),
    }
    (out_dir / "pretrain_record.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
