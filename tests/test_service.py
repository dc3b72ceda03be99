"""The Ray service end to end on the shipped shapes model: real Ray actors, an embedded Redis,
DeepSpeed ranks on CPU (gloo). Few steps, small batches; two runs (ZeRO-3 async, ZeRO-2 sync),
the second also checked for its run files and resumed (a Trainer's start costs more than its
steps)."""

import json
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import load_file

from opgrpo import metrics as M
from opgrpo.config import build_config
from opgrpo.driver import Iteration
from opgrpo.export import WEIGHTS_FILE, export_checkpoint
from opgrpo.train import Trainer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _config(tmp_path, **sections):
    data = {
        "model": {"path": str(REPO / "tasks/shapes/shapes-base"), "height": 32, "width": 32},
        "sampling": {"num_steps": 4, "guidance_scale": 1.0, "eval_num_steps": 4,
                     "eval_guidance_scale": 1.0},
        "rollout": {"num_actors": 2, "num_cpus": 0.25, "prompts_per_step": 4, "group_size": 4,
                    "chunk_size": 8},
        "reward": {"functions": {"shapes_partial": 1.0}, "num_actors": 1, "num_cpus": 0.25},
        "buffer": {"off_policy_fraction": 0.25, "capacity": 16, "truncate_step": 2},
        "learner": {"num_ranks": 2, "num_cpus": 0.25, "zero_stage": 2, "micro_batch_size": 8,
                    "kl_beta": 0.04, "learning_rate": 3e-3, "clip_range": 0.2},
        "train": {"num_steps": 3, "prompts_file": str(REPO / "configs/shapes/train_metadata.jsonl"),
                  "checkpoint_every": 2, "eval_every": 100},
        "run": {"name": "e2e", "output_dir": str(tmp_path), "seed": 0},
    }
    for section, values in sections.items():
        data[section].update(values)
    return build_config(data)


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="opgrpo")
    yield
    ray.shutdown()


def _learner_weights(trainer):
    state_ref, refs = trainer.learners.export_weights_async()
    ray.get(refs)
    return ray.get(state_ref)


def _check_rollout_holds_the_learners_weights(trainer, step: int) -> dict:
    """After `step`: every rollout actor holds the learner's weights, as version `step`;
    returns the learner's weights."""
    learner = _learner_weights(trainer)
    for worker in trainer.rollout.workers:
        held = ray.get(worker.weights.remote())
        assert held.keys() == learner.keys()
        assert all(np.array_equal(held[k], learner[k]) for k in learner)
    assert ray.get(trainer.rollout.workers[0].ready.remote()) == step
    return learner


def _check_checkpoint_weights(run_dir, learner) -> None:
    """A checkpoint carries the trainable weights as safetensors (gathered under ZeRO-3)."""
    saved = load_file(str(run_dir / "checkpoints" / "step3" / WEIGHTS_FILE))
    assert saved.keys() == learner.keys()
    assert all(np.array_equal(saved[k].numpy(), learner[k]) for k in learner)


