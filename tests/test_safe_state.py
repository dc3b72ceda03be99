"""Checkpoint files without pickle: the safetensors + JSON codec and DeepSpeed's engine on it."""

import json
import math
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from learner.safe_state import FORMAT, METADATA_KEY, UnsafeStateError, load_state, save_state

REPO = Path(__file__).resolve().parents[1]


def test_round_trip_keeps_types_values_and_order(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    scaler = LossScaler(scale=4.0)
    state = {
        "module": OrderedDict([("b.weight", torch.randn(3, 2)), ("a.bias", torch.arange(4))]),
        "optimizer": {"state": {0: {"step": torch.tensor(6.0),
                                    "exp_avg": torch.randn(5, dtype=torch.bfloat16)}},
                      "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.999), "params": [0]}]},
        "shapes": [OrderedDict([("w", torch.Size([4, 4]))])],
        "stage": ZeroStageEnum.gradients,
        "loss_scaler": scaler,
        "flags": [True, None, "text", -3, math.inf, -math.inf, math.nan],
        "dtype": torch.float16,
        "empty": torch.zeros(0),
    }
    path = tmp_path / "state.pt"
    save_state(state, path)
    back = load_state(path)
    assert list(back["module"]) == ["b.weight", "a.bias"]
    assert isinstance(back["module"], OrderedDict)
    assert torch.equal(back["module"]["b.weight"], state["module"]["b.weight"])
    assert torch.equal(back["module"]["a.bias"], state["module"]["a.bias"])
    exp_avg = back["optimizer"]["state"][0]["exp_avg"]  # int keys stay ints
    assert exp_avg.dtype == torch.bfloat16 and torch.equal(exp_avg,
                                                           state["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples stay tuples
    assert back["shapes"][0]["w"] == torch.Size([4, 4])
    assert back["stage"] is ZeroStageEnum.gradients
    assert type(back["loss_scaler"]) is LossScaler and back["loss_scaler"].cur_scale == 4.0
    assert back["flags"][:6] == [True, None, "text", -3, math.inf, -math.inf]
    assert math.isnan(back["flags"][6])
    assert back["dtype"] is torch.float16 and back["empty"].shape == (0,)


def test_a_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": Payload()}, path)
    with pytest.raises(UnsafeStateError, match="not an opgrpo safetensors checkpoint"):
        load_state(path)
    assert not marker.exists()


def test_a_type_outside_the_allowlist_is_refused_on_load_and_save(tmp_path):
    path = tmp_path / "forged.pt"
    structure = {"__object__": "os.system", "state": {"__dict__": [], "ordered": False}}
    save_file({}, str(path), metadata={METADATA_KEY: json.dumps(structure), "format": FORMAT})
    with pytest.raises(UnsafeStateError, match="'os.system' is not on the allowlist"):
        load_state(path)

    class Custom:
        pass

    with pytest.raises(UnsafeStateError, match="Custom"):
        save_state({"x": Custom()}, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_missing_and_foreign_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_state(tmp_path / "nope.pt")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(plain))
    with pytest.raises(UnsafeStateError, match="no opgrpo-safe-state"):
        load_state(plain)


# A real DeepSpeed engine (one gloo rank, in a fresh process: the process group is global)
# saves through SafeCheckpointEngine, a second engine loads, and both continue identically.
_ENGINE_SCRIPT = textwrap.dedent("""
    import json, os, socket, sys
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch, deepspeed
    from learner.safe_state import SafeCheckpointEngine
    from learner.worker import init_distributed
    init_distributed(use_gpu=False)
    stage, directory = int(sys.argv[1]), sys.argv[2]

    def engine():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                  "gradient_clipping": 1.0}
        eng = deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]
        eng.checkpoint_engine = SafeCheckpointEngine()
        return eng

    def step(eng, seed):
        torch.manual_seed(seed)
        loss = eng(torch.randn(1, 6)).pow(2).sum()
        eng.backward(loss)
        eng.step()
        return float(loss)

    first = engine()
    for i in range(3):
        step(first, i)
    first.save_checkpoint(directory, tag="t", client_state={"version": 3})
    expected = [step(first, i) for i in range(3, 6)]
    second = engine()
    _, client = second.load_checkpoint(directory, tag="t")
    print(json.dumps({"expected": expected, "got": [step(second, i) for i in range(3, 6)],
                      "version": client["version"]}))
""")


@pytest.mark.parametrize("stage", [1, 3])
def test_deepspeed_checkpoint_round_trip_without_pickle(tmp_path, stage):
    out = subprocess.run([sys.executable, "-c", _ENGINE_SCRIPT, str(stage), str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["version"] == 3
    assert result["got"] == result["expected"]  # optimizer state and weights came back exactly
    files = sorted(p.name for p in (tmp_path / "t").glob("*.pt"))
    assert files and all(name.endswith("_states.pt") for name in files)
    for name in files:  # every file is safetensors (a pickle zip starts with "PK")
        assert (tmp_path / "t" / name).read_bytes()[:2] != b"PK"
        load_state(tmp_path / "t" / name)
