"""Ray actors that act: rollout (SDE trajectories) and reward scoring (added with the service)."""
