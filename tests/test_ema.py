"""`learner.ema`: diffusers' EMAModel over the trainable weights of a real LearnerWorker
(DeepSpeed ZeRO-2 on CPU, tiny SD3 with LoRA, in a fresh process: the process group is
global). The EMA follows the closed form of the weight trajectory with the configured decay
(no warm-up), is saved with the checkpoint and restored exactly (its update count too), starts
from the loaded weights when a checkpoint has none; rollout actors evaluate with it for one
task and keep their own weights; `opgrpo export --ema` writes it."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from opgrpo.config import build_config, load_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
DECAY = 0.7  # not the default: the test sees the configured value act

_SCRIPT = textwrap.dedent("""
    import json, logging, shutil, sys
    from pathlib import Path
    import numpy as np, torch
    from learner.worker import LearnerWorker, free_port
    from opgrpo.config import dump_config, load_config
    from opgrpo.models import FlowPolicy
    from opgrpo.sampling import SamplingSpec, sample_groups

    model_dir, run_dir, decay = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    handler.setLevel(logging.WARNING)
    logging.getLogger("learner.worker").addHandler(handler)
    port = free_port()
    cfg = load_config("configs/tiny_sd3.yaml", overrides=[
        f"model.path={model_dir}", "model.dtype=float32", "learner.ema=true",
        f"learner.ema_decay={decay}", "rollout.prompts_per_step=2", "rollout.group_size=4",
        "learner.micro_batch_size=8", "sampling.num_steps=3", "learner.kl_beta=0",
        "learner.learning_rate=0.01", "learner.clip_range=0.5", "run.name=ema"])

    def worker():
        w = LearnerWorker(cfg.model_dump(mode="json"), 0, 1)
        w.setup("127.0.0.1", port)
        return w

    def arrays(state):
        return {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}

    w = worker()
    torch.manual_seed(1)
    with torch.no_grad():  # away from LoRA's B = 0, so the adapter matters
        for p in w.policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    rollout = FlowPolicy.from_config(cfg)
    rollout.load_trainable_state_dict(
        {k: torch.from_numpy(v) for k, v in w.export_weights().items()})
    trajs = sample_groups(rollout, ["a red circle", "a blue square"], ["a", "b"], 4,
                          SamplingSpec.from_config(cfg), 0, 0, 0)
    adv = np.random.default_rng(0).standard_normal(8)
    rows = [{"chunk": 0, "index": i, "advantage": float(a), "valid": True}
            for i, a in enumerate(adv)]
    out = {"initial": arrays(w.export_weights())}
    live = []
    for it in range(2):  # one optimizer step each
        w.train([trajs], rows, it)
        live.append(arrays(w.export_weights()))
    out["live"] = live
    out["ema"] = arrays(w.export_ema_weights())
    out["ema_steps"] = w.ema.optimization_step
    out["ema_decay_used"] = w.ema.cur_decay_value

    ckpt = run_dir / "checkpoints"
    w.save_checkpoint(str(ckpt), "step2")
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    (ckpt / "latest.json").write_text(json.dumps({"step": 2, "tag": "step2", "version": 2}))
    # the same checkpoint as one written with learner.ema off
    shutil.copytree(ckpt / "step2", ckpt / "step1")
    (ckpt / "step1" / "ema_weights.safetensors").unlink()

    fresh = worker()
    out["resumed_version"] = fresh.load_checkpoint(str(ckpt), "step2")
    out["resumed_ema"] = arrays(fresh.export_ema_weights())
    out["resumed_steps"] = fresh.ema.optimization_step
    out["warnings_after_resume"] = list(warnings)
    fresh.train([trajs], rows, 2)  # the update after a resume keeps the decay
    out["resumed_live3"] = arrays(fresh.export_weights())
    out["resumed_ema3"] = arrays(fresh.export_ema_weights())

    bare = worker()
    bare.load_checkpoint(str(ckpt), "step1")
    out["bare_ema"] = arrays(bare.export_ema_weights())
    out["bare_live"] = arrays(bare.export_weights())
    bare.config.learner.ema_update_every = 2  # updates at every second optimizer step
    every = []
    for it in (2, 3):
        bare.train([trajs], rows, it)
        every.append((arrays(bare.export_weights()), arrays(bare.export_ema_weights()),
                      bare.ema.optimization_step))
    out["every_2"] = every
    out["warnings"] = warnings
    np.save(run_dir / "result.npy", out, allow_pickle=True)
