"""A convolution's weight gradient from Tucker factors: actcomp/kernels/conv.py's two routes
against a candidate expand route that keeps the (K_B, C, H, W) layout.

    python bench/conv_weight_grad.py [--threads N] [--shape NAME ...]

For each layer shape of bench/layers.py (batch 32, relu(avg_pool3x3(randn)) input, factors from
this checkout's hosvd at eps 0.8): plain autograd's dW, conv.py's default, "contract" and
"expand" routes of ``tucker_weight_grad``, and ``expand_kept_layout`` below, which folds the
batch into dY with one GEMM and expands the core channel mode first (on the small core), then
W as a right product and H as a left product, every intermediate contiguous: no permutation
copies (conv.py's mode products go through tensordot + movedim). Its result is checked against
conv.py's. Medians, alternating in rounds. A measurement for the kernels' owner: conv.py is not
changed here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from actcomp.linalg.decompose import hosvd  # noqa: E402
from actcomp.linalg.factors import Tucker  # noqa: E402
from actcomp.kernels.conv import ConvGeometry, _conv_backward, _pad_rows, tucker_weight_grad  # noqa: E402
from common import interleaved_medians  # noqa: E402
from layers import SHAPES, smooth_input  # noqa: E402


def expand_kept_layout(tucker: Tucker, grad_out: Tensor, weight_shape: torch.Size, g: ConvGeometry) -> Tensor:
    """dW of a 2-d convolution by the expand route with every product on a contiguous view."""
    core, u_b, u_c, u_h, u_w = tucker.tensors()
    kb, kc, kh, kw = core.shape
    gb = (u_b.T.contiguous() @ grad_out.reshape(grad_out.shape[0], -1)).reshape(kb, *grad_out.shape[1:])
    ph, pw = _pad_rows(u_h, g.pads[0], g.pad_mode), _pad_rows(u_w, g.pads[1], g.pad_mode)
    channels = u_c.shape[0]
    xs = torch.matmul(u_c, core.reshape(kb, kc, kh * kw))  # (K_B, C, kh kw)
    xs = torch.matmul(xs.reshape(kb * channels, kh, kw), pw.T.contiguous())  # (K_B C, kh, Wp)
    xs = torch.matmul(ph, xs).reshape(kb, channels, ph.shape[0], pw.shape[0])  # (K_B, C, Hp, Wp)
    return _conv_backward(gb, xs, weight_shape, g, (0, 0), g.groups, want_input=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--shape", action="append", choices=list(SHAPES), default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}; ms, medians of {args.rounds * args.per_round}")
    for name in args.shape or list(SHAPES):
        c_in, c_out, k, groups, size = SHAPES[name]
        layer = nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups)
        x = smooth_input(32, c_in, size, device).detach()
        dy = torch.randn(32, c_out, size, size)
        g, w = ConvGeometry.of(layer), layer.weight.detach()
        tucker = hosvd(x, 0.8)
        reference = tucker_weight_grad(tucker, dy, w.shape, g, "expand")
        candidate = expand_kept_layout(tucker, dy, w.shape, g)
        assert float((candidate - reference).norm() / reference.norm()) < 1e-4
        fns = {
            "plain": lambda: torch.ops.aten.convolution_backward(
                dy, x, w, None, [1, 1], [k // 2] * 2, [1, 1], False, [0, 0], groups, [False, True, False]
            ),
            "default": lambda: tucker_weight_grad(tucker, dy, w.shape, g),
            "contract": lambda: tucker_weight_grad(tucker, dy, w.shape, g, "contract"),
            "expand": lambda: tucker_weight_grad(tucker, dy, w.shape, g, "expand"),
            "expand, layout kept": lambda: expand_kept_layout(tucker, dy, w.shape, g),
        }
        medians = interleaved_medians(fns, device, args.rounds, args.per_round)
        print(f"{name:20s} ranks {tucker.ranks}: " + "  ".join(f"{n} {m:.1f}" for n, m in medians.items()), flush=True)


if __name__ == "__main__":
    main()
