"""peft's LoRA on a tiny LLaMA built from config (random weights, dict batches): compress()
trains A and B from factors and leaves the frozen base layers out; compressing before
get_peft_model is named by a warning; at eps = 1 the step equals plain autograd in float64."""

import copy
import warnings

import pytest
import torch

import actcomp
from actcomp.attach.swap import FrozenLayerWarning
from conftest import rel_err

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).train()


def lora(model):
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return peft.get_peft_model(model, config)


def batch_of(seed=0):
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def test_compress_trains_lora_a_b_and_leaves_frozen_base_layers_out():
    torch.manual_seed(0)
    model = lora(tiny_llama())
    batch = batch_of()
    actcomp.compress(model, sample=batch, eps=0.9)
    layers = actcomp.compressed_layers(model)
    assert layers and all(".lora_A." in n or ".lora_B." in n for n in layers)
    assert len(layers) == 8  # q and v of 2 blocks, A and B each
    with actcomp.count_saved(model) as saved:
        loss = model(**batch).loss
    loss.backward()
    layer_stats = actcomp.stats(model)
    assert set(layer_stats) == set(layers)
    # q's and v's A read the same input: factored once, kept by the first
    for block in range(2):
        prefix = f"base_model.model.model.layers.{block}.self_attn."
        q, v = layer_stats[prefix + "q_proj.lora_A.default"], layer_stats[prefix + "v_proj.lora_A.default"]
        assert q.kept_bytes > 0 and v.kept_bytes == 0
    plain = copy.deepcopy(model)
    actcomp.restore(plain)
    with actcomp.count_saved(plain) as saved_plain:
        loss = plain(**batch).loss
    loss.backward()
    assert saved.saved_bytes <= saved_plain.saved_bytes
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_lora_at_eps_one_equals_plain_autograd_in_float64():
    torch.manual_seed(0)
    model = lora(tiny_llama()).double()
    reference = copy.deepcopy(model)
    batch = batch_of(1)

    def gradients(m):
        m.zero_grad()
        m(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    expected = gradients(reference)
    actcomp.compress(model, sample=batch, eps=1.0)
    ours = gradients(model)
    assert set(ours) == set(expected) and len(ours) == 8
    assert max(rel_err(ours[n], expected[n]) for n in ours) < 1e-10


def test_compressing_before_get_peft_model_is_named_by_a_warning_and_compress_again_fixes_it():
    torch.manual_seed(0)
    base = tiny_llama()
    batch = batch_of()
    actcomp.compress(base, sample={"input_ids": batch["input_ids"]}, eps=0.9)
    model = lora(base)
    with pytest.warns(FrozenLayerWarning, match=r"'model.layers.0.self_attn.q_proj' \(Linear, now 'model.layers.0.self_attn.q_proj.base_layer'\)"):
        model(**batch).loss.backward()
    actcomp.compress(model, sample=batch, eps=0.9)
    assert all("lora_" in n for n in actcomp.compressed_layers(model))
    assert all(actcomp.layer_state(m) is None for n, m in model.named_modules() if n.endswith("base_layer"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenLayerWarning)
        model(**batch).loss.backward()


def test_frozen_layers_are_left_out_only_where_some_layer_trains():
    model = tiny_llama()
    model.lm_head.requires_grad_(False)
    actcomp.compress(model)
    assert "lm_head" not in actcomp.compressed_layers(model) and len(actcomp.compressed_layers(model)) == 14
    frozen = tiny_llama().requires_grad_(False)  # nothing trains: every layer as asked, none warns
    actcomp.compress(frozen)
    assert len(actcomp.compressed_layers(frozen)) == 15


def test_adapters_save_and_merge_after_compress(tmp_path):
    torch.manual_seed(0)
    model = lora(tiny_llama())
    batch = batch_of()
    actcomp.compress(model, sample=batch, eps=0.9)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).zero_grad()
    model(**batch).loss.backward()
    for p in model.parameters():
        if p.grad is not None:
            p.data -= 0.1 * p.grad
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() or (tmp_path / "adapter_model.bin").exists()
    model.eval()
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"]).logits
    merged = model.merge_and_unload()  # the compressed A and B go with their wrappers
    with torch.no_grad():
        after = merged(input_ids=batch["input_ids"]).logits
    assert rel_err(after, before) < 1e-5
