"""MixtureGrowth with explicit template banks and learned coefficients.

Pham, Teterwak, Nelson & Plummer, "MixtureGrowth: Growing Neural Networks by Recombining Learned
Parameters", WACV 2024, arXiv:2311.04251. Every layer's weight is generated from a bank of ``K``
parameter templates ``T_1 … T_K`` of one block shape, mixed by learned coefficients. A layer of an
``R × C`` grid of blocks is

    W = [W_rc],        W_rc = Σ_k c_rc,k T_k           (c_rc ∈ R^K, learned; T_k learned)

Before growth, ``n`` small networks share each layer's bank (here: trained jointly, the loss the sum of
theirs) and network ``m`` owns its coefficient vector ``c_m`` (a 1 × 1 grid). Growing makes a network
``n`` times wider whose hidden layers are ``n × n`` grids on the *same* templates: the diagonal blocks
keep ``c_m`` (the small networks' layers), and every new block gets a new coefficient vector
(``coef_init``):

- ``"orthogonal"`` (one of the initialisations in the paper's public code; the paper's text could not be
  read offline): a new combination unlike any learned one, a seeded random unit vector in the
  orthogonal complement of the layer's learned ``c_1 … c_n`` (needs ``K > n``), scaled to ``scale`` ×
  their mean norm;
- ``"convex"``: a seeded random convex combination of the learned ``c_1 … c_n`` (times ``scale``);
- ``"zero"``: zero coefficients (the block starts at zero but its coefficients get gradient
  ``∂L/∂c_rc,k = ⟨∂L/∂W_rc, T_k⟩``).

The first layer stacks the small networks' row blocks (its input is shared, an ``n × 1`` grid), the last
layer averages their outputs (a ``1 × n`` grid with ``c_m / n``, the biases averaged), so with
``coef_init="zero"`` the grown network computes exactly the mean of the small networks' logits. The grown
network is trained further in the same parameterisation (templates and all ``n²`` coefficient vectors).

The paper's code gives each small network its own template set and trains them one after the other;
``bank_networks(shared=False)`` builds that form (train each network alone, e.g.
``train_jointly([net], …)``), and :func:`grow_bank` then concatenates the sets. The default here is one
bank per layer shared by the small networks and trained jointly. :func:`to_mlp` bakes a bank network
into a plain zoo ``MLP``.

This module registers no adapter config.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import WeightsmithError
from ..zoo import MLP

COEF_INITS = ("orthogonal", "convex", "zero")


class TemplateLinear(nn.Module):
    """A Linear layer whose weight is an ``R × C`` grid of blocks ``W_rc = Σ_k c_rc,k T_k``.

    ``templates`` (``K × out_block × in_block``) may be the same Parameter in several layers (a shared
    bank); ``coefficients`` is ``R × C × K``; ``bias`` has ``R · out_block`` entries."""

    def __init__(self, templates: nn.Parameter, coefficients: Tensor, bias: Tensor) -> None:
        super().__init__()
        if templates.dim() != 3 or coefficients.dim() != 3 or coefficients.shape[2] != templates.shape[0]:
            raise WeightsmithError(
                f"TemplateLinear: coefficients {tuple(coefficients.shape)} do not fit templates "
                f"{tuple(templates.shape)} (expected R x C x {templates.shape[0]})"
            )
        if bias.shape != (coefficients.shape[0] * templates.shape[1],):
            raise WeightsmithError(f"TemplateLinear: bias {tuple(bias.shape)} does not fit the grid")
        self.templates = templates
        self.coefficients = nn.Parameter(coefficients.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.coefficients.shape[0]), int(self.coefficients.shape[1])

    @property
    def in_features(self) -> int:
        return self.grid[1] * int(self.templates.shape[2])

    @property
    def out_features(self) -> int:
        return self.grid[0] * int(self.templates.shape[1])

    @property
    def weight(self) -> Tensor:
        """The ``(R · out_block) × (C · in_block)`` weight, block ``(r, c)`` = ``Σ_k c_rc,k T_k``."""
        R, C = self.grid
        _, o, i = self.templates.shape
        blocks = torch.einsum("rck,koi->roci", self.coefficients, self.templates)
        return blocks.reshape(R * o, C * i)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class TemplateMLP(nn.Module):
    """``in -> [TemplateLinear, ReLU] * len(hidden) -> TemplateLinear``, the zoo ``MLP`` shape."""

    def __init__(self, layers: Sequence[TemplateLinear]) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        for layer in layers[:-1]:
            mods += [layer, nn.ReLU()]
        mods.append(layers[-1])
        self.net = nn.Sequential(*mods)
        self.in_dim = layers[0].in_features
        self.hidden = tuple(layer.out_features for layer in layers[:-1])

    def layers(self) -> list[TemplateLinear]:
        return [m for m in self.net if isinstance(m, TemplateLinear)]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


def bank_networks(
    in_dim: int,
    hidden: tuple[int, ...],
    n_classes: int,
    n_networks: int = 2,
    n_templates: int = 2,
    seed: int = 0,
    shared: bool = True,
) -> list[TemplateMLP]:
    """``n_networks`` small MLPs that share, per layer, a bank of ``n_templates`` templates (``shared``;
    else each network has its own bank of ``n_templates``, as in the paper's code).

    Templates start like ``nn.Linear`` weights (``U(±1/√fan_in)``); the networks' coefficient vectors
    of a layer start as the rows of a random orthogonal ``n × K`` matrix (orthonormal when ``n ≤ K``), so
    each initial weight has the templates' scale and the networks start different; biases as
    ``nn.Linear``."""
    if n_networks < 2:
        raise WeightsmithError(f"MixtureGrowth n_networks must be at least 2, got {n_networks}")
    if n_templates < 1:
        raise WeightsmithError(f"MixtureGrowth n_templates must be at least 1, got {n_templates}")
    if not hidden or min(hidden) < 1:
        raise WeightsmithError(f"MixtureGrowth hidden must be positive widths, got {hidden}")
    g = torch.Generator().manual_seed(seed)
    dims = (in_dim, *hidden, n_classes)
    per_net: list[list[TemplateLinear]] = [[] for _ in range(n_networks)]
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        bound = a**-0.5
        banks = [
            nn.Parameter((torch.rand(n_templates, b, a, generator=g) * 2 - 1) * bound)
            for _ in range(1 if shared else n_networks)
        ]
        coefs = torch.empty(n_networks, n_templates)
        nn.init.orthogonal_(coefs, generator=g)
        for m in range(n_networks):
            bias = (torch.rand(b, generator=g) * 2 - 1) * bound
            per_net[m].append(TemplateLinear(banks[m % len(banks)], coefs[m].reshape(1, 1, -1), bias))
    return [TemplateMLP(layers) for layers in per_net]


def train_jointly(
    nets: Sequence[nn.Module],
    x: Tensor,
    y: Tensor,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> None:
    """Adam on ``Σ_m CE(net_m(x_b), y_b)`` over seeded mini-batches: the networks see the same batches
    and their shared templates receive the sum of their gradients. Leaves the networks in eval mode."""
    params = list({id(p): p for net in nets for p in net.parameters()}.values())
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    for net in nets:
        net.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g).to(y.device)
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            loss = sum((nn.functional.cross_entropy(net(x[idx]), y[idx]) for net in nets), torch.zeros(()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for net in nets:
        net.eval()


def _check(coef_init: str, scale: float) -> None:
    if coef_init not in COEF_INITS:
        raise WeightsmithError(
            f"MixtureGrowth coef_init must be one of {', '.join(COEF_INITS)}, got '{coef_init}'"
        )
    if not scale >= 0.0:
        raise WeightsmithError(f"MixtureGrowth scale must be >= 0, got {scale}")


def new_coefficients(
    learned: Tensor, count: int, coef_init: str = "orthogonal", scale: float = 1.0, seed: int = 0
) -> Tensor:
    """``count`` new coefficient vectors (``count × K``) for new blocks from the ``n × K`` learned ones."""
    _check(coef_init, scale)
    n, K = learned.shape
    g = torch.Generator().manual_seed(seed)
    c = learned.detach().double().cpu()
    if coef_init == "zero":
        out = torch.zeros(count, K, dtype=torch.float64)
    elif coef_init == "convex":
        w = -torch.rand(count, n, generator=g, dtype=torch.float64).log()  # Exp(1)/sum: uniform on simplex
        out = scale * (w / w.sum(1, keepdim=True)) @ c
    else:
        _, s, Vh = torch.linalg.svd(c, full_matrices=True)
        rank = int((s > s.max() * max(n, K) * torch.finfo(torch.float64).eps).sum())
        if rank >= K:
            raise WeightsmithError(
                f"MixtureGrowth coef_init='orthogonal' needs more templates than the learned coefficients "
                f"span (K={K}, rank {rank}); use more templates or coef_init='convex'"
            )
        basis = Vh[rank:]  # orthonormal rows spanning the complement of the learned coefficients
        u = torch.randn(count, K - rank, generator=g, dtype=torch.float64) @ basis
        out = u / u.norm(dim=1, keepdim=True) * (scale * float(c.norm(dim=1).mean()))
    return out.to(learned)


@torch.no_grad()
def grow_bank(
    small: Sequence[TemplateMLP], coef_init: str = "orthogonal", scale: float = 1.0, seed: int = 0
) -> TemplateMLP:
    """The network ``n`` times as wide as the ``n`` bank networks in ``small``, on copies of their
    templates: diagonal blocks keep each network's coefficients, new blocks get :func:`new_coefficients`
    (``coef_init``, ``scale``); first layer stacked, last averaged.

    If the networks share each layer's bank, the grown layer uses that bank. If each has its own
    (``bank_networks(shared=False)``), the grown layer's bank is their concatenation ``[T^(1); …; T^(n)]``
    and network ``m``'s coefficients are zero-padded to ``(0, …, c_m, …, 0)``, so the diagonal blocks are
    unchanged and a new block may mix every network's templates."""
    _check(coef_init, scale)
    if len(small) < 2:
        raise WeightsmithError(f"MixtureGrowth needs at least 2 small networks, got {len(small)}")
    if any(not isinstance(m, TemplateMLP) for m in small):
        raise WeightsmithError("MixtureGrowth grow_bank grows TemplateMLP networks (see bank_networks)")
    layer_lists = [m.layers() for m in small]
    n, depth = len(small), len(layer_lists[0])
    if any(len(ls) != depth for ls in layer_lists):
        raise WeightsmithError("MixtureGrowth: the small networks differ in depth")
    grown: list[TemplateLinear] = []
    for li in range(depth):
        layers = [ls[li] for ls in layer_lists]
        banks = list({id(layer.templates): layer.templates for layer in layers}.values())
        if len(banks) not in (1, n) or any(layer.grid != (1, 1) for layer in layers):
            raise WeightsmithError(
                f"MixtureGrowth: layer {li} of the small networks must be 1 x 1 grids, on one shared bank "
                "or on one bank each"
            )
        if len({tuple(t.shape) for t in banks}) != 1:
            raise WeightsmithError(f"MixtureGrowth: layer {li} of the small networks differs in shape")
        learned = torch.cat([layer.coefficients.reshape(1, -1) for layer in layers])  # n × K
        if len(banks) == n > 1:  # own banks: concatenate, pad each network's coefficients to n·K
            learned = torch.block_diag(*learned)
        bias = torch.stack([layer.bias for layer in layers])  # n × out
        bank = nn.Parameter(torch.cat([t.detach() for t in banks]).clone())
        if li == 0:
            coefs, b = learned[:, None, :], bias.reshape(-1)
        elif li == depth - 1:
            coefs, b = learned[None, :, :] / n, bias.mean(0)
        else:
            coefs = torch.empty(n, n, learned.shape[1], dtype=learned.dtype, device=learned.device)
            new = iter(new_coefficients(learned, n * (n - 1), coef_init, scale, seed + li))
            for i in range(n):
                for j in range(n):
                    coefs[i, j] = learned[i] if i == j else next(new)
            b = bias.reshape(-1)
        grown.append(TemplateLinear(bank, coefs, b))
    return TemplateMLP(grown).eval()


@torch.no_grad()
def to_mlp(model: TemplateMLP) -> MLP:
    """A plain zoo ``MLP`` with the same function (every weight ``Σ_k c_k T_k`` baked)."""
    layers = model.layers()
    out = MLP(model.in_dim, model.hidden, layers[-1].out_features).to(layers[0].templates)
    for src, dst in zip(layers, (m for m in out.net if isinstance(m, nn.Linear)), strict=True):
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)
    return out.eval()
