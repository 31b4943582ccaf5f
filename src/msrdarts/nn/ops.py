"""Candidate operations of the DARTS cell space and the op registry.

Every primitive is built as ``get_op(name)(C, stride, affine)`` and maps a tensor of ``C``
channels at H x W to ``C`` channels at ceil(H / stride) x ceil(W / stride).

Convolutions that belong to a candidate op are :class:`OpConv` modules. MSR-DARTS spectrally
normalises exactly these (SPEC section 2) and reads the architecture off the stable rank of each
op's final one (``op.last_conv``). Stems, preprocessing convs, FactorizedReduce and the classifier
use plain ``nn.Conv2d`` and are left alone (SPEC section 8). The depthwise op convs' CPU fast path
(a depthwise conv with a fast backward) lives in :mod:`msrdarts.nn.kernels`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..primitives import Primitive, list_primitives, register_primitive
from .batchnorm import BatchNorm2d
from .kernels import depthwise_conv2d, shifted_view, use_fast_depthwise

OpFactory = Callable[[int, int, bool], nn.Module]

_OPS: dict[str, OpFactory] = {}


def register_op(name: str, primitive: Primitive | None = None) -> Callable[[OpFactory], OpFactory]:
    """Decorator that adds a primitive factory ``fn(C, stride, affine)`` under ``name``.

    A new op brings its facts (``primitive``: short name, colour, has a conv, ...), which go to
    :mod:`msrdarts.primitives`; the built-in ops have theirs there already.
    """

    def deco(fn: OpFactory) -> OpFactory:
        if name in _OPS:
            raise ValueError(f"op {name!r} is already registered")
        if primitive is not None:
            register_primitive(primitive)
        elif name not in list_primitives():
            raise ValueError(f"op {name!r}: give its facts (register_op(name, Primitive(...)))")
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
    #: Run depthwise convs with :func:`msrdarts.nn.kernels.depthwise_conv2d` where it is faster
    #: (``False``: always PyTorch's own conv, as the evaluation network's reference path does).
    fast: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast_depthwise(x):
            return depthwise_conv2d(x, self.weight, self.padding, self.dilation, self.stride)
        return super().forward(x)

    def _fast_depthwise(self, x: torch.Tensor) -> bool:
        depthwise = self.groups == self.in_channels == self.out_channels and self.kernel_size != (1, 1)
        return (self.fast and depthwise and self.bias is None and self.padding_mode == "zeros"
                and use_fast_depthwise(x, self.kernel_size, self.stride, self.dilation))


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
            BatchNorm2d(C_out, affine=affine),
        )

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The block after its ReLU (for a caller that has the activated input already)."""
        return self[2](self[1](x))


class DilConv(nn.Sequential):
    """ReLU - depthwise kxk (dilation d) - pointwise 1x1 - BN."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, dilation: int,
                 affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            OpConv(C_in, C_in, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=C_in,
                   bias=False),
            OpConv(C_in, C_out, 1, bias=False),
            BatchNorm2d(C_out, affine=affine),
        )

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The block after its ReLU (for a caller that has the activated input already)."""
        return self[3](self[2](self[1](x)))

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

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The op after its first ReLU (for a caller that has the activated input already)."""
        return self[1](self[0].reduce(x))

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

    #: Keep the input's gradient in the input's memory format (``False``: plain slicing, whose
    #: gradient is NCHW; the evaluation network's reference path).
    fast: bool = True

    def __init__(self, C_in: int, C_out: int, affine: bool = True):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out - C_out // 2, 1, stride=2, bias=False)
        self.bn = BatchNorm2d(C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.relu(x))

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The block after its ReLU (for a caller that has the activated input already)."""
        if x.shape[-2] % 2 or x.shape[-1] % 2:   # odd: the shifted grid needs a zero row / column
            shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        else:   # even: the stride-2 conv never reads the padding (DARTS's own code has no pad)
            shifted = shifted_view(x) if self.fast else x[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


def begins_with_relu(op: nn.Module) -> bool:
    """Whether ``op(x)`` is ``op.reduce(relu(x))``: the ops whose first step is a ReLU of their input
    (sep and dil convs, FactorizedReduce, ReLUConvBN), so that ops reading one tensor can share it.
    Exact types only (a subclass may change its forward). A caller that uses ``reduce`` skips the
    op module's own call, so forward hooks on the op itself do not run (its submodules' do)."""
    return type(op) in (SepConv, DilConv, FactorizedReduce, ReLUConvBN)


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
    mask = drop_path_mask(x, drop_prob, training)
    return x if mask is None else x * mask   # one pass over x, each way


def drop_path_mask(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor | None:
    """The (N, 1, 1, 1) factor :func:`drop_path` multiplies ``x`` by (0 or 1 / keep per sample;
    one draw from the global generator), or None where it leaves ``x`` as it is."""
    if not training or drop_prob <= 0.0:
        return None
    keep = 1.0 - drop_prob
    return x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep).div_(keep)


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
