"""The token demo: a small Vision Transformer on scikit-learn's digits, patches as tokens.

Each 8x8 digit is cut into 2x2 patches: 16 tokens of 4 grey levels, plus a class token. A
TinyViT (patch embedding, 2 pre-norm blocks of multi-head self-attention and a GELU MLP, a
LayerNorm and a Linear head; every projection an ``nn.Linear``) is pretrained on digits 0-4,
given a fresh head, and fine-tuned on digits 5-9, all layers trained, from the same starting
point three ways: plain autograd; every Linear compressed with HOSVD at eps (its neighbours
exact); and the whole step compressed (``Neighbours(activations="bits4", generic=True,
eps=neighbour_eps)``: GELU keeps a 4-bit code, attention's q, k, v, softmax output and the
LayerNorms' inputs are packed as factors at ``neighbour_eps``, 0.99 by default: at 0.9 the
packed attention tensors cost about 30 points of accuracy on this task). For each run :func:`actcomp.measure` gives what autograd keeps in one step and the
step's allocation peak, both next to plain autograd's for the same model, and the test
accuracy and median time per step are printed.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actcomp.core.config import CompressionConfig
from actcomp.app.data import digits, split
from actcomp.app.demo import accuracy, train
from actcomp.attach import compress, stats
from actcomp.memory import format_bytes, measure
from actcomp.policies import Neighbours
from actcomp.memory.format import aligned_table


class Attention(nn.Module):
    """Multi-head self-attention with its projections as modules (so each can be compressed):
    softmax(q k^T / sqrt(d)) v per head, then the output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with a GELU."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A Vision Transformer for small grey images: ``patch`` x ``patch`` patches as tokens, a
    class token and learned positions, ``depth`` blocks, a LayerNorm and a Linear head on the
    class token."""

    def __init__(self, num_classes: int = 5, image: int = 8, patch: int = 2, dim: int = 32, depth: int = 2, heads: int = 2, hidden: int = 64) -> None:
        super().__init__()
        self.patch = patch
        tokens = (image // patch) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        patches = F.unfold(images, self.patch, stride=self.patch).transpose(1, 2)  # (B, tokens, patch^2)
        x = self.embed(patches)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.position
        return self.head(self.norm(self.blocks(x))[:, 0])


@dataclass(frozen=True)
class TokenRow:
    method: str
    layers: int  # compressed layers
    layer_bytes: int  # what the compressed layers kept (factors), or plain inputs
    saved_bytes: int  # everything autograd kept in one training step
    plain_saved_bytes: int  # the same step under plain autograd
    peak_bytes: int | None  # allocator high-water mark of one step
    plain_peak_bytes: int | None
    accuracy: float
    step_ms: float


def run_token_demo(
    eps: float = 0.9,
    neighbour_eps: float = 0.99,
    pretrain_epochs: int = 20,
    finetune_epochs: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> list[TokenRow]:
    """Pretrain a TinyViT on digits 0-4, fine-tune all of it on digits 5-9: plain, every Linear
    compressed (HOSVD at ``eps``), and the whole step compressed (neighbours' factors at
    ``neighbour_eps``). Seeded; returns the rows."""
    torch.manual_seed(seed)
    source_x, source_y = digits(classes=(0, 1, 2, 3, 4), size=8)
    train_x, train_y, test_x, test_y = split(*digits(classes=(5, 6, 7, 8, 9), size=8), test_fraction=0.3, seed=seed)
    base = TinyViT(num_classes=5)
    train(base, source_x, source_y, pretrain_epochs, batch_size, 3e-3, seed, "pretrain TinyViT on digits 0-4", progress)
    base.head.reset_parameters()
    sample = train_x[:1]
    runs = [
        ("none", None, None),
        (f"hosvd {eps:g}, layers", CompressionConfig("hosvd", eps), None),
        (f"hosvd {eps:g}, whole step {neighbour_eps:g}", CompressionConfig("hosvd", eps), Neighbours(activations="bits4", generic=True, eps=neighbour_eps)),
    ]
    rows = []
    for method, config, neighbours in runs:
        model = copy.deepcopy(base)
        if config is not None:
            compress(model, "all", config=config, sample=sample, neighbours=neighbours)
        step_ms = train(model, train_x, train_y, finetune_epochs, batch_size, 3e-3, seed, f"fine-tune 5-9 ({method})", progress)
        report = measure(model, train_x[:batch_size], train_y[:batch_size], F.cross_entropy)
        kept = stats(model)
        rows.append(
            TokenRow(
                method=method,
                layers=len(kept),
                layer_bytes=sum(s.kept_bytes for s in kept.values()),
                saved_bytes=report.saved_bytes,
                plain_saved_bytes=report.vanilla_saved_bytes or report.saved_bytes,
                peak_bytes=report.peak_bytes,
                plain_peak_bytes=report.vanilla_peak_bytes,
                accuracy=accuracy(model, test_x, test_y),
                step_ms=statistics.median(step_ms),
            )
        )
    return rows


def format_token_table(rows: list[TokenRow]) -> str:
    """The token demo's rows as an aligned text table (ratios against plain autograd)."""

    def ratio(a: int | None, b: int | None) -> str:
        return f"{a / b:.2f}" if a is not None and b else "n/a"

    header = ("method", "layers", "kept by layers", "kept by autograd", "vs plain", "peak", "vs plain", "accuracy", "ms/step")
    lines = [
        (
            r.method, str(r.layers), format_bytes(r.layer_bytes), format_bytes(r.saved_bytes), ratio(r.saved_bytes, r.plain_saved_bytes),
            format_bytes(r.peak_bytes) if r.peak_bytes is not None else "n/a", ratio(r.peak_bytes, r.plain_peak_bytes),
            f"{100 * r.accuracy:.1f}%", f"{r.step_ms:.1f}",
        )
        for r in rows
    ]
    return aligned_table(header, lines)


def token_rows_as_dicts(rows: list[TokenRow]) -> list[dict]:
    return [asdict(r) for r in rows]