def _check_three_rows(rows, mode: str, updates: int) -> None:
    """The metrics rows of a 3-step run with 2 rollout actors."""
    assert [r["version"] for r in rows] == [1, 2, 3]
    # Weight pushes are not waited for in async mode, yet each check after a step saw the
    # new version: an actor runs one caller's tasks in order, so the push came first.
    stale = [0, 1, 1] if mode == "async" else [0, 0, 0]
    assert [r[M.POLICY_STALENESS_MAX] for r in rows] == stale
    assert [r[M.POLICY_RESCORED_FRACTION] for r in rows] == stale
    if updates == 1:  # on-policy with one update: pi_theta == pi_old throughout
        assert abs(rows[0][M.LOSS_RATIO_MEAN] - 1.0) < 1e-4
        assert rows[0][M.LOSS_APPROX_KL] < 1e-8
    else:  # the second update of the same batch sees theta != pi_old
        assert rows[0][M.LOSS_APPROX_KL] > 0
    for row in rows:
        for key in (M.REWARD_MEAN, M.LOSS_CLIPFRAC, M.LOSS_APPROX_KL, M.BUFFER_SIZE,
                    M.POLICY_VERSION_LAG_MAX, "time/rollout", "time/train", "time/weight_sync",
                    "time/buffer", "images_per_s", "actors/rollout"):
            assert key in row, key
        assert row["actors/rollout"] == 2
        assert row["time/buffer_actor"] > 0  # admission (overlapped with training) did work
    assert rows[0][M.BUFFER_SIZE] > 0
    assert rows[0][M.BUFFER_REPLAYED_FRACTION] == 0  # nothing to replay before step 1
    replayed = [r for r in rows[1:] if r[M.BUFFER_REPLAYED_FRACTION] > 0]
    assert replayed, "a replayed prompt should appear once the buffer holds entries"
    assert all(r[M.POLICY_VERSION_LAG_MAX] >= 1 for r in replayed)
    assert all(np.isfinite(r[M.LOSS_SEQ_WEIGHT_MEAN]) for r in replayed)
    assert any(r[M.LOSS_SEQ_WEIGHT_MEAN] != 1.0 for r in replayed)
    # where the replays landed: shares of replayed groups, NaN in a step without replay
    assert all(0 <= r[M.BUFFER_REPLAY_RESCUED_FRACTION] <= r[M.BUFFER_REPLAY_FRESH_MASKED_FRACTION]
               <= 1 for r in replayed)
    assert np.isnan(rows[0][M.BUFFER_REPLAY_FRESH_MASKED_FRACTION])


def test_rescue_replays_a_stored_success_into_a_group_that_failed_whole(ray_session, tmp_path):
    """`buffer.replay_draw: rescue`: nothing is replayed before the rollout; step 1 stores its
    one success (scripted reward); at step 2 both fresh groups fail whole, and the group of the
    stored prompt gets the stored trajectory (its prefix kept, the tail redrawn) in place of its
    last fresh sample, while the other group, with nothing stored, stays masked."""
    from opgrpo.trajectory import decode_trajectories

    prompts = tmp_path / "two.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    config = _config(tmp_path, rollout={"num_actors": 1, "prompts_per_step": 2},
                     reward={"functions": {"tests.scripted_reward:FirstThenSingles": 1.0}},
                     buffer={"off_policy_fraction": 0.5, "replay_draw": "rescue"},
                     learner={"num_ranks": 1}, train={"mode": "sync", "prompts_file": str(prompts)},
                     run={"name": "rescue"})
    trainer = Trainer(config, tmp_path / "rescue")
    try:
        trainer.prepare()
        iteration = Iteration(trainer.config, trainer.rollout, trainer.rewards, trainer.buffer)
        first = trainer.step(iteration, 1)
        assert first[M.BUFFER_REPLAYED_FRACTION] == 0 and first[M.BUFFER_SIZE] == 1
        rollout, _ = trainer._rollout_and_score(iteration, 2, {})  # what step 2 will train on
        samples = rollout.samples
        assert sorted(s.group for s in samples) == [0, 0, 0, 0, 1, 1, 1, 1]  # sizes kept
        (replay,) = [s for s in samples if s.replayed]
        stored_meta, payload = trainer.buffer.lookup.options(num_returns=2).remote(
            [(replay.prompt_key, 0.0)], 1, 2)
        (meta,) = ray.get(stored_meta)
        (stored,) = decode_trajectories(ray.get(payload)[0])
        assert (replay.reward, replay.prefix_insert_step, replay.behaviour_version) == (
            1.0, meta["insert_step"], meta["version"]) == (1.0, 1, 0)
        fresh = [s for s in samples if s.group == replay.group and not s.replayed]
        assert len(fresh) == 3 and all(s.reward == 0.0 for s in fresh)
        assert replay.index not in {s.index for s in fresh if s.chunk == replay.chunk}
        (mixed,) = ray.get(rollout.trajectories[replay.chunk])
        k = trainer.config.truncate_step
        assert mixed.replayed and mixed.prompt_key == replay.prompt_key
        np.testing.assert_array_equal(mixed.latents[: k + 1], stored.latents[: k + 1])
        assert mixed.off_policy_mask[:k].all() and not mixed.off_policy_mask[k:].any()
        second = trainer.step(iteration, 2)  # drawn again from the same seeds, and trained
    finally:
        trainer.shutdown()
    assert second[M.BUFFER_REPLAYED_FRACTION] == 0.5
    assert second[M.BUFFER_REPLAY_FRESH_MASKED_FRACTION] == 1.0
    assert second[M.BUFFER_REPLAY_RESCUED_FRACTION] == 1.0
    assert second[M.ADV_MASKED_FRACTION] == 0.5  # the group with nothing stored
    assert second[M.REWARD_REPLAYED_MEAN] == 1.0 and np.isfinite(second[M.LOSS_TOTAL])
    assert second["time/rescue"] > 0


