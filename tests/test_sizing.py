"""bench/sizing.py counts what the service's policy classes actually hold for the shipped
real-size configs (meta device, no weights), and the docs' tables are its output."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import sizing  # noqa: E402


@pytest.fixture(scope="module")
def result():
    return sizing.measure()


def test_components_dtypes_and_places(result):
    sd3 = result["configs"]["sd35m_geneval"]["components"]
    assert sd3["transformer"]["parameters_by_dtype"] == {"bfloat16": 2_243_171_520}
    assert set(sd3["text_encoder_3"]["parameters_by_dtype"]) == {"bfloat16"}  # not float32
    assert set(sd3["vae"]["parameters_by_dtype"]) == {"float32"}
    assert sd3["lora"]["parameters_by_dtype"] == {"float32": sd3["lora"]["parameters"]}
    assert all(c["where"] == "device" for c in sd3.values())  # the shipped config: no offload
    # Flow-GRPO's eight targets cover the text stream too: more than attention's four
    assert sd3["lora"]["parameters"] > 14_548_992
    wan = result["configs"]["wan21_ocr"]["components"]["transformer"]["parameters_by_dtype"]
    assert set(wan) == {"bfloat16", "float32"}  # diffusers keeps Wan's norms in float32
    for r in result["configs"].values():
        lora = r["lora"]["parameters"]
        assert r["lora"]["checkpoint_MiB"] == round(20 * lora / 2**20, 1)
        assert r["device_GiB"]["learner_rank_lora"] > r["device_GiB"]["rollout_actor"]


def test_offloaded_text_encoders_are_counted_on_the_host():
    from opgrpo.config import load_config

    config = load_config(REPO / "configs/sd35m_geneval.yaml",
                         ["model.offload_text_encoders=true"])
    policy = sizing.meta_policy("sd3", config.model)
    counted = sizing.count_policy(policy, offload=True)
    assert {n for n, c in counted.items() if c["where"] == "host"} == {
        "text_encoder", "text_encoder_2", "text_encoder_3"}


def test_docs_tables_are_the_counts(result):
    for doc, text in sizing.render_docs(result).items():
        assert text == (REPO / doc).read_text(), (
            f"{doc}: sizing table out of date; run python bench/sizing.py --docs")
