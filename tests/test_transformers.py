"""Transformers people fine-tune, built from small configs with random weights (no download):
Hugging Face GPT-2 and BERT, torchvision ViT, Swin and Swin V2. Every Linear-like layer whose
kernel can run is compressed; they train, and at eps = 1 every gradient equals plain
autograd's in float64 (the generic packer at eps = 1 included)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actcomp
from actcomp.core.state import KernelNotRunWarning
from conftest import rel_err


def gpt2(attn="sdpa"):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    config._attn_implementation = attn
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, 64, (3, 12))
    return model, tokens, lambda out, _: out.logits[:, :-1].flatten(0, 1).float().pow(2).mean() + F.cross_entropy(out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def bert(attn="sdpa"):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=64,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    config._attn_implementation = attn
    model = transformers.BertForSequenceClassification(config)
    tokens = torch.randint(1, 64, (3, 12))
    labels = torch.tensor([0, 1, 2])
    return model, tokens, lambda out, _: F.cross_entropy(out.logits, labels)


def vit():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5)
    return model, torch.randn(3, 3, 32, 32), lambda out, _: F.cross_entropy(out, torch.tensor([0, 1, 2]))


def swin(v2=False):
    pytest.importorskip("torchvision")
    from torchvision.models import swin_transformer as st

    extra = dict(block=st.SwinTransformerBlockV2, downsample_layer=st.PatchMergingV2) if v2 else {}
    model = st.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
        stochastic_depth_prob=0.0, num_classes=5, **extra,
    )
    return model, torch.randn(3, 3, 32, 32), lambda out, _: F.cross_entropy(out, torch.tensor([0, 1, 2]))


MODELS = {
    "gpt2": gpt2,
    "gpt2-eager": lambda: gpt2("eager"),
    "bert": bert,
    "bert-eager": lambda: bert("eager"),
    "vit": vit,
    "swin": swin,
    "swin_v2": lambda: swin(v2=True),
}
# layers left out of layers="all" because their parent's forward uses their weight itself
# (none: the attention kernels call the projections of ViT's and Swin's attention)
READ_BY_PARENT: dict[str, int] = {}


def linear_like(model):
    """Every module computing with a weight as a Linear does: Linear, its subclasses, HF Conv1D."""
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}


def compress_all(model, x, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actcomp.compress(model, "all", sample=x[:1], **kwargs)
    return [w for w in caught if issubclass(w.category, KernelNotRunWarning)]


@pytest.mark.parametrize("name", list(MODELS))
def test_trains_three_steps_with_every_linear_like_layer_compressed(name):
    torch.manual_seed(0)
    model, x, loss_fn = MODELS[name]()
    model.train()
    neighbours = actcomp.Neighbours(activations="bits4", generic=True, threshold=1024)
    notes = compress_all(model, x, eps=0.9, neighbours=neighbours)
    layers = actcomp.compressed_layers(model)
    left_out = linear_like(model) - set(layers)
    assert len(left_out) == READ_BY_PARENT.get(name, 0) and len(notes) == (1 if left_out else 0)
    assert all(f"'{n}'" in str(notes[0].message) for n in left_out)
    plain = copy.deepcopy(model)
    actcomp.restore(plain)
    with actcomp.count_saved(plain) as saved_plain:
        loss_fn(plain(x), None).backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelNotRunWarning)
        for _ in range(3):
            optimizer.zero_grad()
            with actcomp.count_saved(model) as saved:
                loss = loss_fn(model(x), None)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    states = [actcomp.layer_state(m) for n, m in model.named_modules() if n in layers]
    assert all(s.runs == 3 and s.missed == 0 for s in states)
    assert saved.saved_bytes < saved_plain.saved_bytes


@pytest.mark.parametrize("name", list(MODELS))
def test_eps_one_equals_plain_autograd_in_float64(name):
    torch.manual_seed(0)
    model, x, loss_fn = MODELS[name]()
    model = model.double().train()
    x = x.double() if x.is_floating_point() else x
    reference = copy.deepcopy(model)

    def gradients(m):
        m.zero_grad()
        out = m(x)
        loss_fn(out, None).backward()
        return [p.grad.clone() for p in m.parameters()]

    expected = gradients(reference)
    compress_all(model, x, eps=1.0, neighbours=actcomp.Neighbours(generic=True, threshold=0))
    ours = gradients(model)
    assert all(actcomp.layer_state(m).runs == 1 for n, m in model.named_modules() if n in actcomp.compressed_layers(model))
    assert max(rel_err(a, b) for a, b in zip(ours, expected)) < 1e-8


@pytest.mark.parametrize("name", ["vit", "swin", "swin_v2"])  # HF's attention itself cannot reshape 0 sequences
def test_empty_batch_runs_through_a_transformer(name):
    torch.manual_seed(0)
    model, x, _ = MODELS[name]()
    compress_all(model, x, eps=0.9, neighbours=actcomp.Neighbours(activations="bits4", generic=True, threshold=0))
    out = model(x[:0])
    assert out.shape == (0, 5)
    out.sum().backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    stats = actcomp.stats(model)
    assert all(s.kept_bytes == 0 for s in stats.values() if 0 in s.input_shape)
    assert all("cpb_mlp" in n for n, s in stats.items() if 0 not in s.input_shape)  # swin_v2's table, not the batch


def llama(family="llama"):
    """A tiny LLaMA-family causal LM from config (random weights) and a batch of token ids."""
    transformers = pytest.importorskip("transformers")
    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    model = model_class(config_class(**sizes)).train()
    return model, torch.randint(0, 64, (2, 16))


def saved_by_step(model, batch):
    with actcomp.count_saved(model) as saved:
        loss = model(**batch).loss
    loss.backward()
    return saved.saved_bytes


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("eps", [1.0, 0.9])
def test_llama_family_step_never_keeps_more_than_plain(family, eps):
    """Every Linear compressed: a layer whose factors would outweigh its input keeps the input
    (policy "plain"), so the whole step keeps at most what plain autograd keeps, at any eps."""
    torch.manual_seed(0)
    model, ids = llama(family)
    batch = {"input_ids": ids, "labels": ids}
    plain = saved_by_step(model, batch)
    actcomp.compress(model, sample={"input_ids": ids}, eps=eps)
    assert set(actcomp.compressed_layers(model)) == linear_like(model)
    ours = saved_by_step(model, batch)
    assert ours <= plain
    layer_stats = actcomp.stats(model).values()
    fell_back = [s for s in layer_stats if s.method == "plain"]
    assert all(s.ranks == () and s.kept_bytes in (0, s.input_bytes) for s in fell_back)
    assert all(s.kept_bytes < s.input_bytes for s in layer_stats if s.method != "plain")
    if eps == 1.0:  # full-rank Tucker factors of a (2, 16, 32) input are larger than it
        assert len(fell_back) == len(layer_stats)
    report = actcomp.measure(model, batch)
    assert report.saved_bytes <= report.vanilla_saved_bytes
    q_proj = next(r for r in report.rows if r.name == "model.layers.0.self_attn.q_proj")
    assert ("plain" in q_proj.policy) == (actcomp.stats(model)[q_proj.name].method == "plain")


def test_llama_exact_at_eps_one_in_float64_with_dict_batches():
    torch.manual_seed(0)
    model, ids = llama()
    model = model.double()
    reference = copy.deepcopy(model)
    batch = {"input_ids": ids, "labels": ids}

    def gradients(m):
        m.zero_grad()
        m(**batch).loss.backward()
        return [p.grad.clone() for p in m.parameters()]

    expected = gradients(reference)
    actcomp.compress(model, sample={"input_ids": ids}, eps=1.0)
    assert max(rel_err(a, b) for a, b in zip(gradients(model), expected)) < 1e-10


def test_llama_batches_as_users_hold_them():
    """measure() with a dict (labels: the output's .loss) and with a tuple of positional
    inputs (no labels: the mean square of the logits); compress(sample=dict) orders by execution."""
    torch.manual_seed(0)
    model, ids = llama()
    report = actcomp.measure(model, {"input_ids": ids, "labels": ids})
    assert report.saved_bytes == report.vanilla_saved_bytes > 0
    assert report.batch_bytes == 2 * ids.numel() * ids.element_size()
    assert actcomp.measure(model, (ids,)).saved_bytes > 0
    actcomp.compress(model, "last:2", sample={"input_ids": ids}, eps=0.9)
    assert list(actcomp.compressed_layers(model)) == ["model.layers.1.mlp.down_proj", "lm_head"]
    assert actcomp.measure(model, {"input_ids": ids, "labels": ids}).saved_bytes < report.saved_bytes


def test_plan_takes_dict_batches_whose_output_carries_the_loss():
    torch.manual_seed(0)
    model, ids = llama()
    batch = {"input_ids": ids, "labels": ids}
    chosen = actcomp.plan(model, [batch], budget="1MiB", candidates="last:2", eps_grid=(0.5, 0.9))
    assert [c.name for c in chosen.trained] == ["model.layers.1.mlp.down_proj", "lm_head"]
    assert actcomp.compressed_layers(model) == {}  # plan leaves the model as it is
