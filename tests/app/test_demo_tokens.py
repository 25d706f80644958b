"""The token demo (a TinyViT on digits, patches as tokens) and ``actcomp demo --model vit``."""

import json

import torch
import torch.nn.functional as F

import actcomp
from actcomp.app.cli import main
from actcomp.app.demo_tokens import TinyViT, format_token_table, run_token_demo
from conftest import rel_err


def test_tiny_vit_compresses_every_linear_and_is_exact_at_eps_one():
    torch.manual_seed(0)
    model = TinyViT().double()
    reference = TinyViT().double()
    reference.load_state_dict(model.state_dict())
    x, y = torch.rand(6, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 0])
    actcomp.compress(model, "all", eps=1.0, sample=x[:1], neighbours=actcomp.Neighbours(generic=True, threshold=0))
    assert len(actcomp.compressed_layers(model)) == 10  # embed, 2 x (qkv, proj, 2 MLP), head
    for m in (model, reference):
        F.cross_entropy(m(x), y).backward()
    assert max(rel_err(a.grad, b.grad) for a, b in zip(model.parameters(), reference.parameters())) < 1e-8


def test_token_demo_rows():
    rows = run_token_demo(pretrain_epochs=1, finetune_epochs=1, progress=False)
    plain, layers, whole = rows
    assert [r.layers for r in rows] == [0, 10, 10]
    assert plain.saved_bytes == plain.plain_saved_bytes
    assert whole.saved_bytes < layers.saved_bytes < plain.saved_bytes
    assert whole.plain_saved_bytes == layers.plain_saved_bytes == plain.saved_bytes  # the same step, plain
    assert all(0.0 <= r.accuracy <= 1.0 for r in rows)
    assert "whole step" in format_token_table(rows)


def test_cli_demo_vit(tmp_path, capsys):
    assert main(["demo", "--model", "vit", "--epochs", "1", "--pretrain-epochs", "1", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "TinyViT" in out and "kept by autograd" in out
    assert len(json.loads((tmp_path / "demo_vit.json").read_text())) == 3


def test_cli_demo_vit_refuses_mobilenet_options(capsys):
    assert main(["demo", "--model", "vit", "--budget", "1MiB"]) == 2
    assert "--budget applies to --model mobilenet" in capsys.readouterr().err


def test_cli_neighbour_eps_is_a_vit_option(capsys):
    assert main(["demo", "--neighbour-eps", "0.9"]) == 2
    assert "--neighbour-eps applies to --model vit" in capsys.readouterr().err
    assert main(["demo", "--model", "vit", "--neighbour-eps", "1.5"]) == 2
    assert "eps must be a number in (0, 1]" in capsys.readouterr().err


def test_cli_demo_vit_refuses_the_every_layer_options(capsys):
    for option in (["--every-eps", "0.9"], ["--no-every"]):
        assert main(["demo", "--model", "vit", *option]) == 2
        assert f"{option[0]} applies to --model mobilenet" in capsys.readouterr().err
