"""Replay buffer of high-reward trajectories: the pure rules (rules.py); Redis store to come."""
