"""Memory at real size, on a tiny SD3 pipeline of the real classes: frozen components in the
model dtype (VAE float32, LoRA float32), a bounded LRU prompt-embedding cache held in host
memory, and text encoders offloaded between encodes."""

import torch

from opgrpo.models import HOST, FlowPolicy

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


def test_bf16_policy_holds_each_component_in_its_dtype(tiny_sd3_dir):
    policy = FlowPolicy.from_pretrained(tiny_sd3_dir, dtype="bfloat16", lora_rank=4)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(policy.pipeline, name)
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, name
    assert {p.dtype for p in policy.vae.parameters()} == {torch.float32}
    frozen = {p.dtype for p in policy.transformer.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in policy.trainable_parameters()} == {torch.float32}


def test_prompt_cache_is_bounded_lru_in_host_memory(tiny_sd3_dir):
    policy = FlowPolicy.from_pretrained(tiny_sd3_dir, dtype="bfloat16", prompt_cache_size=2)
    fresh = FlowPolicy.from_pretrained(tiny_sd3_dir, dtype="bfloat16", prompt_cache_size=0)
    first = policy.encode_prompts(PROMPTS[:2])
    policy.encode_prompts([PROMPTS[0]])  # PROMPTS[0] is now the most recently used
    policy.encode_prompts([PROMPTS[2]])  # evicts PROMPTS[1]
    assert list(policy._prompt_cache) == [PROMPTS[0], PROMPTS[2]]
    for embeds, pooled in policy._prompt_cache.values():
        assert embeds.device == HOST and embeds.dtype == torch.bfloat16
        assert pooled.device == HOST
    again = policy.encode_prompts(PROMPTS[:2])  # PROMPTS[1] encoded anew: the same values
    assert again.prompt_embeds.device == policy.device
    torch.testing.assert_close(again.prompt_embeds, first.prompt_embeds)
    torch.testing.assert_close(again.pooled, first.pooled)
    uncached = fresh.encode_prompts(PROMPTS[:2])
    assert len(fresh._prompt_cache) == 0
    torch.testing.assert_close(uncached.prompt_embeds, first.prompt_embeds)


def test_offloaded_text_encoders_stay_on_the_host_and_give_the_same_embeddings(tiny_sd3_dir):
    on = FlowPolicy.from_pretrained(tiny_sd3_dir, offload_text_encoders=True)
    off = FlowPolicy.from_pretrained(tiny_sd3_dir)
    a, b = on.encode_prompts(PROMPTS), off.encode_prompts(PROMPTS)
    torch.testing.assert_close(a.prompt_embeds, b.prompt_embeds)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        assert next(getattr(on.pipeline, name).parameters()).device == HOST


def test_prune_checkpoints_keeps_the_newest_and_the_latest(tmp_path):
    from opgrpo.train import prune_checkpoints

    for step in (2, 4, 6, 8, 10):
        (tmp_path / f"step{step}").mkdir()
    (tmp_path / "latest.json").write_text("{}")
    assert prune_checkpoints(tmp_path, None, "step10") == []
    assert prune_checkpoints(tmp_path, 2, "step10") == ["step2", "step4", "step6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step10", "step8"]
    assert prune_checkpoints(tmp_path, 1, "step8") == []  # the latest one is never deleted
