"""Block power iteration and the refreshes of the tracked singular subspaces (SPEC section 2).

The numerical core under :mod:`msrdarts.nn.spectral`, on plain tensors, for any operator given as
its products with blocks of vectors:

- :func:`block_step`, one step of block power iteration per group with a b x b Rayleigh-Ritz
  problem; split as :func:`block_grams`, :func:`block_coefficients` and :func:`block_update` so
  that many operators' small problems are solved together (:class:`msrdarts.nn.spectral_batch.SpectralBatch`);
- :func:`block_refresh`, a restarted block Krylov method with a convergence tolerance, and
  :func:`dense_refresh` for operators small enough to hold densely.

The b x b algebra runs on "column-batched" matrices (b, b, groups): thousands of 3 x 3 products as
a few broadcast operations over a contiguous last axis are 3x faster on the CPU than ``bmm``'s
per-matrix kernels, and Cholesky and triangular inverse as O(b^2) vector operations are 10x faster
than the batched LAPACK calls.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


def normalize_groups(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """Scale each (sample, group) block of ``x`` (shape (B, C, ...)) to unit norm."""
    flat = x.reshape(x.shape[0], groups, -1)
    return (flat / flat.norm(dim=2, keepdim=True).clamp_min(eps)).view_as(x)


def _cholesky(gram: torch.Tensor, rel_jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower Cholesky factors of the PSD (..., b, b) ``gram`` plus ``rel_jitter`` times its mean
    diagonal, and per matrix whether it succeeded (no sync: callers fall back where it did not)."""
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(gram.dtype).tiny)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    L, info = torch.linalg.cholesky_ex(gram + (rel_jitter * scale)[..., None, None] * eye)
    return L, info == 0


def _lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """Inverse of each lower-triangular (..., b, b) ``L``: forward substitution as elementwise ops
    for b <= 4 (a batched triangular solve costs 5x more on thousands of 3 x 3 matrices)."""
    b = L.shape[-1]
    if b > 4:
        eye = torch.eye(b, dtype=L.dtype, device=L.device).expand_as(L)
        return torch.linalg.solve_triangular(L, eye, upper=False)
    inv = torch.zeros_like(L)
    d = 1 / L.diagonal(dim1=-2, dim2=-1)
    for i in range(b):
        inv[..., i, i] = d[..., i]
        for j in range(i):
            inv[..., i, j] = -(L[..., i, j:i] * inv[..., j:i, j]).sum(-1) * d[..., i]
    return inv


