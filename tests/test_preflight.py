"""Bad input is refused before Ray starts, and nothing the driver asks of Ray waits forever
(issue 24 items 4 and 6): prompt files that are not UTF-8 or too short, model directories of
the wrong family, unbounded sizes, resource requests the cluster cannot hold (at start and
from `opgrpo scale`), actors that cannot be placed, steps that do not finish, rewards that
return the wrong number of scores, and NaN losses."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from opgrpo.cli import main
from opgrpo.config import ConfigError, build_config, load_config
from opgrpo.preflight import InfeasibleResources, WaitTimeout, unmet_requests
from opgrpo.prompts import load_prompts

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "tasks/shapes/shapes-base"
OLD_TINY_SD3 = ["rollout.num_cpus=1", "learner.num_cpus=1", "reward.num_cpus=0.5"]


def _data(tmp_path, **sections):
    data = {"model": {"path": str(SHAPES), "height": 32, "width": 32},
            "reward": {"functions": {"jpeg": 1.0}},
            "train": {"prompts_file": str(REPO / "configs/shapes/train_metadata.jsonl")},
            "run": {"output_dir": str(tmp_path), "name": "pre"}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def _trainer(tmp_path, **sections):
    from opgrpo.train import Trainer

    return Trainer(build_config(_data(tmp_path, **sections)), tmp_path / "pre")


# ----- item 1: a prompt file that is not UTF-8 ---------------------------------------------
def test_a_prompt_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("a red circle\ntwo blue squares\na caf\u00e9 sign\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt:3: not UTF-8 text \(byte 0xe9"):
        load_prompts(bad)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not UTF-8"):
        load_prompts(jsonl)


# ----- item 2: too few prompts, and the shipped tiny SD3 recipe -----------------------------
def test_too_few_prompts_are_refused_before_ray_and_before_the_run_dir(tmp_path, capsys):
    import ray

    three = tmp_path / "three.txt"
    three.write_text("a red circle\ntwo blue squares\na green triangle\n")
    with pytest.raises(ValueError, match=r"three\.txt holds 3 prompts, fewer than the "
                       r"rollout\.prompts_per_step \(4\)"):
        _trainer(tmp_path, train={"prompts_file": str(three)}, rollout={"prompts_per_step": 4})
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(_data(tmp_path, train={"prompts_file": str(three)},
                                       rollout={"prompts_per_step": 4})))
    assert main(["train", "--config", str(config)]) == 2
    assert "fewer than the rollout.prompts_per_step (4)" in capsys.readouterr().err
    assert not (tmp_path / "pre").exists()  # no metrics file blocks the run name
    assert not ray.is_initialized()


def test_the_shipped_tiny_sd3_recipe_has_its_prompts_and_fits_two_cores():
    from actors.pool import resource_requests

    config = load_config(REPO / "configs/tiny_sd3.yaml")
    assert len(load_prompts(REPO / config.train.prompts_file)) >= config.rollout.prompts_per_step
    assert config.reward.functions  # `opgrpo train --config` needs a reward
    assert unmet_requests(resource_requests(config, 1), {"CPU": 2.0}) == []
    old = load_config(REPO / "configs/tiny_sd3.yaml", OLD_TINY_SD3)
    assert unmet_requests(resource_requests(old, 1), {"CPU": 2.0}) == [
        "CPU: 2.5 asked (rollout.num_cpus 1 x 1 actor + learner.num_cpus 1 x 1 rank + "
        "reward.num_cpus 0.5 x 1 actor), the cluster has 2 (missing 0.5)"]


def test_resource_shortfalls_name_every_field_and_unplaceable_actors():
    from actors.pool import resource_requests

    config = build_config({"rollout": {"num_actors": 3, "num_gpus": 1,
                                       "resources": {"rollout_slot": 1}},
                           "learner": {"num_ranks": 2, "num_gpus": 1, "num_cpus": 4}})

    problems = unmet_requests(resource_requests(config, 3),
                              {"CPU": 64, "GPU": 4, "rollout_slot": 2})
    assert problems == [
        "GPU: 5 asked (rollout.num_gpus 1 x 3 actors + learner.num_gpus 1 x 2 ranks), the "
        "cluster has 4 (missing 1)",
        "rollout_slot: 3 asked (rollout.resources.rollout_slot 1 x 3 actors), the cluster has "
        "2 (missing 1)"]
    # enough in total, but no single node holds one learner rank's 4 CPUs and 1 GPU
    nodes = [{"CPU": 3, "GPU": 4, "rollout_slot": 4}, {"CPU": 61}]
    (problem,) = unmet_requests(resource_requests(config, 3),
                                {"CPU": 64, "GPU": 8, "rollout_slot": 4}, nodes)
    assert problem.startswith("no node can hold one rank of learner (learner.num_cpus 4, "
                              "learner.num_gpus 1)")


# ----- item 3: a model directory of the wrong family, checked in the driver ----------------
def _model_dir(root: Path, pipeline: str, transformer: dict, vae: dict | None) -> Path:
    root.mkdir()
    index = {"_class_name": pipeline, "transformer": ["diffusers", "X"],
             "vae": ["diffusers", "Y"] if vae is not None else [None, None]}
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text(json.dumps(transformer))
    if vae is not None:
        (root / "vae").mkdir()
        (root / "vae" / "config.json").write_text(json.dumps(vae))
    return root


def test_a_model_of_the_wrong_family_is_refused_before_ray(tmp_path):
    import ray

    sdxl = _model_dir(tmp_path / "sdxl", "StableDiffusionXLPipeline", {}, None)
    with pytest.raises(ValueError, match=r"sdxl/model_index\.json: pipeline class "
                       r"'StableDiffusionXLPipeline' is not supported"):
        _trainer(tmp_path, model={"path": str(sdxl)})
    flux = _model_dir(tmp_path / "flux", "FluxPipeline", {"in_channels": 64},
                      {"block_out_channels": [8, 8, 8, 8]})
    with pytest.raises(ValueError, match=r"\(40x40\) must be multiples of 16 for .*flux "
                       r"\(FluxPipeline"):
        _trainer(tmp_path, model={"path": str(flux), "height": 40, "width": 40})
    with pytest.raises(ValueError, match=r"model\.num_frames is 5, but .*shapes-base holds a "
                       r"StableDiffusion3Pipeline, an image model"):
        _trainer(tmp_path, model={"num_frames": 5})
    wan = _model_dir(tmp_path / "wan", "WanPipeline", {"patch_size": [1, 2, 2]},
                     {"scale_factor_temporal": 4, "scale_factor_spatial": 8})
    with pytest.raises(ValueError, match=r"model\.num_frames \(6\) must be 4 k \+ 1"):
        _trainer(tmp_path, model={"path": str(wan), "num_frames": 6})
    with pytest.raises(ValueError, match=r"\(40x40\) must be multiples of 16 .*WanPipeline"):
        _trainer(tmp_path, model={"path": str(wan), "num_frames": 5, "height": 40,
                                  "width": 40})
    _trainer(tmp_path, model={"path": str(flux)})  # 32 x 32 fits: accepted
    _trainer(tmp_path, model={"path": str(wan), "num_frames": 5})
    assert not ray.is_initialized() and not (tmp_path / "pre").exists()


# ----- item 4: bounded sizes ------------------------------------------------------------------
@pytest.mark.parametrize(("dotted", "value", "message"), [
    ("model.height", 8192, "model.height: Input should be less than or equal to 4096"),
    ("model.width", 100, "model.width: Input should be a multiple of 8"),
    ("rollout.chunk_size", 100_000, "rollout.chunk_size: Input should be less than or equal "
     "to 4096"),
    ("train.max_staleness", 1000, "train.max_staleness: Input should be less than or equal "
     "to 64"),
    ("learner.max_nonfinite_steps", 0, "learner.max_nonfinite_steps: Input should be greater "
     "than or equal to 1"),
    ("train.step_timeout_s", 0, "train.step_timeout_s: Input should be greater than 0"),
])
def test_sizes_and_limits_are_bounded(dotted, value, message):
    with pytest.raises(ConfigError, match=message):
        build_config({}, [f"{dotted}={value}"])


# ----- item 5: a reward that returns the wrong number of scores ----------------------------
def test_a_reward_with_the_wrong_number_of_scores_is_named_in_the_reward_actor(monkeypatch):
    from actors.reward import RewardWorker
    from actors.rewards import REGISTRY, RewardSpec

    def one_short(images, prompts):  # a reward function with an off-by-one batch bug
        return {"short": np.ones(len(prompts) - 1)}

    monkeypatch.setitem(REGISTRY, "short", RewardSpec("short", "short", one_short, "bug"))
    worker = RewardWorker({"jpeg": 0.5, "short": 1.0})
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"reward 'short' returned 2 'short' scores for 3 "
                       "images"):
        worker.score(images, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"reward 'short' returned 2 'short' scores"):
        worker.score_with("short", images, ["a", "b", "c"])


# ----- item 6: a NaN loss is never stepped on ----------------------------------------------
_LEARNER = textwrap.dedent("""
    import json, math, sys
    import numpy as np, torch
    from learner.worker import SKIPPED_UPDATES, LearnerWorker, free_port
    from opgrpo.config import load_config
    from opgrpo.sampling import SamplingSpec, sample_groups

    port, out, trajs = free_port(), {}, None
    for stage in map(int, sys.argv[1:]):
        cfg = load_config("configs/shapes_tiny.yaml", overrides=[
            f"learner.zero_stage={stage}", "rollout.prompts_per_step=2", "rollout.group_size=4",
            "learner.micro_batch_size=4", "sampling.num_steps=4", "learner.kl_beta=0",
            "learner.timestep_fraction=0.25", "learner.learning_rate=1e-3"])
        w = LearnerWorker(cfg.model_dump(mode="json"), 0, 1)
        w.setup("127.0.0.1", port)
        if trajs is None:  # drawn by the base weights, which every learner starts from
            trajs = sample_groups(w.policy, ["a red circle", "a blue square"], ["a", "b"], 4,
                                  SamplingSpec.from_config(cfg), 0, 0, 0)
        adv = np.random.default_rng(0).standard_normal(8)

        def weights():
            return {n: p.detach().clone() for n, p in w.policy.transformer.named_parameters()
                    if p.requires_grad}

        def rows(nan_row):
            return [{"chunk": 0, "index": i, "valid": True,
                     "advantage": math.nan if i == nan_row else float(a)}
                    for i, a in enumerate(adv)]

        before = weights()
        skipped = w.train([trajs], rows(nan_row=5), 0)  # one NaN advantage: loss NaN
        after = weights()
        row = {"skipped": skipped[SKIPPED_UPDATES],
               "unchanged": all(torch.equal(before[n], after[n]) for n in before),
               "adam_state_after_skip": len(w.optimizer.state)}
        w.version = 0  # the same trajectories again, now with finite advantages
        trained = w.train([trajs], rows(nan_row=-1), 1)
        final = weights()
        row.update(skipped_finite=trained[SKIPPED_UPDATES],
                   moved=any(not torch.equal(after[n], final[n]) for n in final),
                   finite=all(bool(torch.isfinite(p).all()) for p in final.values()))
        out[stage] = row
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.parametrize("stage", [0, 2])
def test_a_nan_loss_skips_the_update_on_a_real_learner(stage):
    """A real LearnerWorker (DeepSpeed ZeRO-0, where DeepSpeed itself would apply NaN
    gradients, and ZeRO-2, the default; shapes model; in a fresh process: the process group
    is global) gets one NaN advantage: its loss is NaN, the update is skipped and counted, no
    weight and no Adam state moves; the same batch with finite advantages then trains."""
    began = time.monotonic()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _LEARNER, str(stage)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)  # ~30 s, more when loaded
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    for stage, row in result.items():
        assert row == {"skipped": 1.0, "unchanged": True, "adam_state_after_skip": 0,
                       "skipped_finite": 0.0, "moved": True, "finite": True}, stage
    assert list(result) == [str(stage)]
    print(f"learner NaN check, ZeRO-{stage}: {time.monotonic() - began:.1f} s")


