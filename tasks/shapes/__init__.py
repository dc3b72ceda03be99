"""The shapes task: GenEval in miniature, small enough to train on a CPU (see tasks/__init__)."""
