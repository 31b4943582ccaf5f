"""Candidate operations of the DARTS cell space and the op registry.

Every primitive is built as ``get_op(name)(C, stride, affine)`` and maps a tensor of ``C``
channels at H x W to ``C`` channels at ceil(H / stride) x ceil(W / stride).

Convolutions that belong to a candidate op are :class:`OpConv` modules. MSR-DARTS spectrally
normalises exactly these (SPEC section 2) and reads the architecture off the stable rank of each
op's final one (``op.last_conv``). Stems, preprocessing convs, FactorizedReduce and the classifier
use plain ``nn.Conv2d`` and are left alone (SPEC section 8).
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .errors import ConfigError

OpFactory = Callable[[int, int, bool], nn.Module]

#: The operation set of MSR-DARTS (SPEC section 1), in the order used for tie-breaking.
MSR_PRIMITIVES: tuple[str, ...] = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")

#: The full DARTS operation set, in the DARTS order.
DARTS_PRIMITIVES: tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)

_OPS: dict[str, OpFactory] = {}


def register_op(name: str) -> Callable[[OpFactory], OpFactory]:
    """Decorator that adds a primitive factory ``fn(C, stride, affine)`` under ``name``."""

    def deco(fn: OpFactory) -> OpFactory:
        if name in _OPS:
            raise ValueError(f"op {name!r} is already registered")
        _OPS[name] = fn
        return fn

    return deco


def list_ops() -> list[str]:
    return list(_OPS)


def get_op(name: str) -> OpFactory:
    try:
        return _OPS[name]
    except KeyError:
        raise ConfigError(f"unknown op {name!r}; known ops: {', '.join(_OPS)}") from None


class OpConv(nn.Conv2d):
    """A convolution inside a candidate op (spectrally normalised during MSR-DARTS search).

    ``input_hw`` is the spatial size of the tensor this conv sees inside its network; the
    networks record it with :func:`record_input_sizes`. Spectral norms and stable ranks are
    properties of the conv as an operator on that input, so both need it.
    """

    input_hw: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast_depthwise(x):
            return depthwise_conv2d(x, self.weight, self.padding, self.dilation, self.stride)
        return super().forward(x)

    def _fast_depthwise(self, x: torch.Tensor) -> bool:
        depthwise = self.groups == self.in_channels == self.out_channels and self.kernel_size != (1, 1)
        return (depthwise and self.bias is None and self.padding_mode == "zeros"
                and use_fast_depthwise(x, self.kernel_size, self.stride, self.dilation))


def use_fast_depthwise(x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                       dilation: tuple[int, int]) -> bool:
    """Whether :func:`depthwise_conv2d` beats PyTorch's own depthwise conv for input ``x``.

    Measured on a 2-core CPU (bench/depthwise.py, BENCHMARKS.md): for stride-1 convs on maps of
    16 x 16 or more, except the 3 x 3 undilated kernel, for which PyTorch's backward is fast; on
    smaller maps per-op overhead dominates. Never on other devices.
    """
    return (x.device.type == "cpu" and stride == (1, 1) and x.shape[-1] * x.shape[-2] >= 256
            and not (kernel_size == (3, 3) and dilation == (1, 1)))


#: Elements of grad_output per channel block in depthwise_conv2d's weight gradient (4 MB in fp32).
TAP_BLOCK_ELEMENTS = 1 << 20


def tap_products(xp: torch.Tensor, g: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                 dilation: tuple[int, int]) -> torch.Tensor:
    """The weight gradient of a depthwise conv, (C, kh*kw): for each tap (i, j) and channel c, the
    sum over batch and output pixels of ``g`` times the input pixels that tap reads.

    ``xp`` is the zero-padded input (B, C, H + 2p, W + 2p), ``g`` the output gradient (B, C, H', W').
    One multiply and one reduce per tap; written so that ``torch.compile`` fuses all the taps
    into one pass over ``xp`` and ``g`` (see :class:`CompiledTaps`).
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    Ho, Wo = g.shape[-2:]
    hs, ws = sh * (Ho - 1) + 1, sw * (Wo - 1) + 1     # input rows / columns one tap spans
    return torch.stack([(xp[:, :, i * dh:i * dh + hs:sh, j * dw:j * dw + ws:sw] * g).sum((0, 2, 3))
                        for i in range(kh) for j in range(kw)], dim=1)


