"""The `opgrpo` command line: one subcommand per user task.

Commands: `sample` (image grid of a model's samples, optionally labelled with a reward), `eval`
(score ODE samples of a prompt set), `pretrain` (train the shapes base model), `shapes-prompts`
(write the shapes task's prompt files), `make-tiny-sd3` (a tiny random SD3 pipeline of the real
classes), `config` (validate and print a resolved config, or `--describe` every key).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

log = logging.getLogger("opgrpo")


def _guidance(args: argparse.Namespace) -> float:
    """--guidance, else the guidance the model directory says it was trained for, else 4.5."""
    from opgrpo.models import model_defaults

    if args.guidance is not None:
        return args.guidance
    return float(model_defaults(args.model).get("guidance_scale", 4.5))


def _cmd_make_tiny_sd3(args: argparse.Namespace) -> int:
    from opgrpo.tiny import save_tiny_sd3

    out = Path(args.directory)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: {out} is not empty; choose another directory or --overwrite")
    save_tiny_sd3(out, seed=args.seed, sample_size=args.size, with_vae=not args.no_vae)
    print(f"tiny random SD3 pipeline ({args.size}x{args.size} px) written to {out}")
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from opgrpo.tiny import save_tiny

    out = Path(args.directory)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: {out} is not empty; choose another directory or --overwrite")
    save_tiny(args.family, out, seed=args.seed)
    print(f"tiny random {args.family} pipeline (32x32 px) written to {out}")
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
    args.guidance = _guidance(args)
    records = load_prompts(args.prompts)[: args.max_prompts]
    policy = FlowPolicy.from_pretrained(args.model, num_frames=args.num_frames)
    if args.lora:
        policy.load_lora(args.lora)
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
            images.append(policy.decode(final).cpu())
            progress.advance(task)
    images = torch.cat(images)
    labels = None
    if args.reward:
        from actors.rewards import get_reward, score_frames

        reward = get_reward(args.reward).load(_reward_options(args))
        prompts = [r.text for r in records for _ in range(args.n_per_prompt)]
        values = score_frames(reward, images, prompts)[reward.key]
        labels = [f"{reward.key}={v:.2f}" for v in values]
        print(f"mean {args.reward} {reward.key}: {float(values.mean()):.3f}")
    out = save_grid(images, [r.text for r in records], args.out, args.n_per_prompt, labels)
    print(f"{len(records)} prompts x {args.n_per_prompt} samples -> {out}")
    return 0


def _reward_options(args: argparse.Namespace) -> dict | None:
    """--reward-options as YAML/JSON ({model: DIR, ...}), like reward.options.<name>."""
    import yaml

    if not args.reward_options:
        return None
    options = yaml.safe_load(args.reward_options)
    if not isinstance(options, dict):
        raise ValueError(f"--reward-options must be a mapping, got {args.reward_options!r}")
    return options


def _cmd_geneval_server(args: argparse.Namespace) -> int:
    from tasks.geneval.server import serve

    serve(args.host, args.port, args.scorer, args.detector, args.clip, args.device,
          timeout_s=args.timeout, max_body_mb=args.max_body_mb, max_threads=args.max_threads)
    return 0


def _cmd_convert_aesthetic_head(args: argparse.Namespace) -> int:
    from actors.rewards.aesthetic import convert_head

    names = convert_head(args.source, args.target)
    print(f"{args.target}: {len(names)} tensors ({', '.join(names)})")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from opgrpo.evaluate import EvalSettings, evaluate
    from opgrpo.images import save_grid
    from opgrpo.models import FlowPolicy
    from opgrpo.prompts import load_prompts
    from tasks.shapes.model_card import plot_pretrain_losses, write_model_card
    from tasks.shapes.pretrain import PretrainSettings, pretrain

    out = Path(args.out)
    records = load_prompts(args.eval_prompts)  # fail before an hour of training, not after
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns) as progress:
        if args.evaluate_only:
            record_file = out / "pretrain_record.json"
            if not record_file.is_file():
                raise FileNotFoundError(f"{record_file} is missing: {out} was not pretrained")
            record = json.loads(record_file.read_text())
        else:
            if (out / "model_index.json").exists() and not args.overwrite:
                raise SystemExit(f"error: {out} already holds a model; pass --overwrite")
            overrides = {"vae_steps": args.vae_steps, "flow_steps": args.flow_steps,
                         "num_layers": args.layers}
            settings = PretrainSettings(
                seed=args.seed, **{k: v for k, v in overrides.items() if v is not None}
            )
            record = pretrain(out, settings, progress)
        policy = FlowPolicy.from_pretrained(out)
        eval_settings = EvalSettings(n_per_prompt=args.n_per_prompt, seed=args.seed)
        summary, images, scores = evaluate(policy, records, "shapes", eval_settings, progress)
    write_model_card(out, record, summary, eval_settings, args.eval_prompts,
                     scores["strict"].tolist())
    plot_pretrain_losses(out)
    shown = 12 * args.n_per_prompt
    save_grid(images[:shown], [r.text for r in records[:12]], out / "samples.png",
              args.n_per_prompt, [f"strict={v:.2f}" for v in scores["strict"][:shown]])
    print(json.dumps(summary))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from opgrpo.evaluate import EvalSettings, evaluate
    from opgrpo.models import FlowPolicy, check_model_dir
    from opgrpo.prompts import load_prompts

    check_model_dir(args.model)
    args.guidance = _guidance(args)
    records = load_prompts(args.prompts)
    policy = FlowPolicy.from_pretrained(args.model)
    if args.lora:
        policy.load_lora(args.lora)
    settings = EvalSettings(args.n_per_prompt, args.steps, args.guidance, args.seed)
    with Progress(transient=True) as progress:
        summary, images, _ = evaluate(policy, records, args.reward, settings, progress,
                                      _reward_options(args))
    print(json.dumps(summary))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from opgrpo.export import export_checkpoint

    out = export_checkpoint(args.run, args.out, args.step, args.dtype, args.overwrite,
                            fused=args.fused, ema=args.ema)
    info = json.loads((out / "opgrpo_export.json").read_text())
    if info["format"] == "diffusers_lora":
        what = "the EMA of the LoRA adapter" if args.ema else "the LoRA adapter"
        print(f"exported {what} of {args.run} to {out}: "
              f"`pipe.load_lora_weights('{out}')` on {info['base_model']}, or "
              f"`opgrpo eval --model {info['base_model']} --lora {out} ...`")
    else:
        what = " (its EMA weights)" if args.ema else ""
        print(f"exported {args.run}{what} to {out}: evaluate with `opgrpo eval --model {out} "
              "...`")
    return 0


def _cmd_shapes_prompts(args: argparse.Namespace) -> int:
    from tasks.shapes.grammar import split_prompts, write_jsonl

    train, test = split_prompts(seed=args.seed)
    out = Path(args.out)
    write_jsonl(train, out / "train_metadata.jsonl")
    write_jsonl(test, out / "test_metadata.jsonl")
    print(f"{len(train)} train and {len(test)} test prompts written to {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from opgrpo.train import train

    summary = train(args.config, args.set, args.resume, args.address,
                    resume_if_exists=args.resume_if_exists, accept_buffer=args.accept_buffer)
    before, after = summary.get("eval_before"), summary.get("eval_last")
    print(f"run directory: {summary['run_dir']}")
    for label, result in (("before training", before), (f"after step {summary['steps']}", after)):
        if result:
            shown = {k: round(v, 3) for k, v in result.items() if isinstance(v, float)}
            print(f"eval {label}: {json.dumps(shown)}")
    return 0


def _cmd_scale(args: argparse.Namespace) -> int:
    import ray

    from actors.control import NAMESPACE, control_name

    value = args.rollout if args.rollout == "auto" else int(args.rollout)
    ray.init(address=args.address or "auto", namespace=NAMESPACE, log_to_driver=False)
    # `control:<run name>:<run id>` (`--run NAME:RUNID` names one of several), or a run
    # started before run ids: `control:<run name>`
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["namespace"] == NAMESPACE and (
                       a["name"] == control_name(args.run)
                       or a["name"].startswith(control_name(args.run) + ":")))
    if not names:
        raise SystemExit(f"error: no running job with run.name={args.run!r} here")
    if len(names) > 1:
        ids = ", ".join(n[len(control_name(args.run)) + 1:] for n in names)
        raise SystemExit(f"error: several running jobs with run.name={args.run!r} (run ids "
                         f"{ids}, in each run directory's run_id): --run {args.run}:RUNID")
    control = ray.get_actor(names[0], namespace=NAMESPACE)
    try:  # refused at once when the cluster cannot hold that many (opgrpo.preflight)
        ray.get(control.set_rollout.remote(value), timeout=60)
    except ray.exceptions.RayTaskError as exc:
        raise ValueError(str(exc.cause)) from None
    except ray.exceptions.GetTimeoutError:
        raise SystemExit(f"error: the control actor of run {args.run!r} did not answer "
                         "within 60 s") from None
    print(f"run {args.run}: rollout actors -> {value} from the next iteration")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from opgrpo.report import report, summary

    out = report(args.runs, args.out or Path(args.runs[0]) / "report.png")
    for run in args.runs:
        print(summary(run))
    print(f"report written to {out}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from opgrpo.config import describe_config, dump_config, load_config

    if args.describe is not None:
        print(describe_config(args.describe or None), end="")
        return 0
    print(dump_config(load_config(args.config, args.set)), end="")
    return 0


SET_HELP = ("override one config key, after --config: SECTION.KEY=VALUE, a dotted path into the "
            "config (`opgrpo config --describe` lists them) and a YAML value (1e-5, true, null, "
            "[a, b], '{jpeg: 1.0}'); repeatable, applied in order. E.g. --set "
            "learner.learning_rate=1e-5 --set buffer.off_policy_fraction=0 --set "
            "'reward.functions={pickscore: 1.0}'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opgrpo", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="sample a model on a prompt file into an image grid")
    p.add_argument("--model", required=True, help="diffusers pipeline directory")
    p.add_argument("--lora", default=None,
                   help="a LoRA adapter directory in diffusers' format (`opgrpo export`)")
    p.add_argument("--prompts", required=True, help="prompt file (.txt or .jsonl)")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--sde", action="store_true", help="SDE sampling (as in training)")
    p.add_argument("--steps", type=int, default=40, help="sampling steps")
    p.add_argument("--noise-level", type=float, default=0.7, help="SDE noise level a")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale (1 = off); default: the model's own setting, else 4.5")
    p.add_argument("--n-per-prompt", type=int, default=4, help="images per prompt")
    p.add_argument("--max-prompts", type=int, default=16, help="prompts taken from the file")
    p.add_argument("--height", type=int, default=None, help="default: the model's size")
    p.add_argument("--width", type=int, default=None, help="default: the model's size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward", default=None, help="label each image with this reward")
    p.add_argument("--reward-options", default=None, metavar="YAML",
                   help="options of that reward, e.g. '{model: DIR}'")
    p.add_argument("--num-frames", type=int, default=1, help="video models: frames (4k+1)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("eval", help="ODE-sample a prompt set and score it; prints JSON")
    p.add_argument("--model", required=True, help="diffusers pipeline directory")
    p.add_argument("--lora", default=None,
                   help="a LoRA adapter directory in diffusers' format (`opgrpo export`)")
    p.add_argument("--prompts", required=True, help="prompt file (.txt or .jsonl)")
    p.add_argument("--reward", required=True, help="registered reward name, e.g. shapes")
    p.add_argument("--reward-options", default=None, metavar="YAML",
                   help="options of that reward, e.g. '{model: DIR}'")
    p.add_argument("--n-per-prompt", type=int, default=4)
    p.add_argument("--steps", type=int, default=40, help="ODE steps (Flow-GRPO uses 40)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale (1 = off); default: the model's own setting, else 4.5")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="write a run's checkpoint for diffusers: the LoRA "
                       "adapter (load_lora_weights), or the whole pipeline with --fused")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--fused", action="store_true",
                   help="write the whole pipeline with the LoRA fused into the transformer "
                   "(always so for full fine-tuning runs)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype on disk of the transformer (default: the run's model.dtype) or "
                   "of the adapter (default: float32)")
    p.add_argument("--ema", action="store_true",
                   help="the EMA of the trainable weights (a run with learner.ema: true) "
                   "instead of the live weights, in the same format")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("pretrain", help="train the shapes base model from scratch (CPU)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=None, help="default: the recipe's")
    p.add_argument("--flow-steps", type=int, default=None, help="default: the recipe's")
    p.add_argument("--layers", type=int, default=None, help="default: the recipe's")
    p.add_argument("--eval-prompts", default="configs/shapes/test_metadata.jsonl")
    p.add_argument("--n-per-prompt", type=int, default=4)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--evaluate-only", action="store_true",
                   help="re-evaluate an existing pretrained model and rewrite its card")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("shapes-prompts", help="write the shapes train/test metadata JSONL")
    p.add_argument("--out", default="configs/shapes")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_shapes_prompts)

    p = sub.add_parser("make-tiny-sd3", help="write a tiny random SD3 pipeline (real classes)")
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--no-vae", action="store_true", help="pixel-space transformer, no VAE")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_make_tiny_sd3)

    p = sub.add_parser("make-tiny", help="write a tiny random sd3, sd35, flux or wan pipeline")
    p.add_argument("family", choices=["sd3", "sd35", "flux", "wan"])
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_make_tiny)

    p = sub.add_parser("train", help="train with OP-GRPO on Ray (local or --address)")
    p.add_argument("--config", default=None, help="YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help=SET_HELP)
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run")
    p.add_argument("--resume-if-exists", action="store_true",
                   help="with --config: resume the run if its directory holds a checkpoint, "
                   "else start it (a job that may be submitted again)")
    p.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS or local)")
    p.add_argument("--accept-buffer", action="store_true",
                   help="with --resume: go on when the replay buffer in Redis does not match "
                   "the checkpoint's (flushed or lost); what is missing is logged and lost")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("scale", help="change the rollout actors of a running job")
    p.add_argument("--rollout", required=True, help="number of actors, or 'auto'")
    p.add_argument("--run", required=True, help="run.name of the job")
    p.add_argument("--address", default=None, help="Ray cluster (default: auto)")
    p.set_defaults(func=_cmd_scale)

    p = sub.add_parser("report", help="plot a run's panels (reward, eval per tag, loss, KL, "
                       "clipping, w_i, buffer, version lag, phase times) to PNG")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/report.png)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("geneval-server",
                       help="serve the GenEval scoring contract over HTTP (JSON)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on: 127.0.0.1 (default) serves this machine only, "
                   "0.0.0.0 every network it is on")
    p.add_argument("--port", type=int, default=18085)
    p.add_argument("--scorer", default="shapes", choices=["shapes", "geneval"],
                   help="shapes: the shipped shapes task; geneval: GenEval's rules over a "
                   "Mask2Former detector and CLIP colours")
    p.add_argument("--detector", default=None, help="Mask2Former directory (geneval)")
    p.add_argument("--clip", default=None, help="CLIP directory for colours (geneval)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds a client may send nothing before it is dropped (30)")
    p.add_argument("--max-body-mb", type=float, default=256.0,
                   help="largest request body in MiB; a larger Content-Length gets 413 (256)")
    p.add_argument("--max-threads", type=int, default=8,
                   help="requests served at once; a connection beyond them gets 503 (8)")
    p.set_defaults(func=_cmd_geneval_server)

    p = sub.add_parser("convert-aesthetic-head",
                       help="a LAION aesthetic head .pth -> safetensors (tensors only)")
    p.add_argument("source")
    p.add_argument("target")
    p.set_defaults(func=_cmd_convert_aesthetic_head)

    p = sub.add_parser("config", help="validate a config and print it resolved")
    p.add_argument("--config", default=None, help="YAML config file (default: built-ins)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help=SET_HELP)
    p.add_argument("--describe", nargs="?", const="", default=None, metavar="SECTION",
                   help="list every key (or those of SECTION, e.g. buffer) with its type, "
                   "default and description, nested keys as section.key, instead")
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
    from opgrpo.errors import RunStopped

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ConnectionError, RunStopped) as exc:  # e.g. Redis unreachable, or down too long
        print(f"error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
