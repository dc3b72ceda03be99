"""Tasks: what a run trains for, kept out of the library core (`opgrpo/`).

- `tasks.shapes`: the CPU stand-in for GenEval that the project ships end to end: the prompt
  grammar, the renderer, the tiny base model's architecture, its pretraining, its model card
  and the model itself (`tasks/shapes/shapes-base/`). Its reward is `actors/rewards/shapes.py`.
- `tasks.geneval`: GenEval's scoring rules and the HTTP scoring server that the `geneval`
  reward (`actors/rewards/geneval.py`) calls.
"""