def test_the_driver_stops_after_consecutive_non_finite_steps(tmp_path):
    from learner.worker import SKIPPED_UPDATES
    from opgrpo.errors import RunStopped

    trainer = _trainer(tmp_path, learner={"max_nonfinite_steps": 3})
    trainer._stop_if_not_finite(1, {SKIPPED_UPDATES: 1.0})
    trainer._stop_if_not_finite(2, {SKIPPED_UPDATES: 1.0})
    trainer._stop_if_not_finite(3, {SKIPPED_UPDATES: 0.0})  # a finite step resets the count
    trainer._stop_if_not_finite(4, {SKIPPED_UPDATES: 2.0})
    trainer._stop_if_not_finite(5, {SKIPPED_UPDATES: 1.0})
    with pytest.raises(RunStopped, match=r"NaN or infinite in 3 consecutive steps \(4, 5, 6; "
                       r"learner\.max_nonfinite_steps = 3\)"):
        trainer._stop_if_not_finite(6, {SKIPPED_UPDATES: 1.0})


# ----- items 2 and 7 on a small local Ray: infeasible requests, placement and step deadlines
@pytest.fixture(scope="module")
def small_ray():
    import ray

    ray.init(num_cpus=2, resources={"slot": 1}, include_dashboard=False, log_to_driver=False,
             namespace="opgrpo")
    yield ray
    ray.shutdown()


