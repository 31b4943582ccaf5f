"""Model size figures as the papers report them.

Convention (also in the README): parameters exclude the auxiliary head; mult-adds are the
multiply-accumulates of all convolutions and linear layers for ONE image in eval mode (no
auxiliary head), counted by ``torch.utils.flop_counter`` (FLOPs / 2). With it PC_DARTS and
P_DARTS at L = 20, C = 36 on CIFAR-10 come to 557M and 532M (published: 558M and 532M).
DARTS's ImageNet figures (574M for DARTS_V2, here 530M) used another convention.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module, exclude_auxiliary: bool = True) -> int:
    """Trainable parameters; the auxiliary head is excluded, as the papers count them."""
    return sum(p.numel() for name, p in model.named_parameters()
               if not (exclude_auxiliary and name.startswith("auxiliary_head.")))


@torch.no_grad()
def count_mult_adds(model: nn.Module, in_channels: int, input_size: int) -> int:
    """Multiply-accumulates of one forward pass on a single input_size x input_size image (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        x = next(model.parameters()).new_zeros(1, in_channels, input_size, input_size)
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape, **kwargs) -> int:
    """FLOPs of a conv's backward: each of the input and the weight gradient costs what the forward
    does, 2 * (output elements of the forward) * (weight elements per output channel).

    torch's own formula counts the weight gradient of a grouped conv as a conv over all input
    channels, ``groups`` times too many (SPEC section 7): 36x for a depthwise conv at C = 36.
    """
    forward = 2 * math.prod(x_shape if transposed else grad_out_shape) * math.prod(w_shape[1:])
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_step_flops(step: Callable[[], None]) -> int:
    """FLOPs of ``step()`` (a forward and backward), with grouped convs' weight gradients counted
    correctly (:func:`_conv_backward_flops`). ``step`` must run eagerly (not compiled)."""
    with FlopCounterMode(display=False,
                         custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops}) as counter:
        step()
    return counter.get_total_flops()
