"""The DARTS baseline (Liu et al., 2019), ``msrdarts search --method darts``: learned alphas,
softmax mixing, alternating architecture and weight steps.

The supernet gets architecture parameters ``alphas`` (2, edges, ops), one table per cell type,
drawn as 1e-3 * N(0, 1); every edge mixes its ops by softmax(alpha). They are kept apart from the
weights (the weight optimiser never sees them) and derivation takes, per edge, the strongest op
but ``none`` by softmax(alpha), per node the 2 strongest edges.

Before every weight step on a search-train batch, the alphas take one Adam step (lr 3e-4, betas
(0.5, 0.999), weight decay 1e-3) on a search-valid batch:

* ``order=1``: the gradient of L_val(w, alpha) in alpha, the weights held fixed;
* ``order=2``: the gradient of L_val(w', alpha) through one virtual SGD step
  w' = w - xi (momentum buffer * mu + grad_w L_train(w, alpha) + wd w), xi the current weight lr:
  dalpha = grad_alpha L_val(w', alpha) - xi * H g, where g = grad_w' L_val(w', alpha) and the
  mixed second derivative H g = grad_alpha grad_w L_train . g is approximated by central finite
  differences, (grad_alpha L_train(w + eps g) - grad_alpha L_train(w - eps g)) / (2 eps) with
  eps = 0.01 / ||g|| (the DARTS paper, eq. 7-8).

The virtual weights are never written into the network: the extra forwards run through
``torch.func.functional_call`` with copies of the buffers, so BN statistics only see the real
weight step. tests/test_darts.py checks both gradients against autograd (order 2 against the
exact hypergradient by double backward).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn
from torch.func import functional_call

from ..errors import ConfigError
from ..genotype import Genotype, num_edges
from .base import BeforeStep, Derivation, Method, SearchContext, register_method
from .derive import derive_genotype

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

ARCH_BETAS = (0.5, 0.999)


class Architect:
    """One DARTS architecture step per call of :meth:`step`.

    Args:
        net: a :class:`msrdarts.nn.supernet.SuperNet` with alphas (:func:`add_alphas`).
        weight_optimizer: the SGD optimiser of the weights (its momentum buffers, momentum and
            weight decay define the virtual step of ``order=2``).
        lr, weight_decay: Adam settings of the alphas.
        order: 1 or 2.
        reduce_grads: averages the alpha gradient over processes (distributed runs).
        fd_scale: the finite-difference step is fd_scale / ||g|| (DARTS: 0.01).
        clip: clip the norm of the architecture gradient to this (P-DARTS: 5; None: no clipping,
            as DARTS and PC-DARTS).
    """

    def __init__(self, net: nn.Module, weight_optimizer: torch.optim.SGD, lr: float = 3e-4,
                 weight_decay: float = 1e-3, order: int = 1, loss: Loss = nn.functional.cross_entropy,
                 reduce_grads: Callable[[torch.Tensor], torch.Tensor] | None = None, fd_scale: float = 0.01,
                 clip: float | None = None):
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order}")
        self.net, self.weight_optimizer, self.order, self.loss = net, weight_optimizer, order, loss
        self.alphas = net.arch_parameters()
        if not self.alphas:
            raise ValueError("the network has no architecture parameters (mixing='alpha')")
        self.optimizer = torch.optim.Adam(self.alphas, lr=lr, betas=ARCH_BETAS, weight_decay=weight_decay)
        self.reduce_grads, self.fd_scale, self.clip = reduce_grads, fd_scale, clip
        arch = {id(a) for a in self.alphas}   # the weights by name, looked up once (not per step)
        self._named = [(n, p) for n, p in net.named_parameters() if id(p) not in arch]

    def step(self, x_train: torch.Tensor, y_train: torch.Tensor, x_valid: torch.Tensor, y_valid: torch.Tensor
             ) -> None:
        """One Adam step of the alphas. They take gradients only here: the weight steps between leave
        them out (``requires_grad`` off), as DARTS keeps them out of the weights' parameters."""
        for a in self.alphas:
            a.requires_grad_(True)
        try:
            grads = self.gradient(x_train, y_train, x_valid, y_valid)
        finally:
            for a in self.alphas:
                a.requires_grad_(False)
        if self.reduce_grads is not None:
            grads = [self.reduce_grads(g) for g in grads]
        for a, g in zip(self.alphas, grads):
            a.grad = g
        if self.clip:
            nn.utils.clip_grad_norm_(self.alphas, self.clip)
        self.optimizer.step()
        for a in self.alphas:
            a.grad = None

    def gradient(self, x_train: torch.Tensor, y_train: torch.Tensor, x_valid: torch.Tensor,
                 y_valid: torch.Tensor) -> list[torch.Tensor]:
        """The alpha gradient of this step (first order, or the unrolled second-order estimate)."""
        names, weights = self._weights()
        if self.order == 1:
            loss = self._loss(names, weights, x_valid, y_valid)
            return list(torch.autograd.grad(loss, self.alphas))
        xi = self.weight_optimizer.param_groups[0]["lr"]
        virtual = self.virtual_step(names, weights, x_train, y_train, xi)
        loss = self._loss(names, virtual, x_valid, y_valid)
        grads = torch.autograd.grad(loss, [*self.alphas, *virtual])
        d_alpha, g = list(grads[:len(self.alphas)]), grads[len(self.alphas):]
        eps = self.fd_scale / torch.cat([t.reshape(-1) for t in g]).norm()
        with torch.no_grad():
            plus = [w + eps * t for w, t in zip(weights, g)]
            minus = [w - eps * t for w, t in zip(weights, g)]
        hp = torch.autograd.grad(self._loss(names, plus, x_train, y_train), self.alphas)
        hm = torch.autograd.grad(self._loss(names, minus, x_train, y_train), self.alphas)
        return [d - xi * (p - m) / (2 * eps) for d, p, m in zip(d_alpha, hp, hm)]

    def virtual_step(self, names: list[str], weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                     xi: float, create_graph: bool = False) -> list[torch.Tensor]:
        """w' = w - xi (mu * momentum buffer + grad_w L_train + wd w), as the weight SGD would step."""
        group = self.weight_optimizer.param_groups[0]
        mu, wd = group["momentum"], group["weight_decay"]
        loss = self._loss(names, weights, x, y)
        grads = torch.autograd.grad(loss, weights, create_graph=create_graph)
        out = []
        for (_, param), w, g in zip(self._named, weights, grads):
            buf = self.weight_optimizer.state.get(param, {}).get("momentum_buffer")
            moment = mu * buf if buf is not None else torch.zeros_like(w)
            step = moment + g + wd * w
            out.append(w - xi * (step if create_graph else step.detach()))
        return out

    def _weights(self) -> tuple[list[str], list[torch.Tensor]]:
        return [n for n, _ in self._named], [p for _, p in self._named]

    def _loss(self, names: list[str], weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of the network with ``weights`` in place of its own, its buffers left untouched."""
        buffers = {n: b.clone() for n, b in self.net.named_buffers()}
        return self.loss(functional_call(self.net, ({**dict(zip(names, weights)), **buffers}), (x,)), y)


@register_method
class DARTS(Method):
    name = "darts"
    # DARTS trains without spectral normalisation (its arch optimiser's settings are the config's
    # defaults); the candidate ops stay the preset's (--space darts for its own 8-op space).
    defaults = {"spectral_norm": False}
    owns = ("order", "arch_lr", "arch_weight_decay", "arch_start")
    #: Clip the architecture gradient's norm at --grad-clip (P-DARTS's code does; DARTS's does not).
    clip_arch_grad: ClassVar[bool] = False
    score_key = "alpha"
    lower_wins = False

    @classmethod
    def validate(cls, cfg: Any) -> None:
        flag = f"--method {cls.name}"
        if cfg.order not in (1, 2):
            raise ConfigError(f"--order={cfg.order}: must be 1 or 2")
        if cfg.arch_lr <= 0 or cfg.arch_weight_decay < 0:
            raise ConfigError(f"--arch-lr={cfg.arch_lr} --arch-weight-decay={cfg.arch_weight_decay}: need "
                              f"arch-lr > 0 and arch-weight-decay >= 0")
        if cfg.arch_start >= cfg.epochs:
            raise ConfigError(f"--arch-start={cfg.arch_start}: must be below --epochs={cfg.epochs}, or the "
                              f"architecture is never trained")
        if cfg.spectral_norm:
            raise ConfigError(f"{flag} trains without spectral normalisation, as its authors do: "
                              "spectral_norm must be off (--no-spectral-norm, the method's default)")
        if cfg.mixing != "sum":
            raise ConfigError(f"{flag} mixes by its learned alphas; --mixing applies to --method msr only")
        if cfg.select != "min":
            raise ConfigError(f"--select applies to --method msr (stable ranks) only; {flag} picks the strongest "
                              f"alphas")

    def adapt(self, net: nn.Module) -> None:
        for a in add_alphas(net).arch_parameters():   # trained by the Architect's own steps only
            a.requires_grad_(False)

    def setup(self, net: nn.Module, weight_optimizer: torch.optim.Optimizer, ctx: SearchContext) -> None:
        self.ctx, self.epoch = ctx, 0
        self.architect = Architect(net, weight_optimizer, self.cfg.arch_lr, self.cfg.arch_weight_decay,
                                   self.cfg.order, reduce_grads=ctx.average,
                                   clip=(self.cfg.grad_clip or None) if self.clip_arch_grad else None)

    def new_epoch(self, epoch: int, fresh: bool) -> None:
        self.epoch = epoch

    def step_hook(self, epoch_seed: int, start: int) -> BeforeStep | None:
        """One architecture step on the next search-valid batch before each weight step (none in the
        first ``arch_start`` epochs: weights only)."""
        if self.epoch < self.cfg.arch_start:
            return None
        batches: Iterator = iter(self.ctx.valid_batches(epoch_seed, start))
        accel, architect = self.ctx.accel, self.architect

        def step(_: int, x: torch.Tensor, y: torch.Tensor) -> None:
            xv, yv = next(batches)
            with accel.autocast():
                architect.step(x, y, accel.input(xv), yv)
        return step

    def derive(self, net: nn.Module) -> Derivation:
        table = alpha_table(net).cpu()
        return Derivation(table, derive_genotype(-table[0], -table[1], net.primitives, net.steps, net.multiplier,
                                                 exclude=("none",)))

    def state_dict(self) -> dict[str, Any]:
        return self.architect.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            self.architect.optimizer.load_state_dict(state)


def add_alphas(net: nn.Module, ops: int | None = None) -> nn.Module:
    """Give a supernet DARTS's alphas (2, edges, ops), drawn as 1e-3 * N(0, 1), and softmax(alpha)
    mixing (the search turns their ``requires_grad`` off: :meth:`Architect.step` turns it on).
    ``ops``: candidates per edge (default: all of the supernet's; P-DARTS's later stages: fewer)."""
    net.register_parameter("alphas", nn.Parameter(
        1e-3 * torch.randn(2, num_edges(net.steps), ops or len(net.primitives), device=net.classifier.weight.device)))
    net.arch_parameter_names = ("alphas",)
    net.mixer = softmax_alpha
    return net


def softmax_alpha(net: nn.Module, cell: nn.Module) -> torch.Tensor:
    """DARTS mixing: softmax(alpha) of the cell's type, (edges, ops)."""
    return torch.softmax(net.alphas[int(cell.reduction)], dim=-1)


def alpha_table(net: nn.Module) -> torch.Tensor:
    """softmax(alpha) per cell type, shape (2, edges, ops): [normal, reduce]."""
    return torch.softmax(net.alphas.detach().float(), dim=-1)


def alpha_genotype(net: nn.Module) -> Genotype:
    """DARTS derivation: per edge the strongest op but ``none`` by softmax(alpha), per node the 2
    strongest edges (the shared routine, with costs -softmax(alpha))."""
    table = alpha_table(net).cpu()
    return derive_genotype(-table[0], -table[1], net.primitives, net.steps, net.multiplier, exclude=("none",))