def test_three_steps_end_to_end_zero3_async(ray_session, tmp_path):
    """ZeRO-3, two optimizer steps per pass, async mode (max_staleness 1), the driver's steps
    one by one: after each, both rollout actors hold the learner's weights although no push
    was waited for; both ranks re-score their stale samples with the same number of forwards
    (parameters are gathered collectively); the checkpoint's safetensors hold the gathered
    weights."""
    config = _config(tmp_path, learner={"zero_stage": 3, "optimizer_steps_per_pass": 2,
                                        "micro_batch_size": 4},
                     run={"name": "e2e-z3"}, train={"mode": "async", "max_staleness": 1})
    trainer = Trainer(config, tmp_path / "e2e-z3")
    try:
        assert trainer.prepare() == 1
        iteration = Iteration(trainer.config, trainer.rollout, trainer.rewards, trainer.buffer)
        rows = []
        for step in (1, 2, 3):
            rows.append(trainer.step(iteration, step))
            learner = _check_rollout_holds_the_learners_weights(trainer, step)
        trainer.checkpoint(3)
        _check_checkpoint_weights(tmp_path / "e2e-z3", learner)
    finally:
        trainer.shutdown()
    _check_three_rows(rows, "async", updates=2)


def test_three_steps_end_to_end_zero2_sync_then_metrics_checkpoints_eval_and_resume(
        ray_session, tmp_path):
    """ZeRO-2 over 2 ranks, sync mode, one optimizer step per pass, `Trainer.run` with the
    jsonl and tensorboard loggers. After each step both rollout actors hold the learner's
    weights; the step-3 checkpoint's safetensors hold them; the evaluation over both rollout
    actors is what one process gives. metrics.jsonl, checkpoints step2 and step3 (each with
    the buffer's fingerprint) and the run's id are written. Then a resume from step 2 (as if
    step 3 never finished, with an evaluation row after step 2 that must go) to step 4: the
    same run id (the buffer rolled back and matched), every step once, TensorBoard with step
    3 once, and the exported policy of the last checkpoint the same from its safetensors copy
    and from DeepSpeed's module state."""
    config = _config(tmp_path, learner={"zero_stage": 2, "optimizer_steps_per_pass": 1,
                                        "micro_batch_size": 8},
                     run={"name": "e2e-z2", "loggers": ["jsonl", "tensorboard"]},
                     train={"mode": "sync", "max_staleness": 1})
    run_dir = tmp_path / "e2e-z2"
    trainer = Trainer(config, run_dir)
    rows, learner = [], {}
    run_step = trainer.step

    def checked_step(iteration, step):  # the run's own step, then the checks of each step
        rows.append(run_step(iteration, step))
        learner.update(_check_rollout_holds_the_learners_weights(trainer, step))
        return rows[-1]

    trainer.step = checked_step
    try:
        trainer.run()
        _check_checkpoint_weights(run_dir, learner)  # the run's final checkpoint, step 3
        _check_evaluation_over_two_actors(trainer, learner, run_dir)
    finally:
        trainer.shutdown()
    assert [r["step"] for r in rows] == [1, 2, 3]
    _check_three_rows(rows, "sync", updates=1)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 3
    # the buffer's fingerprint at each checkpoint; the run's id, in its buffer's namespace
    fingerprint = json.loads((run_dir / "checkpoints" / "step2" / "buffer.json").read_text())
    assert fingerprint["entries"] > 0 and latest["buffer"]["entries"] > 0
    first_id = (run_dir / "run_id").read_text().strip()
    assert trainer.run_id == first_id and len(first_id) == 12
    # resume from the step-2 checkpoint: pretend step 3 never finished
    (run_dir / "checkpoints" / "latest.json").write_text(
        json.dumps({"step": 2, "tag": "step2", "version": 2}))
    # an evaluation written after that checkpoint must not survive (step 3 is run again)
    (run_dir / "eval.jsonl").write_text("".join(
        json.dumps({"step": s, "strict": 0.5}) + "\n" for s in (0, 2, 3)))
    resumed = Trainer(build_config(config.model_dump(mode="json"), ["train.num_steps=4"]),
                      run_dir, resume=True)
    try:
        resumed.run()
        size = ray.get(resumed.buffer.stats.remote())["size"]
    finally:
        resumed.shutdown()
    assert resumed.run_id == first_id  # same namespace: the buffer rolled back and matched
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2]
    assert rows[2]["version"] == 3 and rows[3]["version"] == 4
    assert size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator as EA
    (events := EA(str(run_dir / "tensorboard"))).Reload()  # step 3 once: the resumed one's
    assert [e.step for e in events.Scalars(M.LOSS_TOTAL)] == [1, 2, 3, 4]
    # the exported policy of the last checkpoint: from the safetensors copy, and (older
    # checkpoints) from DeepSpeed's module state read with weights_only: the same weights
    from_safetensors = export_checkpoint(run_dir, tmp_path / "a")
    (run_dir / "checkpoints" / "step4" / WEIGHTS_FILE).unlink()
    from_deepspeed = export_checkpoint(run_dir, tmp_path / "b")
    a = load_file(str(from_safetensors / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(from_deepspeed / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(str(REPO / "tasks" / "shapes" / "shapes-base" / "transformer"
                         / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(a[k], base[k].float()) for k in base)  # it did train


def _check_evaluation_over_two_actors(trainer, learner, run_dir):
    """The evaluation spreads its prompts over both rollout actors and gives the images and
    summary one process gives for all prompts with the same weights."""
    from actors.rewards import get_reward, score_frames
    from opgrpo.evaluate import EvalSettings, generate
    from opgrpo.models import FlowPolicy
    from opgrpo.prompts import load_prompts

    cfg = trainer.config
    trainer.eval_prompts = load_prompts(REPO / "configs/shapes/test_metadata.jsonl")[:5]
    n = cfg.train.eval_images_per_prompt
    summary = trainer.evaluate(3)
    row = json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])
    assert row["actors"] == 2 and row["step"] == 3 and summary["n_images"] == 5 * n
    assert set(summary["per_tag"]) == {"single_object", "two_object"}
    assert (run_dir / "samples" / "step00003.png").is_file()
    policy = FlowPolicy.from_config(cfg)
    policy.load_trainable_state_dict({k: torch.from_numpy(v) for k, v in learner.items()})
    settings = EvalSettings(n, cfg.sampling.eval_num_steps, cfg.sampling.eval_guidance_scale,
                            cfg.run.seed, height=32, width=32)
    local = generate(policy, trainer.eval_prompts, settings, quantise=True)
    second = ray.get(trainer.rollout.worker(1).evaluate.remote(  # the second actor's shard
        [(r.text, r.key) for r in trainer.eval_prompts[2:]], n, cfg.sampling.eval_num_steps,
        cfg.sampling.eval_guidance_scale, cfg.run.seed))
    assert second.dtype == np.uint8
    assert np.abs(second.astype(int) - local[2 * n:].astype(int)).max() <= 1
    spec = get_reward("shapes_partial")
    texts = [r.text for r in trainer.eval_prompts for _ in range(n)]
    expected = spec.summarize(score_frames(spec, np.moveaxis(local / 255.0, -1, -3), texts),
                              texts)
    assert summary == expected
