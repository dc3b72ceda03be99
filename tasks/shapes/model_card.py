"""The model card (README.md) of a pretrained shapes base model: how it was made, its scores."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path


def _table(per_tag: dict[str, float]) -> str:
    lines = ["| tag | strict |", "|---|---|"]
    lines += [f"| {tag} | {value:.3f} |" for tag, value in per_tag.items()]
    return "\n".join(lines)


def plot_pretrain_losses(out_dir) -> Path:
    """pretrain_loss.png: VAE reconstruction and flow-matching losses against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    rows = [json.loads(line) for line in (out_dir / "pretrain_metrics.jsonl").open()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, stage, key in ((axes[0], "vae", "vae/mse"), (axes[1], "flow", "flow/loss")):
        points = [(r["step"], r[key]) for r in rows if r["stage"] == stage]
        ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.set(title=f"{stage}: {key}", xlabel="step", yscale="log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "pretrain_loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_model_card(
    out_dir, record: dict, summary: dict, eval_settings, eval_prompts, per_image: list[float]
) -> Path:
    """Write README.md and eval.json (summary + per-image strict scores, prompt-major)."""
    out_dir = Path(out_dir)
    settings = record["settings"]
    params = record["parameters"]
    eval_record = {"summary": summary, "settings": asdict(eval_settings),
                   "prompts": str(eval_prompts), "per_image_strict": per_image}
    (out_dir / "eval.json").write_text(json.dumps(eval_record, indent=2) + "\n")
    command = (f"opgrpo pretrain --out {out_dir.as_posix()} --seed {settings['seed']} "
               f"--vae-steps {settings['vae_steps']} --flow-steps {settings['flow_steps']} "
               f"--layers {settings['num_layers']} --overwrite")
    text = f"""# shapes-base: a tiny SD3-architecture model for the shapes task

A flow-matching text-to-image model of the real diffusers `StableDiffusion3Pipeline` classes,
trained from scratch on this project's rendered "shapes" data (GenEval in miniature) on a CPU.
It is deliberately mediocre at composition so that RL (OP-GRPO) has room to improve it.

## Components
- `transformer`: `SD3Transformer2DModel`, {settings['num_layers']} layers, {settings['num_heads']}
  heads of 32, patch size 1 on 8 x 8 x 8 latents (64 image tokens); {params['transformer']:,}
  parameters.
- `vae`: `AutoencoderKL`, 32 x 32 x 3 <-> 8 x 8 x 8; {params['vae']:,} parameters.
- `text_encoder`, `text_encoder_2`: `CLIPTextModelWithProjection` (3 layers, width 64),
  {params['text_encoder']:,} parameters each, trained jointly with the transformer; a
  word-level tokenizer built from the grammar's words (16 tokens). No T5.
- `scheduler`: `FlowMatchEulerDiscreteScheduler`, shift {settings['scheduler_shift']}.
- Weights are stored in float16 (the EMA of training); load them in float32.

## How it was made
- Data: images rendered on the fly from `configs/shapes/train_metadata.jsonl` prompts
  (random sizes 7-11 px, random places, no overlap); the flow stage uses
  {settings['dataset_size']:,} rendered images encoded once.
- VAE: {settings['vae_steps']} steps, batch {settings['batch_size']}, AdamW lr
  {settings['vae_lr']} cosine, MSE + {settings['vae_kl_weight']} KL.
- Flow: {settings['flow_steps']} steps, batch {settings['batch_size']}, AdamW lr
  {settings['flow_lr']} (warm-up {settings['warmup_steps']}, cosine), logit-normal sigma,
  {settings['cfg_dropout']:.0%} empty-prompt dropout, EMA {settings['ema_decay']}.
- Seed {settings['seed']}; {record['torch_threads']} torch threads; wall time
  {record['seconds']['total'] / 60:.1f} min (VAE {record['seconds']['vae'] / 60:.1f} min).
- Regenerate: `{command}`

## Scores
ODE sampling, {eval_settings.num_steps} steps, guidance {eval_settings.guidance_scale},
{eval_settings.n_per_prompt} images per prompt of `{eval_prompts}`, seed {eval_settings.seed},
scored by the rule-based detector (`opgrpo eval --reward shapes`):

- strict accuracy: **{summary['strict']:.3f}**; partial (fraction of constraints):
  {summary['partial']:.3f}; {summary['n_images']} images.

{_table(summary['per_tag'])}

![samples of the first test prompts with their strict score](samples.png)

Training losses: `pretrain_metrics.jsonl`, plotted in `pretrain_loss.png`.

Reproduce: `opgrpo eval --model {out_dir.as_posix()} --prompts {eval_prompts} --reward shapes
--n-per-prompt {eval_settings.n_per_prompt} --steps {eval_settings.num_steps} --seed
{eval_settings.seed}`
"""
    path = out_dir / "README.md"
    path.write_text(text)
    return path
