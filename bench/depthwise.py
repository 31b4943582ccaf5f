"""Depthwise conv forward + backward on the CPU: PyTorch's F.conv2d vs msrdarts's two alternatives.

    python bench/depthwise.py [SIDE ...]   # one row per geometry, times in ms (median of 5);
                                           # SIDE: only these map sides (default 4 8 16 32)

Columns: ``conv`` (F.conv2d, NCHW), ``conv_cl`` (F.conv2d on channels_last input and weight: the
layout of the evaluation network's fast path on the CPU), ``taps`` (msrdarts.nn.kernels.depthwise_conv2d: custom backward), ``dense``
(the fused path's dense-operator matmul for maps of at most 64 pixels). These figures choose
msrdarts.nn.kernels.use_fast_depthwise and msrdarts.nn.kernels.DepthwiseRunner; see BENCHMARKS.md.
"""

import sys

import torch
import torch.nn.functional as F

from msrdarts.bench import median_ms
from msrdarts.nn.kernels import DepthwiseRunner, _Geometry, depthwise_conv2d
from msrdarts.nn.ops import OpConv


def timed(fn, x, w, repeats=5):
    return round(median_ms(lambda: fn(x, w).square().sum().backward(), repeats), 2)


def main():
    torch.manual_seed(0)
    sides = [int(a) for a in sys.argv[1:]] or [4, 8, 16, 32]
    cl = torch.channels_last
    print("batch channels side kernel dilation stride | conv conv_cl taps dense (ms)")
    for C in (32, 128):
        for side in sides:
            for k, d in ((3, 1), (5, 1), (3, 2), (5, 2)):
                for s in (1, 2):
                    p = d * (k - 1) // 2
                    conv = OpConv(C, C, k, stride=s, padding=p, dilation=d, groups=C, bias=False)
                    x = torch.randn(64, C, side, side, requires_grad=True)
                    w = torch.randn(C, 1, k, k, requires_grad=True)
                    row = [timed(lambda a, b: F.conv2d(a, b, None, s, p, d, C), x, w),
                           timed(lambda a, b: F.conv2d(a, b, None, s, p, d, C),
                                 x.detach().contiguous(memory_format=cl).requires_grad_(),
                                 w.detach().contiguous(memory_format=cl).requires_grad_()),
                           timed(lambda a, b: depthwise_conv2d(a, b, (p, p), (d, d), (s, s)), x, w)]
                    row.append(timed(lambda a, b: DepthwiseRunner()._dense(a, b, _Geometry.of(conv)), x, w) if side <= 8 else "-")
                    print(64, C, side, k, d, s, "|", *row, flush=True)


if __name__ == "__main__":
    main()
