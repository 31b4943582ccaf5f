"""Small networks the tests build (test helpers, not references)."""

import torch

from msrdarts.methods.msr import use_srsoftmax
from msrdarts.nn.supernet import SuperNet


def small(mixing: str = "sum", **kw) -> SuperNet:
    """A seeded 3-cell, C = 4 supernet on 8 x 8 grey inputs without spectral norms; ``kw``
    overrides any argument, ``mixing="srsoftmax"`` applies the authors' mixing."""
    torch.manual_seed(0)
    args = dict(num_classes=10, layers=3, channels=4, input_size=8, in_channels=1, spectral_norm=False)
    args.update(kw)
    net = SuperNet(**args)
    return use_srsoftmax(net) if mixing == "srsoftmax" else net
