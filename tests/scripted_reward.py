"""A scripted reward for the test of `buffer.replay_draw: rescue` (tests/test_service.py),
loaded by import path `tests.scripted_reward:FirstThenSingles` in the real RewardWorker actor.

The first call's first image succeeds (1.0) and its other images fail (0.0). Afterwards a call
of exactly one image (the driver's rescue chunk) succeeds, and every image of a larger call (a
step's fresh samples, drawn in one chunk) fails. With one reward actor, step 1 stores one
success in the buffer and every later fresh group fails whole."""

import numpy as np


class FirstThenSingles:
    key = "scripted"
    description = "1.0 for the first image ever scored and for single-image calls, else 0.0"

    def __init__(self) -> None:
        self.calls = 0

    def score(self, images, prompts):
        scores = np.zeros(len(prompts))
        if self.calls == 0 or len(prompts) == 1:
            scores[0] = 1.0
        self.calls += 1
        return {"scripted": scores}