def test_requests_the_cluster_cannot_hold_fail_in_seconds(small_ray, tmp_path):
    data = _data(tmp_path)
    for dotted in OLD_TINY_SD3:
        section, rest = dotted.split(".", 1)
        key, value = rest.split("=")
        data.setdefault(section, {})[key] = float(value)
    from opgrpo.train import Trainer

    trainer = Trainer(build_config(data), tmp_path / "pre")
    began = time.monotonic()
    with pytest.raises(InfeasibleResources, match=r"CPU: 2\.5 asked \(rollout\.num_cpus 1 x 1 "
                       r"actor \+ learner\.num_cpus 1 x 1 rank \+ reward\.num_cpus 0\.5 x 1 "
                       r"actor\), the cluster has 2 \(missing 0\.5\)"):
        trainer.start_actors()
    assert time.monotonic() - began < 10
    assert not hasattr(trainer, "control")  # refused before any actor was created


def test_an_actor_that_cannot_be_placed_times_out_naming_it(small_ray, tmp_path):
    """The cluster has the resource, but another actor holds it: the wait is bounded by
    train.actor_start_timeout_s and the error names the actor and what it asked for."""
    from actors.pool import RolloutPool

    ray = small_ray

    @ray.remote(num_cpus=0, resources={"slot": 1})
    class Holder:
        def ready(self):
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())
    config = build_config(_data(tmp_path, rollout={"num_cpus": 0, "resources": {"slot": 1}},
                                train={"actor_start_timeout_s": 2}))
    pool = RolloutPool(config, {})
    began = time.monotonic()
    try:
        with pytest.raises(WaitTimeout, match=r"rollout actor 0: its start \(placement by Ray "
                           r"with 0 CPU, 0 GPU, resources \{'slot': 1\.0\}.*free in the "
                           r"cluster now: CPU 2.* did not finish within 2 s "
                           r"\(train\.actor_start_timeout_s\)"):
            pool.resize(1)
        assert time.monotonic() - began < 20
    finally:
        pool.shutdown()
        ray.kill(holder)


