"""The learner: GRPO advantages and the OP-GRPO loss (pure functions); the DeepSpeed actor comes
with the distributed service."""