""")


@pytest.fixture(scope="module")
def ema_run(tiny_sd3_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ema") / "run"
    run_dir.mkdir()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(tiny_sd3_dir), str(run_dir),
                           str(DECAY)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir, np.load(run_dir / "result.npy", allow_pickle=True).item()


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _mix(old: dict, new: dict) -> dict:
    return {k: DECAY * old[k] + (1 - DECAY) * new[k] for k in old}


def test_ema_follows_the_weights_and_resumes_exactly(ema_run):
    run_dir, res = ema_run
    theta1, theta2 = res["live"]
    # the weights moved at each step, so the mix below tells the decays apart
    assert _max_diff(theta1, res["initial"]) > 1e-3 and _max_diff(theta2, theta1) > 1e-3
    # EMAModel's first update copies the weights, then every update mixes with DECAY
    # (EMAModel's default warm-up would use (1 + 1) / (10 + 1) at the second update)
    assert res["ema_steps"] == 2 and res["ema_decay_used"] == pytest.approx(DECAY)
    expected = _mix(theta1, theta2)
    assert _max_diff(res["ema"], expected) < 1e-6
    assert _max_diff(res["ema"], theta2) > 1e-4
    # saved beside the trainable weights, float32, named as they are
    saved = load_file(run_dir / "checkpoints" / "step2" / "ema_weights.safetensors")
    assert all(v.dtype == np.float32 for v in saved.values())
    assert _max_diff({k: v.astype(np.float64) for k, v in saved.items()}, res["ema"]) == 0
    # a resumed worker holds the same EMA, bit for bit, and its update count
    assert res["resumed_version"] == 2 and res["resumed_steps"] == 2
    assert _max_diff(res["resumed_ema"], res["ema"]) == 0
    assert not any("no EMA" in m for m in res["warnings_after_resume"])
    # ... so its next update mixes with DECAY instead of copying the weights again
    assert _max_diff(res["resumed_ema3"], _mix(res["ema"], res["resumed_live3"])) < 1e-6
    assert _max_diff(res["resumed_ema3"], res["resumed_live3"]) > 1e-4
    # a checkpoint without EMA weights: the EMA starts from the loaded weights, with a warning
    assert _max_diff(res["bare_ema"], res["bare_live"]) == 0
    assert _max_diff(res["bare_live"], theta2) == 0
    assert any("step1 has no EMA weights" in m for m in res["warnings"])
    # learner.ema_update_every 2: the first step leaves the EMA, the second updates it (the
    # first update of a fresh EMA copies the weights)
    (live_a, ema_a, n_a), (live_b, ema_b, n_b) = res["every_2"]
    assert n_a == 0 and _max_diff(ema_a, res["bare_ema"]) == 0 and _max_diff(live_a, theta2) > 0
    assert n_b == 1 and _max_diff(ema_b, live_b) < 1e-6 and _max_diff(live_b, live_a) > 1e-4


def test_export_ema_writes_the_ema_weights(ema_run, tmp_path, capsys):
    from opgrpo.cli import main
    from opgrpo.export import export_checkpoint
    from opgrpo.models import FlowPolicy

    run_dir, res = ema_run
    assert main(["export", str(run_dir), "--out", str(tmp_path / "ema"), "--ema"]) == 0
    assert "EMA" in capsys.readouterr().out
    info = json.loads((tmp_path / "ema" / "opgrpo_export.json").read_text())
    assert info["weights"] == "ema" and info["format"] == "diffusers_lora"
    live_dir = export_checkpoint(run_dir, tmp_path / "live")
    config = load_config(run_dir / "config.yaml")

    def velocity(policy):
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn((2, *policy.latent_shape(32, 32)), generator=generator)
        embeds = policy.encode_prompts(["a red circle", "two blue squares"])
        with torch.no_grad():
            return policy.velocity(latents, torch.tensor([0.8, 0.3]), embeds)

    def with_lora(directory):
        policy = FlowPolicy.from_pretrained(config.model.path)
        policy.load_lora(directory)
        return velocity(policy)

    reference = FlowPolicy.from_pretrained(
        config.model.path, lora_rank=config.model.lora_rank,
        lora_alpha=config.model.lora_alpha,
        lora_target_modules=config.model.lora_target_modules)
    reference.load_trainable_state_dict(
        {k: torch.from_numpy(v.astype(np.float32)) for k, v in res["ema"].items()})
    ema_velocity, live_velocity = with_lora(tmp_path / "ema"), with_lora(live_dir)
    torch.testing.assert_close(ema_velocity, velocity(reference), rtol=1e-4, atol=1e-5)
    assert (ema_velocity - live_velocity).abs().max() > 1e-5  # the EMA, not the live weights
    # fused: the whole pipeline with the EMA adapter fused in
    fused = FlowPolicy.from_pretrained(export_checkpoint(run_dir, tmp_path / "fused",
                                                         fused=True, ema=True))
    torch.testing.assert_close(velocity(fused), velocity(reference), rtol=1e-4, atol=1e-5)
    # a checkpoint without EMA weights is refused by name
    with pytest.raises(FileNotFoundError, match="step1 has no EMA weights"):
        export_checkpoint(run_dir, tmp_path / "none", step=1, ema=True)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "x"), "--step", "1",
                 "--ema"]) == 2


def test_rollout_evaluates_with_given_weights_then_keeps_its_own(tiny_sd3_dir):
    from actors.rollout import RolloutWorker

    config = build_config({"model": {"path": str(tiny_sd3_dir), "lora_rank": 4,
                                     "height": 32, "width": 32}})
    actor = RolloutWorker(config.model_dump(mode="json"))
    torch.manual_seed(0)
    live = {k: (0.05 * torch.randn(v.shape)).numpy() for k, v in actor.weights().items()}
    other = {k: (0.05 * torch.randn(v.shape)).numpy() for k, v in live.items()}
    actor.set_weights(live, 3)
    args = ([("a red circle", "k0")], 2, 3, 1.0, 0)
    own = actor.evaluate(*args)
    swapped = actor.evaluate(*args, weights=other)
    assert actor.version == 3
    assert all(np.array_equal(actor.weights()[k], live[k]) for k in live)
    np.testing.assert_array_equal(actor.evaluate(*args), own)  # back to its own weights
    actor.set_weights(other, 4)
    np.testing.assert_array_equal(actor.evaluate(*args), swapped)  # the given weights' images
    assert np.abs(own.astype(int) - swapped.astype(int)).max() > 0
    with pytest.raises(KeyError, match="do not match"):
        actor.evaluate(*args, weights={k: v for k, v in list(live.items())[1:]})
    assert all(np.array_equal(actor.weights()[k], other[k]) for k in other)


def test_ema_config():
    config = build_config({"learner": {"ema": True}})
    assert config.learner.ema_decay == 0.9 and config.learner.ema_update_every == 1
    with pytest.raises(ValueError, match="ZeRO-3 partitions"):
        build_config({"learner": {"ema": True, "zero_stage": 3}})
    for decay in (0.0, 1.0):
        with pytest.raises(ValueError, match="ema_decay"):
            build_config({"learner": {"ema_decay": decay}})
