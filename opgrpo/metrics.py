"""Metric keys, defined once: every component logs under these names (metrics.jsonl columns)."""

REWARD_MEAN = "reward/mean"
REWARD_STD = "reward/std"
REWARD_FRESH_MEAN = "reward/fresh_mean"
REWARD_REPLAYED_MEAN = "reward/replayed_mean"
# groups of prompts drawn from the dataset only: the GRPO-comparable training reward (a buffer
# prompt is one the policy already solved once, so its fresh samples score higher)
REWARD_DATASET_MEAN = "reward/dataset_prompts_mean"
# samples whose total reward was NaN or infinite: dropped from their groups (not trained)
REWARD_DROPPED = "reward/dropped_nonfinite"

ADV_MASKED_GROUPS = "adv/masked_groups"
ADV_MASKED_FRACTION = "adv/masked_fraction"

LOSS_TOTAL = "loss/total"
LOSS_POLICY = "loss/policy"
LOSS_KL = "loss/kl"
LOSS_CLIPFRAC = "loss/clipfrac"
LOSS_CLIPFRAC_OFFPOLICY = "loss/clipfrac_offpolicy"
LOSS_APPROX_KL = "loss/approx_kl"
LOSS_RATIO_MEAN = "loss/ratio_mean"
# max |ratio - 1| over valid samples and trained steps: 0 up to numerics on-policy
LOSS_RATIO_DEV_MAX = "loss/ratio_dev_max"
LOSS_SEQ_WEIGHT_MEAN = "loss/seq_weight_mean"
LOSS_SEQ_WEIGHT_MAX = "loss/seq_weight_max"

BUFFER_SIZE = "buffer/size"
BUFFER_ADMISSIONS = "buffer/admissions"
BUFFER_REPLACEMENTS = "buffer/replacements"
BUFFER_EVICTIONS = "buffer/evictions"
BUFFER_CORRUPTED = "buffer/corrupted"  # damaged entries found when sampling, evicted
BUFFER_OUTAGES = "buffer/redis_outages"  # times Redis stopped answering and came back
BUFFER_REPLAYED_FRACTION = "buffer/replayed_prompt_fraction"
# replayed groups (those with a replayed sample) whose fresh samples alone would be a masked
# group: all the same reward, or fewer than two finite ones ...
BUFFER_REPLAY_FRESH_MASKED_FRACTION = "buffer/replay_fresh_masked_fraction"
# ... and of those, the ones the replayed sample un-masks by scoring above the fresh ones
# (binary rewards: every fresh sample failed, the replay succeeded). The share of replays that
# carry the learning signal `buffer.replay_draw = fail_rate` aims at.
BUFFER_REPLAY_RESCUED_FRACTION = "buffer/replay_rescued_fraction"

POLICY_VERSION_LAG_MEAN = "policy/version_lag_mean"
POLICY_VERSION_LAG_MAX = "policy/version_lag_max"
# staleness of the fresh steps: learner version at the update minus the version of the rollout
# actor that drew them (0 in sync mode; at most train.max_staleness in async mode)
POLICY_STALENESS_MEAN = "policy/staleness_mean"
POLICY_STALENESS_MAX = "policy/staleness_max"
# share of a learner rank's samples drawn by an older version: re-scored under pi_old
POLICY_RESCORED_FRACTION = "policy/rescored_fraction"


def read_rows(path) -> list[dict]:
    """The rows of a JSON-lines file (metrics, evaluations); [] if it does not exist. A
    process killed while it wrote a row (SIGKILL, a lost machine) leaves a torn last line,
    which is left out: that row's step is run again on resume."""
    import json
    import os

    if not os.path.isfile(path):
        return []
    with open(path) as file:
        text = file.read()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()
            if line.strip()]