def blocked_tap_products(xp: torch.Tensor, g: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                         dilation: tuple[int, int]) -> torch.Tensor:
    """:func:`tap_products` eagerly, over channel blocks of about 4 MB so that a block's k*k
    passes stay in cache."""
    B, C = g.shape[:2]
    block = min(C, max(1, TAP_BLOCK_ELEMENTS // max(1, g[0, 0].numel() * B)))
    return torch.cat([tap_products(xp[:, c:c + block], g[:, c:c + block], kernel_size, stride, dilation)
                      for c in range(0, C, block)])


class CompiledTaps:
    """:func:`tap_products` compiled with ``torch.compile`` (Inductor), for large calls.

    Eagerly the weight gradient is k*k multiply-reduce passes over the input and the output
    gradient, memory-bound; compiled, it is one loop that reads each once (about 3x faster for
    5x5 kernels on 32x32 maps, BENCHMARKS.md). Compiling costs seconds per kernel geometry and
    needs a C++ compiler on the CPU, so it is used for calls of at least ``min_elements``
    elements of ``g`` only (a CIFAR-10 search's first cells, not a small test network); batch
    and channel counts are dynamic, so a geometry compiles once. If compiling fails, ``log``
    says so once and every later call runs eagerly.
    """

    #: Calls with fewer elements of ``g`` run eagerly (below about a millisecond of work).
    MIN_ELEMENTS = 1 << 20
    #: Kernel geometries and map sizes one network may compile.
    RECOMPILE_LIMIT = 64

    def __init__(self, log: Callable[[str], None] | None = None, min_elements: int | None = None):
        self.log = log or (lambda message: warnings.warn(message, RuntimeWarning, stacklevel=3))
        self.min_elements = self.MIN_ELEMENTS if min_elements is None else min_elements
        self.failed: str | None = None
        self._compiled: Callable | None = None

    def __call__(self, xp: torch.Tensor, g: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                 dilation: tuple[int, int]) -> torch.Tensor:
        if self.failed is not None or g.numel() < self.min_elements or _get_current_dispatch_mode() is not None:
            # (under a dispatch mode, e.g. a FLOP or traffic counter, torch.compile does not run)
            return blocked_tap_products(xp, g, kernel_size, stride, dilation)
        try:
            if self._compiled is None:
                self._compiled = torch.compile(tap_products, fullgraph=True, dynamic=False)
            for t in (xp, g):
                torch._dynamo.maybe_mark_dynamic(t, 0)   # batch: the last batch of an epoch is smaller
                torch._dynamo.maybe_mark_dynamic(t, 1)   # channels: m * C for m edges
            with torch._dynamo.config.patch(recompile_limit=self.RECOMPILE_LIMIT):
                return self._compiled(xp, g.contiguous(), kernel_size, stride, dilation)
        except Exception as e:   # no compiler, an unsupported platform: say so once, go on eagerly
            self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
            self.log(f"compiling the depthwise weight gradient failed ({self.failed}); computing it eagerly")
            return blocked_tap_products(xp, g, kernel_size, stride, dilation)


def conv_adjoint(y: torch.Tensor, w: torch.Tensor, input_hw: Sequence[int], stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> torch.Tensor:
    """The adjoint of ``F.conv2d(x, w, None, stride, padding, dilation, groups)`` applied to ``y``:
    the transposed conv, with the output padding that restores x's size ``input_hw``."""
    k = w.shape[-2:]
    out_pad = tuple(input_hw[i] - ((y.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k[i] - 1) + 1)
                    for i in range(2))
    return F.conv_transpose2d(y, w, None, stride, padding, out_pad, groups, dilation)


class _DepthwiseConv2d(torch.autograd.Function):
    """Depthwise conv with a backward that is fast on CPU.

    PyTorch's CPU backward for depthwise (especially dilated or strided) convs takes 10-40x the
    forward. Here grad_input is a depthwise conv of grad_output with the flipped kernel (padding
    d(k-1)-p; for stride s, the transposed conv), and grad_weight is :func:`tap_products`
    (``taps``: eagerly by channel blocks, or a :class:`CompiledTaps`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int], taps: Callable | None = None):
        ctx.save_for_backward(x, w)
        ctx.stride, ctx.padding, ctx.dilation, ctx.taps = stride, padding, dilation, taps or blocked_tap_products
        return F.conv2d(x, w, None, stride, padding, dilation, x.shape[1])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        w_dtype = w.dtype
        x, w = x.to(g.dtype), w.to(g.dtype)   # under autocast the forward ran in g's dtype (bf16)
        (sh, sw), (ph, pw), (dh, dw) = ctx.stride, ctx.padding, ctx.dilation
        C, _, kh, kw = w.shape
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            if (sh, sw) == (1, 1):
                grad_x = F.conv2d(g, w.flip(-2, -1), None, 1, (dh * (kh - 1) - ph, dw * (kw - 1) - pw), (dh, dw), C)
            else:  # the adjoint of the strided conv
                grad_x = conv_adjoint(g, w, x.shape[2:], (sh, sw), (ph, pw), (dh, dw), C)
        if ctx.needs_input_grad[1]:
            grad_w = ctx.taps(F.pad(x, (pw, pw, ph, ph)), g, (kh, kw), (sh, sw), (dh, dw)).view(C, 1, kh, kw).to(w_dtype)
        return grad_x, grad_w, None, None, None, None


def depthwise_conv2d(x: torch.Tensor, w: torch.Tensor, padding: tuple[int, int], dilation: tuple[int, int],
                     stride: tuple[int, int] = (1, 1), taps: Callable | None = None) -> torch.Tensor:
    """``F.conv2d(x, w, None, stride, padding, dilation, groups=C)``, with a faster backward on CPU.

    ``taps`` computes the weight gradient (default :func:`blocked_tap_products`; a
    :class:`CompiledTaps` for the compiled one)."""
    (ph, pw), (dh, dw) = padding, dilation
    if dh * (w.shape[2] - 1) < ph or dw * (w.shape[3] - 1) < pw:  # more padding than the kernel spans
        return F.conv2d(x, w, None, stride, padding, dilation, x.shape[1])
    return _DepthwiseConv2d.apply(x, w, tuple(stride), tuple(padding), tuple(dilation), taps)


def record_input_sizes(model: nn.Module, example: torch.Tensor) -> None:
    """Run ``example`` through ``model`` once and store every OpConv's input (H, W) on it."""
    convs = [m for m in model.modules() if isinstance(m, OpConv)]
    handles = [
        c.register_forward_pre_hook(lambda mod, args: setattr(mod, "input_hw", tuple(args[0].shape[-2:])))
        for c in convs
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


class ReLUConvBN(nn.Sequential):
    """ReLU - Conv - BN: the DARTS preprocessing block (plain conv, never normalised)."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class DilConv(nn.Sequential):
    """ReLU - depthwise kxk (dilation d) - pointwise 1x1 - BN."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, dilation: int,
                 affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            OpConv(C_in, C_in, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=C_in,
                   bias=False),
            OpConv(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    @property
    def last_conv(self) -> OpConv:
        return self[2]


class SepConv(nn.Sequential):
    """Two stacked DilConv(dilation 1) blocks; only the first one carries the stride."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            DilConv(C_in, C_in, kernel_size, stride, padding, 1, affine),
            DilConv(C_in, C_out, kernel_size, 1, padding, 1, affine),
        )

    @property
    def last_conv(self) -> OpConv:
        return self[1].last_conv


class Zero(nn.Module):
    """The 'none' op: zeros of the output shape."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve the resolution with two 1x1 stride-2 convs on pixel grids offset by one, concatenated.

    Odd sizes are handled by zero-padding the shifted path, so both halves have ceil(H/2) rows.
    """

    def __init__(self, C_in: int, C_out: int, affine: bool = True):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out - C_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


@register_op("none")
def _none(C: int, stride: int, affine: bool) -> nn.Module:
    return Zero(stride)


@register_op("avg_pool_3x3")
def _avg_pool(C: int, stride: int, affine: bool) -> nn.Module:
    return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)


@register_op("max_pool_3x3")
def _max_pool(C: int, stride: int, affine: bool) -> nn.Module:
    return nn.MaxPool2d(3, stride=stride, padding=1)


@register_op("skip_connect")
def _skip(C: int, stride: int, affine: bool) -> nn.Module:
    return nn.Identity() if stride == 1 else FactorizedReduce(C, C, affine)


@register_op("sep_conv_3x3")
def _sep3(C: int, stride: int, affine: bool) -> nn.Module:
    return SepConv(C, C, 3, stride, 1, affine)


@register_op("sep_conv_5x5")
def _sep5(C: int, stride: int, affine: bool) -> nn.Module:
    return SepConv(C, C, 5, stride, 2, affine)


@register_op("dil_conv_3x3")
def _dil3(C: int, stride: int, affine: bool) -> nn.Module:
    return DilConv(C, C, 3, stride, 2, 2, affine)


@register_op("dil_conv_5x5")
def _dil5(C: int, stride: int, affine: bool) -> nn.Module:
    return DilConv(C, C, 5, stride, 4, 2, affine)


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Zero whole samples of a branch with probability ``drop_prob`` and rescale the rest."""
    if not training or drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep)
    return x * mask / keep


class Stem(nn.Module):
    """The network stem; returns the two cell inputs (s0, s1).

    ``kind="cifar"``: conv3x3 (in -> multiplier*C) + BN, s0 = s1 (resolution kept).
    ``kind="imagenet"``: the DARTS mobile-setting stems: stem0 = two stride-2 conv3x3 (in -> C/2 ->
    C), stem1 = ReLU + one more stride-2 conv3x3; s0 is at 1/4, s1 at 1/8 of the input size, so
    the first cell sees a reduced previous-previous input.
    """

    KINDS = ("cifar", "imagenet")

    def __init__(self, kind: str, in_channels: int, C: int, multiplier: int = 3):
        super().__init__()
        if kind not in self.KINDS:
            raise ConfigError(f"unknown stem {kind!r}; allowed: {', '.join(self.KINDS)}")
        self.kind = kind
        if kind == "cifar":
            self.stem0 = nn.Sequential(nn.Conv2d(in_channels, multiplier * C, 3, padding=1, bias=False),
                                       nn.BatchNorm2d(multiplier * C))
            self.stem1 = None
            self.out_channels = (multiplier * C, multiplier * C)
            self.reduction_prev = False
        else:
            self.stem0 = nn.Sequential(
                nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C // 2),
                nn.ReLU(inplace=True),
                nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
            self.stem1 = nn.Sequential(
                nn.ReLU(inplace=False), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
            self.out_channels = (C, C)
            self.reduction_prev = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s0 = self.stem0(x)
        return (s0, s0) if self.stem1 is None else (s0, self.stem1(s0))


def reduction_layers(layers: int) -> tuple[int, int]:
    """Depths of the two reduction cells: floor(L/3) and floor(2L/3)."""
    return layers // 3, 2 * layers // 3


def cell_preprocess(C_pp: int, C_p: int, C: int, reduction_prev: bool, affine: bool) -> tuple[nn.Module, nn.Module]:
    """The two input-node preprocessors of a cell (SPEC section 1)."""
    pre0 = FactorizedReduce(C_pp, C, affine) if reduction_prev else ReLUConvBN(C_pp, C, 1, 1, 0, affine)
    return pre0, ReLUConvBN(C_p, C, 1, 1, 0, affine)
