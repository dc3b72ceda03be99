"""The `opgrpo` command line: one subcommand per user task.

Commands available now: `sample` (image grid of a model's samples), `make-tiny-sd3` (a tiny
random SD3 pipeline of the real classes), `config` (validate and print a resolved config).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

log = logging.getLogger("opgrpo")


def _cmd_make_tiny_sd3(args: argparse.Namespace) -> int:
    from opgrpo.tiny import save_tiny_sd3

    out = Path(args.directory)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: {out} is not empty; choose another directory or --overwrite")
    save_tiny_sd3(out, seed=args.seed, sample_size=args.size, with_vae=not args.no_vae)
    print(f"tiny random SD3 pipeline ({args.size}x{args.size} px) written to {out}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch
    from diffusers.utils import logging as diffusers_logging
    from rich.progress import Progress

    from opgrpo.images import save_grid
    from opgrpo.models import FlowPolicy, check_model_dir
    from opgrpo.prompts import load_prompts
    from opgrpo.sampling import SamplingSpec, sample_ode, sample_trajectories, trajectory_seed

    diffusers_logging.disable_progress_bar()
    check_model_dir(args.model)
    records = load_prompts(args.prompts)[: args.max_prompts]
    policy = FlowPolicy.from_pretrained(args.model)
    size = policy.default_image_size
    height, width = args.height or size, args.width or size
    images = []
    with Progress(transient=True) as progress:
        task = progress.add_task("sampling", total=len(records))
        for record in records:
            seeds = [trajectory_seed(args.seed, record.key, j) for j in range(args.n_per_prompt)]
            if args.sde:
                spec = SamplingSpec(args.steps, args.noise_level, args.guidance, height, width)
                trajs = sample_trajectories(
                    policy, [record.text] * len(seeds), [record.key] * len(seeds), seeds, spec, 0
                )
                final = torch.stack([torch.from_numpy(t.latents[-1]) for t in trajs])
            else:
                final = sample_ode(
                    policy, [record.text] * len(seeds), seeds, args.steps, args.guidance,
                    height, width,
                )
            images.append(policy.decode(final))
            progress.advance(task)
    out = save_grid(torch.cat(images), [r.text for r in records], args.out, args.n_per_prompt)
    print(f"{len(records)} prompts x {args.n_per_prompt} samples -> {out}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from opgrpo.config import dump_config, load_config

    print(dump_config(load_config(args.config, args.set)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opgrpo", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="sample a model on a prompt file into an image grid")
    p.add_argument("--model", required=True, help="diffusers pipeline directory")
    p.add_argument("--prompts", required=True, help="prompt file (.txt or .jsonl)")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--sde", action="store_true", help="SDE sampling (as in training)")
    p.add_argument("--steps", type=int, default=40, help="sampling steps")
    p.add_argument("--noise-level", type=float, default=0.7, help="SDE noise level a")
    p.add_argument("--guidance", type=float, default=4.5, help="CFG scale (1 = off)")
    p.add_argument("--n-per-prompt", type=int, default=4, help="images per prompt")
    p.add_argument("--max-prompts", type=int, default=16, help="prompts taken from the file")
    p.add_argument("--height", type=int, default=None, help="default: the model's size")
    p.add_argument("--width", type=int, default=None, help="default: the model's size")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("make-tiny-sd3", help="write a tiny random SD3 pipeline (real classes)")
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--no-vae", action="store_true", help="pixel-space transformer, no VAE")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_make_tiny_sd3)

    p = sub.add_parser("config", help="validate a config and print it resolved")
    p.add_argument("--config", default=None, help="YAML config file (default: built-ins)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.set_defaults(func=_cmd_config)
    return parser


def _quiet_libraries() -> None:
    """Library progress bars and advice are noise on a command line; our own progress shows."""
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from opgrpo.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