def stack_block(u: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The block (groups, b, n) of vectors a block iteration tracks: u (groups, n) first, then the
    rest of the tracked subspace, ``basis`` (groups, b-1, n)."""
    return torch.cat([u.unsqueeze(1), basis], 1)


def _cols_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(i, k, G) x (k, j, G) -> (i, j, G)."""
    return (a.unsqueeze(2) * b.unsqueeze(0)).sum(1)


def _cols_lower_inverse_cholesky(g: torch.Tensor) -> torch.Tensor:
    """L^-1 for the lower Cholesky factor L of each (b, b) slice of ``g`` (b, b, G); NaN where one
    is not positive definite. The entries are (G,) vectors held in Python lists and stacked once:
    about 30 vector operations for b = 3 (writing each entry into a tensor costs 3 more each)."""
    b = g.shape[0]
    L = [[g[i, j] for j in range(i + 1)] for i in range(b)]          # the lower triangle, then L
    for j in range(b):
        d = L[j][j]
        for k in range(j):
            d = d - L[j][k] * L[j][k]
        L[j][j] = d.sqrt()                                             # NaN if not positive definite
        for i in range(j + 1, b):
            s = L[i][j]
            for k in range(j):
                s = s - L[i][k] * L[j][k]
            L[i][j] = s / L[j][j]
    inv = [[None] * (i + 1) for i in range(b)]
    for i in range(b):
        inv[i][i] = L[i][i].reciprocal()
        for j in range(i):                  # -(sum over k = j..i-1 of L[i][k] inv[k][j]) / L[i][i]
            s = L[i][j] * inv[j][j]
            for k in range(j + 1, i):
                s = s + L[i][k] * inv[k][j]
            inv[i][j] = -s * inv[i][i]
    zero = torch.zeros_like(inv[0][0])
    return torch.stack([inv[i][j] if j <= i else zero for i in range(b) for j in range(b)]).view(b, b, -1)


def _cols_top_eigenvector(S: torch.Tensor, squarings: int = 8) -> torch.Tensor:
    """A unit top eigenvector of each (b, b) slice of the column-batched symmetric PSD ``S``
    (b, b, G), as (b, G): S^(2^squarings), trace-normalised, is the projector onto the top
    eigenvectors up to (l2/l1)^(2^squarings); its column with the largest diagonal is one (a vector
    of the top eigenspace where the top eigenvalue repeats, which serves as well). Reductions over a
    tiny axis, as ``argmax`` or ``normalize`` would run, cost 20x more on the CPU than these loops."""
    P, b = S, S.shape[0]
    for k in range(squarings):
        if k % 2 == 0:   # trace 1: the top eigenvalue in [1/b, 1], and two squarings keep it above 1/b^4
            P = P / P.reshape(b * b, -1)[::b + 1].sum(0).clamp_min(torch.finfo(P.dtype).tiny)
        P = _cols_mm(P, P)
    best, x = P[0, 0], P[:, 0]
    for i in range(1, b):                                            # the column of the largest diagonal
        larger = P[i, i] > best
        best, x = torch.where(larger, P[i, i], best), torch.where(larger, P[:, i], x)
    return x / sum(x[i] * x[i] for i in range(b)).sqrt().clamp_min(torch.finfo(P.dtype).tiny)


@torch.no_grad()
def small_top_vectors(Ms: list[torch.Tensor], eps: float, squarings: int = 10
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The top singular pair of each operator A x = x M of the batches ``Ms`` (each (G_i, n_i, m_i))
    whose smaller side s_i = min(n_i, m_i) is a few pixels: per operator (u (G_i, n_i), v (G_i, m_i)),
    unit, v = A u / ||A u|| (u = A^T v / ||A^T v|| where the output side is the smaller).

    The top eigenvector of the smaller Gram matrix (M M^T or M^T M, s x s, one batched matmul per
    batch) by :func:`_cols_top_eigenvector` with ``squarings`` squarings, the operators of every
    batch with s > 1 in one column-batched problem (zero-padded to the largest s: zero rows and
    columns change neither the top eigenvalue nor its vector; s = 1 needs none). With 2^10 powers
    an eigenvalue ratio r leaves at most r^1024 of the second vector's weight, so that v^T A u is
    within 1/(2e 1024) < 2e-4, relative, of sigma however close the top two are (where they are
    equal, any vector of their span is exact). The squarings run in the column layout (pixels,
    operators): a few dozen vector operations per step, no reductions over a 4-long axis (20x
    dearer on the CPU); the Grams and the other vector are batched matrix products."""
    wide = torch.promote_types(Ms[0].dtype, torch.float32)
    wides = [M.to(wide) for M in Ms]
    rows = [M.shape[1] <= M.shape[2] for M in Ms]             # the smaller side: the input (u's)
    sides = [min(M.shape[1], M.shape[2]) for M in Ms]
    size = max(sides)
    grams = [F.pad((M @ M.mT if r else M.mT @ M).permute(1, 2, 0), (0, 0, 0, size - s, 0, size - s))
             for M, r, s in zip(wides, rows, sides) if s > 1]                         # (size, size, G)
    x = _cols_top_eigenvector(torch.cat(grams, -1), squarings) if grams else None     # (size, sum G), unit
    if x is not None:   # a zero operator: any unit vector (e_1)
        x = torch.cat([x[:1] + (x.square().sum(0, keepdim=True) == 0).to(x.dtype), x[1:]])
    tops = iter(x.split([g.shape[-1] for g in grams], -1) if x is not None else [])
    out = []
    for M, W, r, s in zip(Ms, wides, rows, sides):
        top = W.new_ones(W.shape[0], 1) if s == 1 else next(tops)[:s].T                # (G, s), unit
        other = (top.unsqueeze(1) @ W).squeeze(1) if r else (W @ top.unsqueeze(2)).squeeze(2)   # A u or A^T v
        other = other / other.square().sum(1, keepdim=True).sqrt().clamp_min(eps)
        u, v = (top, other) if r else (other, top)
        out.append((u.to(M.dtype), v.to(M.dtype)))
    return out


def _cols_complement(x: torch.Tensor) -> torch.Tensor:
    """Per unit column x of (b, G), b-1 orthonormal vectors orthogonal to it, (b-1, b, G): rows
    1.. of the Householder reflection that maps x to a multiple of e_1."""
    b = x.shape[0]
    w = torch.cat([x[:1] + torch.where(x[0] >= 0, 1.0, -1.0).to(x.dtype), x[1:]])
    ww = sum(w[i] * w[i] for i in range(b)).clamp_min(torch.finfo(x.dtype).tiny)
    eye = torch.eye(b, dtype=x.dtype, device=x.device)[1:].unsqueeze(-1)
    return eye - (2 / ww) * w[1:, None] * w[None, :]


def block_grams(Z: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gram matrices Z Z^T and Y Y^T of the blocks (groups, b, m) and (groups, b, n), column-batched
    (b, b, groups): the input of :func:`block_coefficients`, which many operators' grams
    concatenated along the last axis share."""
    return (Z @ Z.mT).permute(1, 2, 0), (Y @ Y.mT).permute(1, 2, 0)


def block_coefficients(gz: torch.Tensor, gy: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """The b x b part of :func:`block_step`, from :func:`block_grams` (b, b, groups): per group the
    rows c^T (groups, rows, b) that make the new u (row 0) and basis (rows 1..) of Y, the first rows
    of the identity where the Cholesky of Z Z^T fails. ``rows`` (b or b - 1, default b): with b - 1,
    the basis leaves out the Ritz direction of the smallest Ritz value, so that a block that took
    an extra vector for a step (the probe of :func:`msrdarts.nn.probe.with_probe`) keeps the best
    b - 1 directions of its b: the top b - 1 Ritz subspace, a singular value rising towards the top
    included. The dropped direction is the top eigenvector of tr(S') I - S' on the complement of
    u, by 256 powers: where the lower Ritz values cluster it is found only roughly (the kept span
    may hold some of the third direction instead of the bottom one; the Ritz value given up is
    then at most the gap between those two). Deflation (the top of S', then the top of the rest)
    would resolve it sharply."""
    b, tiny = gz.shape[0], torch.finfo(gz.dtype).tiny
    rows = b if rows is None else rows
    if rows not in (b, b - 1) or rows < 1:
        raise ValueError(f"rows must be {b} or {b - 1}, not {rows}")
    jitter = (64 * torch.finfo(gz.dtype).eps / b) * sum(gz[i, i] for i in range(b)).clamp_min(tiny)
    gz = gz + torch.eye(b, dtype=gz.dtype, device=gz.device).unsqueeze(-1) * jitter
    Li = _cols_lower_inverse_cholesky(gz)
    S = _cols_mm(_cols_mm(Li, gy.contiguous()), Li.transpose(0, 1).contiguous())
    x = _cols_top_eigenvector(S)                                                    # (b, groups)
    H = _cols_complement(x)                                                         # (b-1, b, groups)
    if rows == b - 1 and b > 2:   # drop the complement's bottom Ritz direction: the top of tr(S') I - S'
        S2 = _cols_mm(_cols_mm(H, S), H.transpose(0, 1).contiguous())               # (b-1, b-1, groups)
        eye = torch.eye(b - 1, dtype=S.dtype, device=S.device).unsqueeze(-1)
        bottom = _cols_top_eigenvector(eye * sum(S2[i, i] for i in range(b - 1)) - S2)
        H = _cols_mm(_cols_complement(bottom), H)                                   # (b-2, b, groups)
    elif rows == b - 1:
        H = H[:0]
    C = _cols_mm(torch.cat([x.unsqueeze(0), H]), Li).permute(2, 0, 1)              # rows c^T
    ok = torch.isfinite(C.sum((1, 2)))[:, None, None]                              # (groups, 1, 1)
    # contiguous: bmm with the permuted layout is 10x slower on 64-pixel rows (CPU)
    fallback = torch.eye(b, dtype=C.dtype, device=C.device)[:rows]
    return torch.where(ok, C, fallback).contiguous()                               # else: each row alone


def block_update(C: torch.Tensor, Z: torch.Tensor, Y: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, v, basis) of :func:`block_step` from its coefficients C (:func:`block_coefficients`)."""
    new = F.normalize(C @ Y, dim=-1, eps=eps)                                  # u, then the basis
    return new[:, 0], F.normalize((C[:, :1] @ Z)[:, 0], dim=-1, eps=eps), new[:, 1:]


@torch.no_grad()
def block_step(Z: torch.Tensor, Y: torch.Tensor, eps: float, rows: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of block power iteration, per group, from the images Z = A X (groups, b, m) and
    Y = A^T Z (groups, b, n) of the tracked block X (:func:`stack_block`). Returns (u, v, basis).

    Among the vectors z = Z^T c it takes the one with the largest ||A^T z|| / ||z|| (each is a
    lower bound of sigma): the top eigenvector x of S = L^-1 (Y Y^T) L^-T, with Z Z^T = L L^T, and
    c = L^-T x (a b x b problem). It returns u = A^T z / ||A^T z|| and v = z / ||z||, so that
    v^T A u is that ratio, as after one power iteration for b = 1. The new basis is Y L^-T h for
    the vectors h orthogonal to x (rows normalised): orthogonal to u (h^T S x = 0), it spans the
    rest of the Rayleigh-Ritz subspace, so the block follows the top-b singular subspace and a
    singular value that overtakes the tracked one is in the block when it does. A group whose
    Cholesky fails (a zero or degenerate block) takes the plain power iteration of each row instead.
    ``rows`` = b - 1 keeps the top b - 1 Ritz directions of b vectors (see :func:`block_coefficients`).
    The b x b problems of several operators can be solved together: :func:`block_grams`,
    :func:`block_coefficients` on the concatenation, :func:`block_update` per operator.
    """
    return block_update(block_coefficients(*block_grams(Z, Y), rows), Z, Y, eps)


def _ritz_space(S: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An orthonormal basis Q (groups, p, s) of the approximate top-s eigenspace of each symmetric
    PSD (groups, p, p) ``S`` (float64), the projection T = Q^T S Q (groups, s, s), and per group
    whether it succeeded: orthogonal iteration with S^64 from the ``start`` columns (groups, p, s).
    No batched ``eigh`` of the p x p problems (6x slower on the CPU); :func:`_eigh` then solves the
    small s x s ones."""
    P = S.float()        # only a direction finder: float32 products are twice as fast
    for _ in range(6):
        P = P / P.diagonal(dim1=-2, dim2=-1).sum(-1).abs().clamp_min(torch.finfo(P.dtype).tiny)[..., None, None]
        P = P @ P
    Q, ok = (P @ start.float()).to(S.dtype), True
    for _ in range(2):   # Cholesky QR, twice: S^64 leaves the columns nearly dependent
        R, ok_r = _cholesky(Q.mT @ Q, 1e-12)
        Q, ok = Q @ _lower_inverse(R).mT, ok & ok_r
    return Q, Q.mT @ S @ Q, ok


def _eigh(T: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues (groups, s), descending, eigenvectors (groups, s, s) in that order, of the
    symmetric (groups, s, s) ``T``, and ``ok`` where T was finite (elsewhere the identity's). One
    batched ``eigh``: on the s x s Ritz problems (s <= 5) several times faster on the CPU than deflated
    squarings, and exact where the top eigenvalues are close."""
    ok = ok & torch.isfinite(T).all((1, 2))
    eye = torch.eye(T.shape[-1], dtype=T.dtype, device=T.device)
    w, V = torch.linalg.eigh(torch.where(ok[:, None, None], T, eye))
    return w.flip(-1), V.flip(-1), ok


def _refreshed(start: torch.Tensor, new: torch.Tensor, z_start: torch.Tensor, z_new: torch.Tensor, ok: torch.Tensor,
               block: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, v, basis) from a refresh's ``new`` unit rows (groups, block, n) with z_new = A new[:, 0],
    or, per group, the ``start`` rows (u first, then the basis) with z_start = A start[:, 0] where
    the new u is not better or the computation failed (``ok`` false): never a lower estimate."""
    keep = (~ok | ~(z_new.norm(dim=-1) >= z_start.norm(dim=-1)))[:, None]           # NaN-safe
    return (torch.where(keep, start[:, 0], new[:, 0]),
            F.normalize(torch.where(keep, z_start, z_new), dim=-1, eps=eps),
            torch.where(keep[..., None], start[:, 1:block], new[:, 1:]))


def _with_random(start: torch.Tensor, eps: float) -> torch.Tensor:
    """``start`` (groups, r, n) and a fixed random row, all rows unit: (groups, r+1, n). (A probe
    that is symmetric where the operator is can miss a singular vector entirely.)"""
    g, _, n = start.shape
    rand = torch.randn(g, 1, n, generator=torch.Generator(start.device).manual_seed(0), device=start.device,
                       dtype=start.dtype)
    return F.normalize(torch.cat([start, rand], 1), dim=-1, eps=eps)


@torch.no_grad()
def dense_refresh(M: torch.Tensor, start: torch.Tensor, block: int, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The refresh of operators small enough to hold densely: per group A x = x M with M
    (groups, n, m), and ``start`` (groups, block+1, n) as for :func:`block_refresh`. The top
    ``block`` eigenvectors of A^T A = M M^T (n x n, float64) by :func:`_ritz_space` and
    :func:`_eigh` from the start rows (and a random one where n allows), so no Krylov basis; where
    those rows would span the whole space (n no larger than their count), by :func:`_eigh` of
    M M^T itself. Returns (u, v, basis) as it does."""
    x0 = _with_random(start, eps)[:, :max(block, min(block + 2, M.shape[1]))]   # no more than n where n allows
    wide = torch.float64
    n = M.shape[1]
    if block <= n <= x0.shape[1]:     # the start rows span the whole space: its eigenvectors directly
        ok = torch.ones(M.shape[0], dtype=torch.bool, device=M.device)
        _, V, ok = _eigh((M @ M.mT).to(wide), ok)
        c = V[..., :block]
    else:
        Q, T, ok = _ritz_space((M @ M.mT).to(wide), x0.to(wide).mT)
        _, V, ok = _eigh(T, ok)
        c = Q @ V[..., :block]
    ok = ok & torch.isfinite(c.sum((1, 2)))          # fewer dimensions than vectors: some rows fail
    c = torch.where(ok[:, None, None], c, torch.zeros_like(c))
    new = F.normalize(c.mT.to(M.dtype), dim=-1, eps=eps)                            # (groups, block, n)
    return _refreshed(x0, new, (x0[:, :1] @ M)[:, 0], (new[:, :1] @ M)[:, 0], ok, block, eps)


def _gram(blocks: list[torch.Tensor], out: torch.Tensor, chunk_bytes: int = 1 << 22) -> torch.Tensor:
    """X X^T (groups, p, p) of the rows X = cat(blocks, 1) (each (groups, r_i, n)) into ``out``, in
    its dtype, a few groups at a time: the whole of X in float64 is hundreds of MB on a 32x32 map,
    and on the CPU each allocation that large is fresh pages from the OS (a fault per page, every
    time), which cost more than the products; chunks of a few MB reuse the allocator's memory."""
    n, p = blocks[0].shape[2], sum(b.shape[1] for b in blocks)
    step = max(1, chunk_bytes // (p * n * out.element_size()))
    for start in range(0, out.shape[0], step):
        X = torch.cat([b[start:start + step] for b in blocks], 1).to(out.dtype)
        torch.bmm(X, X.mT, out=out[start:start + step])
    return out


def _ritz(gram_x: torch.Tensor, gram_z: torch.Tensor, r: int, block: int, jitter: float
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One cycle's Rayleigh-Ritz problems of :func:`block_refresh`, per group, from the Krylov
    Grams X X^T and Z Z^T (groups, p, p): the top Ritz value (groups,), whether it succeeded, and
    the coefficients (groups, p, r) and (groups, p, block) of the top-r and top-``block`` Ritz
    vectors in the Krylov rows (zero where it failed)."""
    L, ok = _cholesky(gram_x, jitter)
    Li = _lower_inverse(L)
    p = L.shape[-1]                                          # orthogonal iteration from the newest rows
    Q, T, ok_ritz = _ritz_space(Li @ gram_z @ Li.mT, L.mT[..., p - r:])
    values, V, ok_ritz = _eigh(T, ok_ritz)
    c_space = Li.mT @ Q
    c_top = c_space @ V[..., :block]
    ok = ok & ok_ritz & torch.isfinite(c_space.sum((1, 2))) & torch.isfinite(c_top.sum((1, 2)))
    return (values[:, 0], ok, torch.where(ok[:, None, None], c_space, 0.0),
            torch.where(ok[:, None, None], c_top, 0.0))


def _combine(c: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
    """c^T X (groups, k, n) for X = cat(blocks, 1) and c (groups, p, k), block by block (no X)."""
    out, row = None, 0
    for b in blocks:
        part = c[:, row:row + b.shape[1]].mT.contiguous()
        out = torch.bmm(part, b) if out is None else out.baddbmm_(part, b)
        row += b.shape[1]
    return out


class RefreshInput(NamedTuple):
    """One operator for :func:`block_refresh`: A and A^T on blocks of vectors per group
    ((groups, r, n) -> (groups, r, m) and back) and the rows to start from (groups, block+1, n):
    the tracked u, its basis and a probe."""

    A: Callable[[torch.Tensor], torch.Tensor]
    At: Callable[[torch.Tensor], torch.Tensor]
    start: torch.Tensor


@torch.no_grad()
def block_refresh(inputs: list[RefreshInput], block: int, max_steps: int, tol: float, eps: float,
                  cycle_steps: int = 2) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Block Krylov refresh of the tracked vectors of several operators, per group.

    A fixed random vector joins each operator's start rows (:func:`_with_random`): r rows. Each
    cycle builds the Krylov space X_0, X_1 = A^T A X_0, ..., X_c (``cycle_steps`` = c, rows
    normalised), takes the top r Ritz vectors of A^T A in it (:func:`_ritz` on the Krylov Grams, in
    float64, from the newest rows; all operators' groups together, their problems have one size)
    and starts the next cycle from them (a restarted block Krylov method: a few small Ritz problems
    instead of one large one). Cycles stop when the top Ritz value changes by at most ``tol``
    (relative) in every group of every operator (the first compares with the tracked u's value),
    or after ``max_steps`` Krylov steps in all. The top ``block`` Ritz vectors are the new u and basis.

    Returns per operator (u (groups, n), v = A u / ||A u|| (groups, m), basis (groups, block-1, n)).
    A group whose result has a smaller ||A u|| than its tracked u (rounding on a nearly dependent
    Krylov basis) or whose Ritz problem fails keeps its tracked vectors: a refresh never lowers an
    estimate.
    """
    r = inputs[0].start.shape[1] + 1                                           # rows per block
    wide = torch.float64
    x0 = starts = [_with_random(op.start, eps) for op in inputs]
    z0 = [op.A(x) for op, x in zip(inputs, starts)]
    last = torch.cat([z[:, 0].norm(dim=-1) for z in z0]).to(wide).square()     # the tracked u's Rayleigh quotient
    block_z = z0
    sizes = [x.shape[0] for x in starts]
    cycles = max(1, -(-max_steps // cycle_steps))
    p = r * (cycle_steps + 1)
    grams = x0[0].new_empty(2, sum(sizes), p, p, dtype=wide)   # X X^T and Z Z^T of every group, every cycle
    # Jitter at the vectors' own rounding (a larger one drops the directions that refine the top
    # vector), and above float64's, so that exactly dependent rows still factor.
    jitter = max(2 * torch.finfo(x0[0].dtype).eps, 1e-13)
    for cycle in range(cycles):
        xs, zs = [[x] for x in starts], [[z] for z in block_z]
        for _ in range(cycle_steps):
            for i, op in enumerate(inputs):
                xs[i].append(F.normalize(op.At(zs[i][-1]), dim=-1, eps=eps))
                zs[i].append(op.A(xs[i][-1]))
        for x, z, gx, gz in zip(xs, zs, grams[0].split(sizes), grams[1].split(sizes)):
            _gram(x, gx)
            _gram(z, gz)
        # All operators' Ritz problems together, in slices that stay in cache.
        top, ok, c_space, c_top = (torch.cat(t) for t in zip(*(
            _ritz(gx, gz, r, block, jitter) for gx, gz in zip(grams[0].split(2048), grams[1].split(2048)))))
        done = cycle == cycles - 1
        if not done:     # the top value, to check convergence
            done = bool(((top - last).abs() <= tol * top.abs()).all())
            last = torch.where(ok, top, last)
        # The next cycle starts from the top-r space; the result is the top Ritz vectors.
        c = c_top if done else c_space                                           # (groups, p, block or r)
        starts = [torch.where(ok_i[:, None, None], F.normalize(_combine(c_i.to(x[0].dtype), x), dim=-1, eps=eps),
                              x[0][:, :c_i.shape[-1]])
                  for x, c_i, ok_i in zip(xs, c.split(sizes), ok.split(sizes))]
        if done:
            break
        block_z = [op.A(x) for op, x in zip(inputs, starts)]
    block_z = [op.A(x[:, :1]) for op, x in zip(inputs, starts)]
    return [_refreshed(x, new[:, :block], z[:, 0], z_new[:, 0], torch.ones_like(z[:, 0, 0], dtype=torch.bool),
                       block, eps) for x, z, new, z_new in zip(x0, z0, starts, block_z)]