def test_a_step_that_does_not_finish_names_the_actor_and_the_chunk(small_ray):
    from opgrpo.driver import Rollout, score

    ray = small_ray

    @ray.remote(num_cpus=0)
    def chunk(seconds):
        time.sleep(seconds)
        return [seconds]

    fast, slow = chunk.remote(0), chunk.remote(60)
    ray.get(fast)  # done: only the slow chunk is waited for
    rollout = Rollout([fast, slow], [], [fast, slow], [], [], meta=[fast, slow], step=12,
                      actors=[(0, 0), (1, 0)])
    began = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"^rollout actor 1: chunk 1 of step 12 did not "
                       r"finish within 0\.5 s \(train\.step_timeout_s\)$"):
        rollout.wait_drawn(0.5)
    with pytest.raises(WaitTimeout, match=r"^reward actor 0: the rewards of chunk 1 of step "
                       r"12 did not finish within 0\.5 s"):
        score(rollout, 0.5)
    assert time.monotonic() - began < 10
    ray.cancel(slow, force=True)


def test_an_evaluation_that_does_not_finish_names_the_actor_and_the_step(small_ray):
    """train.eval_timeout_s bounds both halves of an evaluation: the images of a shard (from
    its rollout actor) and then their scores (from its reward actor)."""
    from opgrpo.train import eval_results

    ray = small_ray

    @ray.remote(num_cpus=0)
    def work(seconds):
        time.sleep(seconds)
        return {"score": np.zeros(1)}

    done, slow = [work.remote(0) for _ in range(4)], work.remote(60)
    ray.get(done)
    began = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"^rollout actor 1: the evaluation images of step 25 "
                       r"\(shard 3\) did not finish within 0\.5 s \(train\.eval_timeout_s\)$"):
        eval_results([*done[:3], slow], done, 25, 0.5, (2, 1))
    with pytest.raises(WaitTimeout, match=r"^reward actor 0: the evaluation scores of step 25 "
                       r"\(shard 1\) did not finish within 1 s \(train\.eval_timeout_s\)$"):
        eval_results(done[:2], [done[2], slow], 25, 0.5, (2, 1))
    assert eval_results(done[:1], done[1:2], 25, 0.5, (1, 1))[0]["score"].shape == (1,)
    assert time.monotonic() - began < 15
    ray.cancel(slow, force=True)


