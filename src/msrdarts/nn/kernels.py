"""CPU fast paths for depthwise convs: the kernels behind the op convs and the fused forward.

PyTorch's CPU depthwise conv is slow where NAS supernets spend their time (bench/depthwise.py,
BENCHMARKS.md): its backward costs 10-40x the forward for dilated or strided kernels, and on small
maps every call costs about a millisecond whatever the work. Here:

* :func:`depthwise_conv2d`: ``F.conv2d`` with a custom backward (input gradient as a conv with the
  flipped kernel, weight gradient as k*k tap products, optionally compiled: :class:`CompiledTaps`);
  :func:`use_fast_depthwise` says where it wins. :class:`msrdarts.nn.ops.OpConv` and the fused
  forward use it.
* :class:`DepthwiseRunner`: the fused forward's depthwise convs, each run the fastest way for its
  geometry: on maps of at most 64 pixels as a matmul with the conv's dense operator
  (:class:`DenseTaps`, :class:`_DenseDepthwise`).
* :func:`conv_adjoint` (A^T of a conv, for power iteration and the strided backward) and
  :class:`_Geometry` (a depthwise conv's kernel, stride, padding and dilation), shared with
  :mod:`msrdarts.nn.spectral` and :mod:`msrdarts.nn.fused`.

This module imports no other module of the package (:mod:`msrdarts.nn.ops` imports it).
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..errors import first_line


class _Geometry(NamedTuple):
    """A conv's kernel_size, stride, padding and dilation (each an (h, w) pair): what the depthwise
    kernels, the dense operators and the spectral norms' conv operators need of a conv."""

    kernel_size: tuple
    stride: tuple
    padding: tuple
    dilation: tuple

    @classmethod
    def of(cls, conv) -> "_Geometry":
        """Of anything with those four attributes: a conv, a :class:`msrdarts.nn.spectral.ConvSpectralNorm`."""
        return cls(tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))

    def out_size(self, hw: Sequence[int]) -> tuple[int, int]:
        k, s, p, d = self
        return tuple((hw[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))

    def subsampled(self, hw: Sequence[int]) -> "_Geometry | None":
        """The same conv on the input subsampled by its stride, where one exists.

        A conv with stride s whose dilation d and padding p are multiples of s reads only the
        input pixels at multiples of s: it is the stride-1 conv with dilation d/s and padding
        p/s of ``x[..., ::s, ::s]`` (same output). For the dilated ops of a reduction cell
        (s = d = 2) that is a dense 3x3 or 5x5 conv on a quarter of the input, several times
        cheaper than the strided dilated conv.
        """
        k, s, p, d = self
        if s == (1, 1) or any(d[i] % s[i] or p[i] % s[i] for i in range(2)):
            return None
        sub = _Geometry(k, (1, 1), (p[0] // s[0], p[1] // s[1]), (d[0] // s[0], d[1] // s[1]))
        small = tuple(-(-hw[i] // s[i]) for i in range(2))
        return sub if sub.out_size(small) == self.out_size(hw) else None


def use_fast_depthwise(x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                       dilation: tuple[int, int]) -> bool:
    """Whether :func:`depthwise_conv2d` beats PyTorch's own depthwise conv for input ``x``.

    Measured on a 2-core CPU (bench/depthwise.py, BENCHMARKS.md): for stride-1 convs on NCHW maps
    of 16 x 16 or more, except the 3 x 3 undilated kernel, for which PyTorch's backward is fast; on
    smaller maps per-op overhead dominates. Never for channels_last inputs (PyTorch's channels_last
    depthwise kernels beat both NCHW paths at stride 1; bench/depthwise.py) nor on other devices.
    """
    return (x.device.type == "cpu" and not is_channels_last(x) and stride == (1, 1) and x.shape[-1] * x.shape[-2] >= 256
            and not (kernel_size == (3, 3) and dilation == (1, 1)))


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is laid out channels_last (and not also plain contiguous, as 1x1 maps are)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _format_of(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


class _ChannelsCat(torch.autograd.Function):
    """``torch.cat(xs, 1)`` whose backward hands each input its gradient in the input's own memory
    format. Autograd's hands out channel slices of the output gradient, which are contiguous in
    neither format for channels_last tensors; the convs and batch norms downstream then take
    PyTorch's slow mixed-format paths on the CPU."""

    @staticmethod
    def forward(ctx, *xs: torch.Tensor) -> torch.Tensor:
        ctx.sizes = [x.shape[1] for x in xs]
        ctx.formats = [_format_of(x) for x in xs]
        return torch.cat(xs, 1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return tuple(part.contiguous(memory_format=f) for part, f in zip(g.split(ctx.sizes, 1), ctx.formats))


class _ShiftedView(torch.autograd.Function):
    """``x[:, :, 1:, 1:]`` whose backward builds the input's gradient in the input's own memory
    format (autograd's slice backward makes an NCHW tensor of zeros, whatever the input's format)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.shape = x.shape
        ctx.format = _format_of(x)
        return x[:, :, 1:, 1:]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        grad = torch.empty(ctx.shape, dtype=g.dtype, device=g.device, memory_format=ctx.format)
        grad[:, :, :1].zero_()
        grad[:, :, 1:, :1].zero_()
        grad[:, :, 1:, 1:] = g
        return grad


def shifted_view(x: torch.Tensor) -> torch.Tensor:
    """``x[:, :, 1:, 1:]`` with its gradient in ``x``'s memory format (:class:`_ShiftedView`)."""
    return _ShiftedView.apply(x)


def channels_cat(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate along channels; the gradients keep each input's memory format (:class:`_ChannelsCat`)."""
    return _ChannelsCat.apply(*xs)


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
            self.failed = f"{type(e).__name__}: {first_line(e, 160)}"
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


class DenseTaps:
    """The 0/1 tap tensors of depthwise conv geometries, cached per geometry, map size, dtype and device.

    ``T[t, i, l] = 1`` where output pixel l reads input pixel i through kernel tap t, so channel
    c's dense operator (as a right factor: y_c = x_c M_c) is ``M_c = sum_t w[c, t] T[t]``, of
    shape (H*W, H'*W'). Worth it for maps of at most :attr:`MAX_PIXELS` pixels.
    """

    MAX_PIXELS = 64

    def __init__(self):
        self._cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, kernel_size: tuple, stride: tuple, padding: tuple, dilation: tuple, hw: tuple,
                 dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        H, W = hw
        key = (kernel_size, stride, padding, dilation, H, W, dtype, device)
        if key not in self._cache:
            eye = torch.eye(H * W, dtype=dtype, device=device).view(H * W, 1, H, W)
            cols = F.unfold(eye, kernel_size, dilation, padding, stride)               # (HW, k*k, L)
            self._cache[key] = cols.permute(1, 0, 2).contiguous()                       # (k*k, HW, L)
        return self._cache[key]


class DepthwiseRunner:
    """Runs the fused depthwise convs, each in the fastest of three ways for its geometry (CPU).

    * maps of at most 64 pixels: as a matmul with the conv's dense operator. Channel c's
      (H*W, H'*W') matrix is sum_t w[c, t] * T[t], with T the 0/1 tap tensor of the geometry,
      cached here. PyTorch's depthwise kernels cost about a millisecond per call at these sizes
      whatever the work; the matmuls cost a tenth of that (bench/depthwise.py).
    * larger stride-1 maps: :func:`depthwise_conv2d` where it is faster, with its weight gradient
      compiled (``compiled``, a :class:`CompiledTaps`) for large calls;
    * otherwise ``F.conv2d``. On other devices always ``F.conv2d``.

    Before choosing, a strided conv that only reads pixels at multiples of its stride runs on
    the subsampled input instead (see :meth:`_Geometry.subsampled`).
    """

    def __init__(self, taps: DenseTaps | None = None, compiled: CompiledTaps | None = None):
        self.taps = taps if taps is not None else DenseTaps()
        self.compiled = compiled

    def __call__(self, x: torch.Tensor, w: torch.Tensor, geo: _Geometry) -> torch.Tensor:
        """The depthwise conv of x (B, C, H, W) with weights w (C, 1, kh, kw) and geometry ``geo``."""
        sub = geo.subsampled(x.shape[-2:])
        if sub is not None:
            x, geo = x[:, :, ::geo.stride[0], ::geo.stride[1]], sub
        k, s, p, d = geo
        H, W = x.shape[-2:]
        if x.device.type == "cpu" and H * W <= DenseTaps.MAX_PIXELS and not (
                H * W == DenseTaps.MAX_PIXELS and k == (3, 3) and d == (1, 1) and s == (1, 1)):
            return self._dense(x, w, geo)
        if use_fast_depthwise(x, k, s, d):
            return depthwise_conv2d(x, w, p, d, s, self.compiled)
        return F.conv2d(x, w, None, s, p, d, x.shape[1])

    def _dense(self, x: torch.Tensor, w: torch.Tensor, geo: _Geometry) -> torch.Tensor:
        B, C, H, W = x.shape
        T = self.taps(*geo, (H, W), x.dtype, x.device)
        x, w = x.reshape(B, C, H * W), w.reshape(C, -1)
        if T.shape[2] >= B:   # M as large as x: rebuilt in the backward instead of kept (_DenseDepthwise)
            y = _DenseDepthwise.apply(x, w, T)
        else:
            y = torch.einsum("bci,cil->bcl", x, _dense_operators(w, T))                   # per channel: X_c M_c
        return y.view(B, C, *geo.out_size((H, W)))


def _dense_operators(w: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """Each channel's dense operator M_c = sum_t w[c, t] T[t]: (C, HW, L) from w (C, k*k) and T (k*k, HW, L)."""
    kk, hw, L = T.shape
    return torch.matmul(w, T.view(kk, hw * L)).view(-1, hw, L)


class _DenseDepthwise(torch.autograd.Function):
    """y[b, c] = x[b, c] M_c for x (B, C, HW), w (C, k*k), the taps T (k*k, HW, L): a depthwise
    conv on a small map (see :class:`DepthwiseRunner`).

    Autograd through the two matmuls would keep every M (C, HW, L) until the backward: on 8 x 8
    maps with stride 1 that is 16 KB a channel, as much as a batch of 64 of the input, for each of
    the dozens of such convs of a step. This keeps x and w only and builds M again in the backward
    (one small matmul). Under autocast the backward runs in the gradient's dtype, as autograd's would.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.taps = T
        return torch.einsum("bci,cil->bcl", x, _dense_operators(w, T))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        T = ctx.taps.to(dy.dtype)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.einsum("bcl,cil->bci", dy, _dense_operators(w.to(dy.dtype), T)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dM = torch.einsum("bci,bcl->cil", x.to(dy.dtype), dy)                          # (C, HW, L)
            dw = torch.matmul(dM.reshape(dM.shape[0], -1), T.view(T.shape[0], -1).mT).to(w.dtype)
        return dx, dw, None
