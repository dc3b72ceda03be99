"""bench/gpu_check.py on the CPU: the random SD3.5-M-layout pipeline it builds for GPUs (shrunk
to tiny sizes here) runs every part (the Ray service part too) and gives finite, sensible
numbers; a local model directory builds; without Ray the service part is reported as skipped
and the run still succeeds; asking for CUDA without a GPU is refused.

The script runs in a subprocess: its learner joins a torch.distributed process group, which is
global to a process.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
MEASURED = ("build", "rollout", "learner_setup", "weight_push", "on_policy", "learner")
SMALL = ["--device", "cpu", "--size", "32", "--steps", "4", "--batch", "4", "--learner-batch",
         "2", "--rollout-batches", "1", "--updates", "1", "--push-repeats", "2"]

# Run the script with SD3.5-M's component configs shrunk to tiny sizes of the same layout: the
# random pipeline is built as on a GPU (same classes, dual attention, RMS q/k norm, T5,
# 16-channel VAE), only smaller. First argument "no-ray": Ray is not importable (`import ray`
# fails, find_spec("ray") is None).
_SHRUNK = textwrap.dedent("""
    import sys
    if sys.argv.pop(1) == "no-ray":
        sys.modules["ray"] = None
    sys.path.insert(0, sys.argv[1])
    import gpu_check as g
    g.CLIP_L = {"vocab_size": 600, "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 2,
                "max_position_embeddings": 77, "projection_dim": 32, "hidden_act": "quick_gelu"}
    g.CLIP_G = {**g.CLIP_L, "hidden_size": 48, "projection_dim": 48, "hidden_act": "gelu"}
    g.T5_XXL = {"vocab_size": 200, "d_model": 96, "d_kv": 16, "d_ff": 64, "num_layers": 2,
                "num_heads": 2, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False}
    g.SD35M_TRANSFORMER = {**g.SD35M_TRANSFORMER, "sample_size": 16, "num_layers": 2,
                           "attention_head_dim": 16, "num_attention_heads": 2,
                           "joint_attention_dim": 96, "caption_projection_dim": 32,
                           "pooled_projection_dim": 80, "pos_embed_max_size": 16,
                           "dual_attention_layers": [0]}
    g.VAE = {**g.VAE, "down_block_types": ["DownEncoderBlock2D"] * 2,
             "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [8, 16],
             "layers_per_block": 1, "norm_num_groups": 4}
    sys.exit(g.main(sys.argv[2:]))
""")


def _env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _result(proc: subprocess.CompletedProcess, out: Path) -> dict:
    """The JSON the run wrote, once it exited 0; else a message with each part's outcome."""
    result = json.loads(out.read_text()) if out.is_file() else {}
    outcome = {name: {k: v for k, v in part.items() if k in ("status", "error", "reason")}
               for name, part in result.get("parts", {}).items()}
    assert proc.returncode == 0, (outcome, proc.stdout[-2000:], proc.stderr[-2000:])
    return result


def _check_measurements(parts: dict) -> None:
    for name in MEASURED:
        assert parts[name]["status"] == "ok", (name, parts[name])
    rollout, learner = parts["rollout"], parts["learner"]
    assert rollout["images_per_s"] > 0 and len(rollout["batch_s"]) == 1
    assert all(t > 0 for t in rollout["batch_s"])
    assert parts["build"]["component_dtypes"]["transformer"] == "torch.bfloat16"
    assert parts["build"]["component_dtypes"]["vae"] == "torch.float32"
    setup = parts["learner_setup"]
    assert setup["deepspeed_accelerator"] == "cpu" and setup["base_weights_equal_rollout"]
    assert setup["trainable_dtypes"] == ["torch.float32"]
    assert setup["frozen_transformer_dtypes"] == ["torch.bfloat16"]
    push = parts["weight_push"]
    assert push["push_s"] > 0 and push["exact"] and push["payload_MiB"] > 0
    assert push["tensors"] > 0
    on_policy = parts["on_policy"]
    assert 0 <= on_policy["ratio_dev_max"] < 1e-2, on_policy
    assert on_policy["rescore_max_abs_logprob_diff"] < 1e-2, on_policy
    # 2 micro-batches of 2, 3 trained steps of 4 (timestep_fraction 0.99)
    assert learner["s_per_update"] > 0 and learner["first_update_s"] > 0
    assert learner["samples_per_update"] == 4 and learner["trained_steps_per_sample"] == 3
    assert learner["optimizer_steps_taken"] == 2  # the first update and a timed one
    assert learner["loss_finite"] and math.isfinite(learner["s_per_sample_step"])
    # no CUDA: no GPU memory numbers, and none made up
    assert rollout["peak_allocated_GiB"] is None and learner["peak_allocated_GiB"] is None


def test_all_parts_on_the_random_sd35m_layout_shrunk_on_cpu(tmp_path):
    """What `make gpu-check` runs on a GPU, on the CPU at tiny sizes: every part, the Ray
    service part (on its own tiny SD3 model) included."""
    out = tmp_path / "gpu_check.json"
    proc = _run([sys.executable, "-c", _SHRUNK, "ray", str(REPO / "bench"), *SMALL,
                 "--out", str(out)])
    result = _result(proc, out)
    assert result["model"].startswith("SD3.5-Medium sizes")
    _check_measurements(result["parts"])
    params = result["parts"]["build"]["parameters"]
    assert set(params) == {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3",
                           "vae"}
    assert result["device"]["type"] == "cpu"
    for name in ("torch", "diffusers", "deepspeed"):
        assert result["versions"][name]
    service = result["parts"]["service"]
    assert service["status"] == "ok", service
    assert service["steps"] == 2 and service["versions"] == [1, 2]
    assert all(x > 0 for x in service["images_per_s"] + service["s_per_iteration"])
    assert service["placement"]["mode"] == "sync"
    assert result["summary"]["rollout_images_per_s"] == result["parts"]["rollout"][
        "images_per_s"]
    assert "part on_policy: ok" in proc.stdout  # progress lines as it goes


def test_a_model_directory_builds_and_without_ray_the_service_is_skipped(tiny_sd3_dir,
                                                                         tmp_path):
    """`--model-dir` loads a local diffusers pipeline in the run's dtypes; without Ray the
    service part says why it is skipped and the run still succeeds."""
    out = tmp_path / "gpu_check.json"
    proc = _run([sys.executable, "-c", _SHRUNK, "no-ray", str(REPO / "bench"), *SMALL,
                 "--model-dir", str(tiny_sd3_dir), "--parts", "build", "service",
                 "--out", str(out)])
    result = _result(proc, out)
    assert result["model"] == f"local diffusers directory {tiny_sd3_dir}"
    build = result["parts"]["build"]
    assert build["status"] == "ok", build
    assert build["component_dtypes"]["transformer"] == "torch.bfloat16"
    assert build["component_dtypes"]["vae"] == "torch.float32"
    assert all(result["parts"][name]["status"] == "skipped" for name in MEASURED[1:])
    service = result["parts"]["service"]
    assert service["status"] == "skipped" and "Ray is not installed" in service["reason"]
    assert "Ray is not installed" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_refused(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _run([sys.executable, str(SCRIPT), "--out", str(out)], timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--device cpu" in proc.stderr
    assert not out.exists()