def test_a_checkpoint_save_or_load_that_hangs_names_the_learner_rank(small_ray, tmp_path):
    """LearnerGroup's checkpoint waits are bounded by train.step_timeout_s. The ranks here are
    LearnerWorkers whose DeepSpeed setup is skipped and whose checkpoint calls never return
    in time: what is under test is the group's wait, not the engine."""
    from learner.group import LearnerGroup
    from learner.worker import LearnerWorker

    class Stuck(LearnerWorker):
        def setup(self, master_addr, master_port):
            return 0

        def save_checkpoint(self, directory, tag):
            time.sleep(3)

        def load_checkpoint(self, directory, tag):
            time.sleep(60 if self.rank == 1 else 0)
            return 0

    config = build_config(_data(tmp_path, learner={"num_ranks": 2, "num_cpus": 0},
                                train={"step_timeout_s": 1}))
    group = LearnerGroup(config, {}, Stuck)
    try:
        group.wait_ready()
        began = time.monotonic()
        with pytest.raises(WaitTimeout, match=r"^learner rank 0: saving checkpoint step4 did "
                           r"not finish within 1 s \(train\.step_timeout_s\) \(1 more"):
            group.save_checkpoint(str(tmp_path), "step4")
        time.sleep(3)  # an actor runs one call at a time: let the saves end
        with pytest.raises(WaitTimeout, match=r"^learner rank 1: loading checkpoint step4 did "
                           r"not finish within 1 s"):
            group.load_checkpoint(str(tmp_path), "step4")
        assert time.monotonic() - began < 15
    finally:
        group.shutdown()


def test_opgrpo_scale_beyond_the_cluster_is_refused_in_seconds(small_ray, tmp_path):
    """`opgrpo scale --rollout 64` against a run on a 2-CPU cluster: the control actor knows
    the run's requests (the rollout pool sends them) and refuses at once; the driver's pool
    would also cap such a request at what fits."""
    from actors.control import NAMESPACE, Control, control_name
    from actors.pool import RolloutPool

    ray = small_ray
    config = build_config(_data(tmp_path, rollout={"num_cpus": 0.5},
                                learner={"num_cpus": 0.5}, reward={"num_cpus": 0.25}))
    control = ray.remote(Control).options(name=control_name("pre"), namespace=NAMESPACE,
                                          num_cpus=0).remote()
    pool = RolloutPool(config, {}, control=control)
    try:
        with pytest.raises(InfeasibleResources, match=r"rollout actors -> 64 refused.*CPU: "
                           r"32\.75 asked \(rollout\.num_cpus 0\.5 x 64 actors"):
            ray.get(control.set_rollout.remote(64))
        assert ray.get(control.set_rollout.remote(2)) == 2  # 2 x 0.5 + 0.75 fits
        assert pool.target_size(64) == 2  # the driver's cap: (2 - 0.75) / 0.5
        address = ray.get_runtime_context().gcs_address
        began = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "opgrpo", "scale", "--rollout", "64", "--run", "pre",
             "--address", address], cwd=REPO, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - began
        assert done.returncode == 2, done.stderr[-2000:]
        assert "error: rollout actors -> 64 refused, the cluster cannot hold them: CPU: " \
               "32.75 asked" in done.stderr
        assert "Traceback" not in done.stderr
        assert took < 60
        assert ray.get(control.status.remote())[0] == 2  # the request in place is kept
    finally:
        ray.kill(control)
