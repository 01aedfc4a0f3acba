"""Centered kernel alignment (CKA): exact, streaming, and per-domain with uncertainty.

Own code rather than a library: torch-cka is linear/minibatch only, recomputes the second model's
Gram for every layer pair and returns NaN for batches of <= 3 rows; anatome has no minibatching and no
RBF kernel; neither gives bootstrap intervals or permutation baselines.

Every HSIC here is written as a Frobenius inner product of *centered* Gram matrices,
HSIC(K, L) = <C(K), C(L)> / norm(n), with
  - unbiased (Song et al. 2012): C = U-centering (zeroed diagonal), norm = n (n - 3);
  - biased: C(K) = H K H, norm = (n - 1)^2.
This one form serves the exact estimate and the streaming layer-grid accumulator (one centered Gram per
layer per batch, then a single matrix product gives every layer pair). Bootstrap resamples are row
counts over the original kernel, so their HSICs are matrix-vector products (`_weighted_hsic`).
All arithmetic is float64 (MinibatchCKA can form its Grams in float32 on request).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

KERNELS = ("linear", "rbf")
ESTIMATORS = ("unbiased", "biased")
# torch.nanquantile refuses inputs above 2**24 elements; beyond that the median is taken in numpy.
_QUANTILE_LIMIT = 1 << 24
_NO_BANDWIDTH = ("RBF bandwidth undefined: a representation has no non-zero pairwise distance "
                 "(constant representation); pass sigma= or check the inputs")


def _check_choice(kind: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(map(repr, valid))}")


def as_float64_matrix(X: Any, name: str = "X") -> torch.Tensor:
    """Convert a numpy array / tensor of shape (n, ...) to a float64 CPU tensor of shape (n, d).

    Trailing dimensions are flattened (pool conv maps *before* calling if that is not what you want).
    Raises ValueError for fewer than 2 dimensions or non-finite entries.
    """
    T = torch.as_tensor(np.asarray(X) if not isinstance(X, torch.Tensor) else X)
    T = T.detach().to("cpu", torch.float64)
    if T.ndim < 2:
        raise ValueError(f"{name} must have shape (n, d) with one row per example; got shape {tuple(T.shape)}")
    T = T.reshape(T.shape[0], -1)
    if not torch.isfinite(T).all():
        bad = int((~torch.isfinite(T)).any(dim=1).sum())
        raise ValueError(f"{name} has non-finite values (NaN/inf) in {bad} of {T.shape[0]} rows; "
                         "check the activations (fp16 overflow?) before computing CKA")
    return T


def _check_not_constant(Xc: torch.Tensor, X: torch.Tensor, name: str) -> None:
    """Xc is X with column means removed; all-zero means every row is identical."""
    scale = X.abs().max().item()
    if Xc.abs().max().item() <= 1e-12 * max(scale, 1e-300):
        raise ValueError(f"{name} is a constant representation (all {X.shape[0]} rows identical), so its "
                         "kernel has no variance and CKA is undefined; check for a dead layer or identical inputs")


def _sq_dists(X: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (..., n, n) of rows of X (..., n, d); exactly 0 between identical rows."""
    if X.ndim == 2:  # one matrix: numpy's X @ X.T is a BLAS syrk (half the flops of torch.mm)
        Xn = X.contiguous().numpy()
        D = Xn @ Xn.T
        sq = D.diagonal().copy()
        scale = sq[:, None] + sq[None, :]
        D *= -2
        D += scale
        D[D <= 1e-10 * scale] = 0  # exact zeros between identical rows, as below
        np.fill_diagonal(D, 0)
        return torch.from_numpy(D)
    sq = (X * X).sum(-1)
    scale = sq[..., :, None] + sq[..., None, :]
    D = scale - 2 * X @ X.transpose(-1, -2)
    # Identical rows must give exactly 0 (the median rule skips zeros); the expansion leaves rounding
    # noise of order 1e-16 * scale there instead.
    D = torch.where(D > 1e-10 * scale, D, torch.zeros_like(D))
    D.diagonal(dim1=-2, dim2=-1).zero_()
    return D


def median_nonzero(D: torch.Tensor) -> torch.Tensor:
    """Median of the non-zero off-diagonal entries of squared-distance matrices D (..., n, n).

    Uses the upper triangle (each pair once; same median as the full symmetric matrix).
    Raises ValueError when a matrix has no non-zero distance (all rows identical).
    """
    if D.ndim == 2:  # one matrix: a partition-based median of the full matrix (each pair twice: same median)
        vals = D.numpy()[D.numpy() > 0]
        if not len(vals):
            raise ValueError(_NO_BANDWIDTH)
        return torch.tensor(np.median(vals), dtype=D.dtype)
    n = D.shape[-1]
    iu = torch.triu_indices(n, n, offset=1)
    vals = D[..., iu[0], iu[1]].clone()
    vals[vals <= 0] = float("nan")
    if vals.numel() <= _QUANTILE_LIMIT:
        med = torch.nanquantile(vals, 0.5, dim=-1)
    else:
        med = torch.from_numpy(np.nanmedian(vals.numpy(), axis=-1))
    if torch.isnan(med).any():
        raise ValueError(_NO_BANDWIDTH)
    return med


def rbf_from_sq_dists(D: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """RBF kernel exp(-D / (2 sigma^2)) from squared distances D (..., n, n).

    sigma=None: per matrix, sigma^2 = median of its non-zero squared distances (the paper's rule).
    """
    if sigma is None:
        sigma2 = median_nonzero(D)[..., None, None]
    else:
        if not (isinstance(sigma, (int, float)) and sigma > 0 and np.isfinite(sigma)):
            raise ValueError(f"sigma must be a positive finite float or None (median rule); got {sigma!r}")
        sigma2 = torch.tensor(float(sigma) ** 2, dtype=D.dtype)
    return torch.exp(-D / (2 * sigma2))


def gram(X: torch.Tensor, kernel: str = "linear", sigma: float | None = None) -> torch.Tensor:
    """Kernel matrix (..., n, n) of float64 rows X (..., n, d). Cost O(n^2 d)."""
    _check_choice("kernel", kernel, KERNELS)
    if kernel == "linear":
        return X @ X.transpose(-1, -2)
    return rbf_from_sq_dists(_sq_dists(X), sigma)


def center_gram(K: torch.Tensor, estimator: str = "unbiased") -> torch.Tensor:
    """Centered Gram C(K) (..., n, n) such that HSIC(K, L) = <C(K), C(L)>_F / hsic_norm(n).

    unbiased: U-centering (Szekely & Rizzo 2014): zero the diagonal, subtract row/column sums / (n-2),
    add the total / ((n-1)(n-2)), zero the diagonal again. Its inner product equals Song et al.'s
    unbiased HSIC. biased: H K H.
    """
    _check_choice("estimator", estimator, ESTIMATORS)
    n = K.shape[-1]
    if estimator == "biased":
        Kc = K - K.mean(-1, keepdim=True)
        return Kc - Kc.mean(-2, keepdim=True)
    if n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs at least 4 examples; got n={n} "
                         "(use more rows/classes or estimator='biased')")
    U = K.detach().cpu().numpy().copy()
    _u_center_(U)
    return torch.from_numpy(U)


def _u_center_(K: np.ndarray) -> None:
    """U-center symmetric K (..., n, n) in place: zero the diagonal, take row sums r, subtract
    a_i + a_j with a = r / (n-2) - sum(r) / (2 (n-1)(n-2)), zero the diagonal. Four O(n^2) passes."""
    n = K.shape[-1]
    diag = (..., np.arange(n), np.arange(n))
    K[diag] = 0
    rows = K.sum(-1)
    a = rows / (n - 2) - rows.sum(-1, keepdims=True) / (2 * (n - 1) * (n - 2))
    K -= a[..., :, None]
    K -= a[..., None, :]
    K[diag] = 0


# Centre the features of a float64 Gram when ||column mean||^2 exceeds this many times the mean squared
# distance to it: rounding then costs more than 3 of float64's 16 digits.
_MEAN_DOMINANCE = 1e3


def _mean_dominates(K: np.ndarray) -> bool:
    """From the Gram K = X X' (m, m) alone: ||mean row||^2 = sum(K) / m^2, and the mean squared
    distance of the rows to it is trace(K) / m - ||mean row||^2. True when the first is more than
    `_MEAN_DOMINANCE` times the second (or the rows are all equal). One O(m^2) pass."""
    m = K.shape[0]
    mean_sq = K.sum() / m ** 2
    return bool(mean_sq > _MEAN_DOMINANCE * (np.trace(K) / m - mean_sq))


def hsic_norm(n: int, estimator: str) -> float:
    """The denominator of HSIC for `n` examples: n(n-3) (unbiased) or (n-1)^2 (biased)."""
    return float(n * (n - 3)) if estimator == "unbiased" else float((n - 1) ** 2)


def _cka_from_terms(kl: float, kk: float, ll: float, estimator: str, n: int, scale_k: float,
                    scale_l: float) -> float:
    """kl / sqrt(kk ll), refusing self-HSICs that are not positive beyond rounding.

    scale_* = tr(K)^2 / norm bounds |HSIC(K, K)|; values under 1e-10 of it are rounding noise
    (e.g. mutually orthogonal rows make the unbiased self-HSIC exactly 0 in exact arithmetic).
    """
    for label, v, scale in (("X", kk, scale_k), ("Y", ll, scale_l)):
        if not v > 1e-10 * scale:
            raise ValueError(f"self-HSIC of {label} is {v:.3g}, not positive ({estimator} estimator, n={n}): "
                             "CKA is undefined; use more examples or estimator='biased'")
    return kl / np.sqrt(kk * ll)


def _linear_feature_terms(X: torch.Tensor, Y: torch.Tensor, estimator: str) -> tuple[float, float, float]:
    """(HSIC(K,L), HSIC(K,K), HSIC(L,L)) for linear kernels without forming n x n Grams.

    Memory O(d1 d2 + d1^2 + d2^2), time O(n (d1 + d2)^2). Columns are centered first: HSIC (both
    estimators) is invariant to translating the features, and centering avoids cancellation.
    Unbiased, with a = row norms^2 of X, b = of Y, s = column sums, K~ = XX' with zeroed diagonal:
      tr(K~L~)   = ||X'Y||_F^2 - a.b
      1'K~1      = ||s_X||^2 - sum(a)
      1'K~L~1    = (X s_X - a) . (Y s_Y - b)
    """
    n = X.shape[0]

    def terms(A: torch.Tensor, B: torch.Tensor) -> float:
        cross = float(((A.T @ B) ** 2).sum())
        if estimator == "biased":
            return cross / hsic_norm(n, estimator)
        a, b = (A * A).sum(1), (B * B).sum(1)
        sa, sb = A.sum(0), B.sum(0)
        tr = cross - float(a @ b)
        one_k_one = float(sa @ sa - a.sum())
        one_l_one = float(sb @ sb - b.sum())
        one_kl_one = float((A @ sa - a) @ (B @ sb - b))
        val = tr + one_k_one * one_l_one / ((n - 1) * (n - 2)) - 2 * one_kl_one / (n - 2)
        return val / hsic_norm(n, estimator)

    return terms(X, Y), terms(X, X), terms(Y, Y)


def cka(X: Any, Y: Any, kernel: str = "linear", estimator: str = "unbiased", sigma: float | None = None,
        *, form: str = "auto") -> float:
    """CKA between representations X (n, d1) and Y (n, d2) of the same n examples (rows aligned).

    kernel: "linear" or "rbf" (exp(-D / (2 sigma^2)); sigma=None -> per-matrix median rule).
    estimator: "unbiased" (Song et al. 2012 in all three HSIC terms; n >= 4) or "biased" (tr(KHLH)/(n-1)^2).
    form (linear only): "gram" (O(n^2) memory), "feature" (O(d1 d2) memory) or "auto" (feature form when
    n > max(d1, d2)). Computed in float64. Raises ValueError, never returns NaN, for: mismatched rows,
    n < 4 with the unbiased estimator, a constant representation, a non-positive self-HSIC.
    """
    _check_choice("kernel", kernel, KERNELS)
    _check_choice("estimator", estimator, ESTIMATORS)
    _check_choice("form", form, ("auto", "gram", "feature"))
    X, Y = as_float64_matrix(X, "X"), as_float64_matrix(Y, "Y")
    n = X.shape[0]
    if Y.shape[0] != n:
        raise ValueError(f"X and Y must have the same number of rows (examples, aligned); got {n} and {Y.shape[0]}")
    if estimator == "unbiased" and n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs at least 4 examples; got n={n} "
                         "(use more rows/classes or estimator='biased')")
    if n < 2:
        raise ValueError(f"CKA needs at least 2 examples; got n={n}")
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    _check_not_constant(Xc, X, "X")
    _check_not_constant(Yc, Y, "Y")
    if kernel == "linear" and (form == "feature" or (form == "auto" and n > max(X.shape[1], Y.shape[1]))):
        kl, kk, ll = _linear_feature_terms(Xc, Yc, estimator)
    else:
        Kc = center_gram(gram(Xc, kernel, sigma), estimator)
        Lc = center_gram(gram(Yc, kernel, sigma), estimator)
        z = hsic_norm(n, estimator)
        kl, kk, ll = float((Kc * Lc).sum()) / z, float((Kc * Kc).sum()) / z, float((Lc * Lc).sum()) / z
    z = hsic_norm(n, estimator)
    tr_k = float((Xc * Xc).sum()) if kernel == "linear" else float(n)
    tr_l = float((Yc * Yc).sum()) if kernel == "linear" else float(n)
    return float(_cka_from_terms(kl, kk, ll, estimator, n, tr_k ** 2 / z, tr_l ** 2 / z))


class MinibatchCKA:
    """Streaming CKA grid between L1 layers of one source and L2 layers of another (Nguyen et al. 2021).

    Per batch of m aligned examples: each layer's centered Gram is formed once ((L1 + L2) Grams,
    O(m^2 d) each), flattened into matrices A (L1, m^2), B (L2, m^2), and a single product A B' gives
    all L1 x L2 HSICs. Memory O((L1 + L2) m^2). The result is
      CKA_ij = mean_b HSIC(K_i^b, L_j^b) / sqrt(mean_b HSIC(K_i^b, K_i^b) * mean_b HSIC(L_j^b, L_j^b)),
    which with the unbiased estimator converges to the full-data CKA as batches accumulate.
    One batch of all N examples is the exact full-data grid. dtype: Grams in float64 (default) or
    float32 (about 1.7x faster, ~1e-6 error); the HSIC sums are accumulated in float64 either way.
    """

    def __init__(self, kernel: str = "linear", estimator: str = "unbiased", sigma: float | None = None,
                 x_names: Sequence[str] | None = None, y_names: Sequence[str] | None = None,
                 dtype: torch.dtype = torch.float64):
        _check_choice("kernel", kernel, KERNELS)
        _check_choice("estimator", estimator, ESTIMATORS)
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"MinibatchCKA dtype must be torch.float64 or torch.float32; got {dtype}")
        self.kernel, self.estimator, self.sigma, self.dtype = kernel, estimator, sigma, dtype
        self.x_names, self.y_names = x_names, y_names
        self.cross: torch.Tensor | None = None
        self.self_x: torch.Tensor | None = None
        self.self_y: torch.Tensor | None = None
        self.n_batches = 0
        self.n_examples = 0
        self._buffers: dict[str, np.ndarray] = {}  # per side, the (L, m, m) centered Grams of the last batch

    def _centered(self, acts: Sequence[Any], side: str) -> np.ndarray:
        """(L, m*m) centered Grams, written into one preallocated array (no per-layer copies or scans).

        Linear, unbiased, float64: the Gram of the raw features is U-centered (which removes column
        means exactly); features are centered first only where their mean dominates (`_mean_dominates`),
        since cancellation would then cost digits. Otherwise features are centered first (O(m d), far
        below the O(m^2 d) Gram; HSIC does not change): the linear Gram Xc Xc' is then already H K H
        (biased) and the RBF distances lose no digits. Non-finite inputs are caught once per batch in
        `update`, on the HSICs.
        """
        mats = []
        for i, a in enumerate(acts):
            M = torch.as_tensor(a).detach().to("cpu", self.dtype)
            M = M.reshape(M.shape[0], -1) if M.ndim >= 2 else M.reshape(0, 0)
            if M.numel() == 0 or (mats and M.shape[0] != mats[0].shape[0]):
                raise ValueError(f"{side}[{i}] must be (m, ...) with the same m for all layers of a batch; "
                                 f"got shape {tuple(torch.as_tensor(a).shape)}")
            mats.append(M)
        m = mats[0].shape[0] if mats else 0
        if self.estimator == "unbiased" and m < 4:
            raise ValueError(f"batch of {m} examples: the unbiased estimator needs >= 4 per batch "
                             "(use a larger batch or drop_last=True)")
        # numpy throughout the per-layer loop: `A @ A.T` goes to BLAS syrk (one triangle, half the flops
        # of torch.mm's general product), and staying in one BLAS thread pool avoids pools spinning
        # against each other on a few shared cores. The array is reused across batches: a fresh
        # (L, m, m) array per batch costs page faults on first touch.
        shape = (len(mats), m, m)
        out = self._buffers.get(side)
        if out is None or out.shape != shape:
            out = self._buffers[side] = np.empty(shape, dtype=mats[0].numpy().dtype)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf are reported in `update`
            for K, M in zip(out, mats):
                if self.kernel == "linear" and self.estimator == "unbiased" and self.dtype == torch.float64:
                    # U-centering removes the column means exactly, so the O(m d) centering pass is only
                    # needed where a large common mean would cost digits to cancellation
                    np.matmul(M.numpy(), M.numpy().T, out=K)
                    if _mean_dominates(K):
                        Mc = M.numpy() - M.numpy().mean(0)
                        np.matmul(Mc, Mc.T, out=K)
                    _u_center_(K)
                    continue
                Mc = M.numpy() - M.numpy().mean(0)
                if self.kernel == "linear":
                    np.matmul(Mc, Mc.T, out=K)
                    if self.estimator == "unbiased":
                        _u_center_(K)
                else:
                    G = gram(torch.from_numpy(Mc), "rbf", self.sigma)
                    if self.estimator == "unbiased":
                        _u_center_(G.numpy())  # G is a fresh array: center it in place
                    K[:] = G if self.estimator == "unbiased" else center_gram(G, "biased")
        return out.reshape(len(mats), m * m)

    def update(self, xs: Sequence[Any], ys: Sequence[Any] | None = None) -> None:
        """Add one batch: xs = L1 arrays (m, ...) and ys = L2 arrays (m, ...), rows aligned.

        ys=None compares the xs layers with themselves (each Gram formed once). Raises ValueError, before
        accumulating anything, when a layer's batch holds NaN/inf (its self-HSIC is then not finite).
        """
        A = self._centered(xs, "xs")
        B = A if ys is None else self._centered(ys, "ys")
        if A.shape[1] != B.shape[1]:
            raise ValueError(f"xs and ys batches must have the same number of rows; got "
                             f"{int(A.shape[1] ** 0.5)} and {int(B.shape[1] ** 0.5)}")
        m = int(round(A.shape[1] ** 0.5))
        z = hsic_norm(m, self.estimator)
        cross = torch.from_numpy((A @ B.T).astype(np.float64) / z)

        def self_hsic(M: np.ndarray) -> torch.Tensor:  # row dot products, BLAS, no (L, m^2) temporary
            return torch.from_numpy((M[:, None, :] @ M[:, :, None]).reshape(-1).astype(np.float64) / z)
        sx = self_hsic(A)
        sy = sx if ys is None else self_hsic(B)
        for side, s in (("xs", sx), ("ys", sy)):
            bad = (~torch.isfinite(s)).nonzero().flatten().tolist()
            if bad:
                names = self.x_names if side == "xs" else self.y_names
                label = [names[i] for i in bad] if names else bad
                raise ValueError(f"{side} layers {label} have non-finite values (NaN/inf) in this batch; "
                                 "check the activations (fp16 overflow?)")
        if self.cross is None:
            self.cross, self.self_x, self.self_y = cross, sx, sy.clone()
        else:
            if cross.shape != self.cross.shape:
                raise ValueError(f"layer counts changed between batches: {tuple(self.cross.shape)} -> "
                                 f"{tuple(cross.shape)}")
            self.cross += cross
            self.self_x += sx
            self.self_y += sy
        self.n_batches += 1
        self.n_examples += m

    def compute(self) -> np.ndarray:
        """The (L1, L2) CKA grid. Raises ValueError naming layers whose accumulated self-HSIC <= 0."""
        if self.cross is None:
            raise ValueError("MinibatchCKA.compute() called before any update()")
        for side, s, names in (("xs", self.self_x, self.x_names), ("ys", self.self_y, self.y_names)):
            bad = [i for i in range(len(s)) if not s[i] > 0]
            if bad:
                label = [names[i] for i in bad] if names else bad
                raise ValueError(f"{side} layers {label} have non-positive accumulated self-HSIC over "
                                 f"{self.n_batches} batches (constant or too few examples); CKA is undefined")
        return (self.cross / torch.sqrt(self.self_x[:, None] * self.self_y[None, :])).numpy()


# ----------------------------------------------------------------------------------------------
# Domain x domain CKA at every analysis point, with bootstrap CIs and a permutation baseline.

def _kernel_source(X: torch.Tensor, kernel: str) -> torch.Tensor:
    """What gets index-gathered for resampling: the linear Gram, or squared distances for RBF
    (so the median bandwidth is recomputed on each resample, as on the original sample)."""
    Xc = X - X.mean(0)
    return Xc @ Xc.T if kernel == "linear" else _sq_dists(Xc)


def _sorted_nonzero_pairs(D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-zero upper-triangle entries of distances D (n, n), ascending, with their (i, j)."""
    n = D.shape[-1]
    iu = torch.triu_indices(n, n, offset=1)
    v = D[iu[0], iu[1]]
    order = torch.argsort(v)
    keep = order[v[order] > 0]
    return v[keep], iu[0][keep], iu[1][keep]


def _weighted_median_nonzero(pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], W: torch.Tensor) -> torch.Tensor:
    """`median_nonzero` for B multisets of rows given as counts W (B, n), from `_sorted_nonzero_pairs`.

    A resample holding row i w_i times has w_i w_j copies of each pair (i, j), i != j; repeated rows
    give zero distances, which the median rule skips. Same linear interpolation as torch.nanquantile.
    Returns (B,), NaN where a resample has no non-zero distance. Cost O(B n^2).
    """
    v, i, j = pairs
    if not len(v):
        return torch.full((len(W),), float("nan"), dtype=W.dtype)
    c = (W[:, i] * W[:, j]).cumsum(-1)
    total = c[:, -1:]
    pos = (total - 1) * 0.5
    lo = pos.floor()
    a = torch.searchsorted(c, lo, right=True).clamp_max(len(v) - 1)
    b = torch.searchsorted(c, lo + 1, right=True).clamp_max(len(v) - 1)
    med = (v[a] + (pos - lo) * (v[b] - v[a]))[:, 0]
    return torch.where(total[:, 0] > 0, med, torch.full_like(med, float("nan")))


def _weighted_mv(M: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """M w for each count vector in W (B, n); M symmetric, (n, n) shared or (B, n, n) per resample."""
    return W @ M if M.dim() == 2 else torch.bmm(M, W[:, :, None])[..., 0]


def _weighted_hsic(K: torch.Tensor, L: torch.Tensor, W: torch.Tensor, estimator: str,
                   Kw: torch.Tensor, Lw: torch.Tensor) -> torch.Tensor:
    """HSIC of B resamples from count vectors W (B, n) over the rows of kernels K, L: each (n, n)
    shared by all resamples, or (B, n, n) one per resample; Kw, Lw = `_weighted_mv` of K, L. Returns (B,).

    A resample with row i taken w_i times (m = sum w rows) has, in terms of the source kernel,
      sum_{p != q} K_pq L_pq = w'(K o L)w - sum_i w_i K_ii L_ii,  row sums r_i = (Kw)_i - K_ii,
    so Song et al.'s unbiased HSIC (and the biased tr(KHLH), same with diagonals kept) needs only
    matrix-vector products with w: O(B n^2) instead of gathering B (m, m) matrices.
    """
    m = W.sum(-1)
    KLw = _weighted_mv(K * L, W)
    if estimator == "biased":
        t1, t3 = (W * KLw).sum(-1), (W * Kw * Lw).sum(-1)
        s_k, s_l = (W * Kw).sum(-1), (W * Lw).sum(-1)
        return (t1 - 2.0 / m * t3 + s_k * s_l / m ** 2) / (m - 1) ** 2
    dk, dl = K.diagonal(dim1=-2, dim2=-1), L.diagonal(dim1=-2, dim2=-1)
    rk, rl = Kw - dk, Lw - dl
    t1 = (W * KLw).sum(-1) - (W * dk * dl).sum(-1)
    s_k, s_l, t3 = (W * rk).sum(-1), (W * rl).sum(-1), (W * rk * rl).sum(-1)
    return (t1 + s_k * s_l / ((m - 1) * (m - 2)) - 2.0 / (m - 2) * t3) / (m * (m - 3))


def _weighted_cka(K: torch.Tensor, L: torch.Tensor, W: torch.Tensor, estimator: str) -> np.ndarray:
    """CKA of the B resamples W (B, n) of kernels K, L (shapes as in `_weighted_hsic`). Returns (B,)."""
    Kw, Lw = _weighted_mv(K, W), _weighted_mv(L, W)
    return _ratio(_weighted_hsic(K, L, W, estimator, Kw, Lw), _weighted_hsic(K, K, W, estimator, Kw, Kw),
                  _weighted_hsic(L, L, W, estimator, Lw, Lw))


def _ratio(kl: torch.Tensor, kk: torch.Tensor, ll: torch.Tensor) -> np.ndarray:
    """CKA from HSIC terms; NaN (counted and dropped by the caller) where a self-HSIC is not positive."""
    ok = (kk > 0) & (ll > 0)
    val = kl / torch.sqrt(torch.where(ok, kk * ll, torch.ones_like(kk)))
    return torch.where(ok, val, torch.full_like(val, float("nan"))).numpy()


def _chunk(n: int, budget: int = 1 << 22) -> int:
    """Resamples per chunk so that one (chunk, n, n) float64 tensor stays near 32 MB."""
    return max(1, budget // (n * n))


def _bootstrap_cka(Sx: torch.Tensor, Sy: torch.Tensor, W: torch.Tensor, kernel: str, estimator: str) -> np.ndarray:
    """CKA of B resamples with replacement, given as row counts W (B, n) over the sources of
    `_kernel_source`. RBF takes each resample's own median bandwidth, as the estimate does.
    Returns (B,); NaN for a resample that is too small, has no bandwidth or a non-positive self-HSIC."""
    too_small = (W.sum(-1) < (4 if estimator == "unbiased" else 2)).numpy()
    if kernel == "linear":
        vals = _weighted_cka(Sx, Sy, W, estimator)
    else:
        chunks, step = [], _chunk(Sx.shape[-1])
        px, py = _sorted_nonzero_pairs(Sx), _sorted_nonzero_pairs(Sy)
        for s in range(0, len(W), step):
            w = W[s:s + step]
            K = torch.exp(-Sx / (2 * _weighted_median_nonzero(px, w)[:, None, None]))
            L = torch.exp(-Sy / (2 * _weighted_median_nonzero(py, w)[:, None, None]))
            chunks.append(_weighted_cka(K, L, w, estimator))
        vals = np.concatenate(chunks) if chunks else np.zeros(0)
    return np.where(too_small, np.nan, vals)


def _permutation_cka(Sx: torch.Tensor, Sy: torch.Tensor, perms: torch.Tensor, kernel: str,
                     estimator: str) -> np.ndarray:
    """CKA of X against Y with Y's rows shuffled by each permutation in perms (P, n). Returns (P,).
    Self-HSICs and the RBF bandwidths do not change under a permutation, so only the cross term is
    recomputed: O(P n^2)."""
    K = _kernel_from_source(Sx, kernel)
    L = _kernel_from_source(Sy, kernel)
    ones = torch.ones(1, K.shape[-1], dtype=K.dtype)
    Kw, Lw = _weighted_mv(K, ones), _weighted_mv(L, ones)
    kk, ll = _weighted_hsic(K, K, ones, estimator, Kw, Kw), _weighted_hsic(L, L, ones, estimator, Lw, Lw)
    out = []
    step = _chunk(K.shape[-1])
    for s in range(0, len(perms), step):
        p = perms[s:s + step]
        w = ones.expand(len(p), -1)
        kl = _weighted_hsic(K, L[p[:, :, None], p[:, None, :]], w, estimator, Kw.expand(len(p), -1), Lw[0, p])
        out.append(_ratio(kl, kk.expand(len(p)), ll.expand(len(p))))
    return np.concatenate(out) if out else np.zeros(0)


def _kernel_from_source(S: torch.Tensor, kernel: str) -> torch.Tensor:
    return S if kernel == "linear" else rbf_from_sq_dists(S)


def pair_rows(class_idx: np.ndarray, domain_idx: np.ndarray, a: int, b: int,
              classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image pairing of domain a with domain b over `classes`.

    Rule: within each class, the j-th image of domain a (in dataset order) is paired with the j-th image
    of domain b; the longer list is truncated. In the emoji data each (class, domain) holds the renders
    of one codepoint in that domain's styles, in a fixed style order, so pairs share the class (and the
    instance slot), never the pixels. Returns (rows_a, rows_b, class_of_pair) as int64 arrays.
    """
    ra, rb, rc = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for k in classes:
        ia = np.flatnonzero((class_idx == k) & (domain_idx == a))
        ib = np.flatnonzero((class_idx == k) & (domain_idx == b))
        m = min(len(ia), len(ib))
        ra.append(ia[:m])
        rb.append(ib[:m])
        rc.append(np.full(m, k, dtype=np.int64))
    return np.concatenate(ra), np.concatenate(rb), np.concatenate(rc)


def _centroid_table(F: torch.Tensor, class_idx: np.ndarray, domain_idx: np.ndarray, n_domains: int,
                    n_classes: int) -> torch.Tensor:
    """Class means per domain, (n_domains, n_classes, d); absent (domain, class) cells are 0 (never read)."""
    key = torch.from_numpy(domain_idx * n_classes + class_idx)
    sums = torch.zeros(n_domains * n_classes, F.shape[1], dtype=F.dtype).index_add_(0, key, F)
    counts = torch.bincount(key, minlength=n_domains * n_classes).clamp_min(1)
    return (sums / counts[:, None]).reshape(n_domains, n_classes, -1)


# Fewest rows (class centroids or paired images) a domain pair's CKA is computed from: the unbiased
# estimator is defined from 4, but below ~8 rows its value and bootstrap spread are noise (4 rows
# gave -1.00 with a 95 % CI of [-3.02, 2.46]).
MIN_ROWS = 8


def domain_cka(features: Mapping[str, Any], class_idx: Any, domain_idx: Any, domains: Sequence[str],
               class_subsets: Mapping[str, Sequence[int]], mode: str = "centroid",
               kernels: Sequence[str] = ("linear", "rbf"), estimator: str = "unbiased",
               n_boot: int = 200, n_perm: int = 100, ci: float = 0.95, seed: int = 0,
               pooling: str | None = None, progress: bool = False,
               class_list_domain: str | None = None, min_rows: int = MIN_ROWS) -> dict:
    """CKA between every pair of domains at every point, per class subset and kernel.

    features: point name -> (N, d) pooled activations of the same N images (see activations.py).
    class_idx, domain_idx: (N,) ints; domains: names indexed by domain_idx.
    class_subsets: e.g. {"all": [...], "C1": [...], "C2": [...]} of class indices.
    mode: "centroid" (docs/methods.md#cka: rows = class means per domain, matched by class) or "image"
    (rows = images paired by `pair_rows`). Classes missing from either domain are dropped and counted.
    Bootstrap: classes resampled with replacement n_boot times; CI = estimate +- z * bootstrap SE.
    Permutation baseline: n_perm shuffles of the second domain's rows (mean and 95th percentile).
    Cost per (point, pair, subset, kernel): O((1 + n_boot + n_perm) n^2) after O(n^2 d) Grams; with
    n = 459 class centroids about 0.2 s (linear) / 1 s (RBF) on 2 CPU cores. progress: a tqdm bar over points.
    class_list_domain: None (default: every pair uses the classes present in both its domains), or
    a domain whose class list restricts the "all" and "C1" subsets of EVERY pair — the paper code's
    quirk (a leftover loop variable: painting, docs/methods.md#paper-code-quirks); `paper_compat` passes
    "painting".
    Guard rails: a (subset, pair) with fewer than `min_rows` rows (or 2 classes) is not computed but
    listed in "skipped" with the reason; a point whose CI leaves CKA's range is kept unclipped and
    flagged in "unreliable" (None when fine) with the reason.
    Returns a JSON-able dict; results[subset][kernel][f"{a}|{b}"] has lists over points.
    """
    _check_choice("mode", mode, ("centroid", "image"))
    if min_rows < (4 if estimator == "unbiased" else 2):
        raise ValueError(f"min_rows={min_rows} is below what the {estimator} estimator is defined for "
                         f"({4 if estimator == 'unbiased' else 2})")
    _z(ci)  # validates ci before any work
    for k in kernels:
        _check_choice("kernel", k, KERNELS)
    class_idx, domain_idx = np.asarray(class_idx), np.asarray(domain_idx)
    points = list(features)
    if not points:
        raise ValueError("domain_cka: `features` is empty; pass {point_name: (N, d) activations}")
    F = {p: as_float64_matrix(features[p], p) for p in points}
    for p, M in F.items():
        if M.shape[0] != len(class_idx) or len(domain_idx) != len(class_idx):
            raise ValueError(f"features[{p!r}] has {M.shape[0]} rows but class_idx/domain_idx have "
                             f"{len(class_idx)}/{len(domain_idx)}; they must describe the same images")
    present = {d: set(np.unique(class_idx[domain_idx == d]).tolist()) for d in range(len(domains))}
    if class_list_domain is not None and class_list_domain not in domains:
        from clipmech.utils import unknown_name_error
        raise unknown_name_error("class_list_domain", class_list_domain, domains)
    pairs = [(a, b) for a in range(len(domains)) for b in range(a + 1, len(domains))]
    out: dict = {"mode": mode, "estimator": estimator, "pooling": pooling, "points": points,
                 "domains": list(domains), "kernels": list(kernels), "n_boot": n_boot, "n_perm": n_perm,
                 "ci": ci, "ci_method": "normal, bootstrap SE over classes", "seed": seed, "min_rows": min_rows,
                 "class_list_domain": class_list_domain, "results": {}, "skipped": []}
    plans = []  # one per (subset, domain pair): rows, resamples and result lists shared by all points
    for si, (subset, cls) in enumerate(class_subsets.items()):
        out["results"][subset] = {k: {} for k in kernels}
        listed = len(cls)
        if class_list_domain is not None and subset in ("all", "C1"):
            cls = [k for k in cls if k in present[list(domains).index(class_list_domain)]]
        for a, b in pairs:
            # one stream per (subset, pair): its resamples do not shift when another pair's rows change
            rng = np.random.default_rng([seed, si, a, b])
            shared = [k for k in cls if k in present[a] and k in present[b]]
            key = f"{domains[a]}|{domains[b]}"
            if mode == "centroid":
                rows_a = rows_b = None
                row_class = np.asarray(shared, dtype=np.int64)
            else:
                rows_a, rows_b, row_class = pair_rows(class_idx, domain_idx, a, b, shared)
            n = len(row_class)
            if n < min_rows or len(shared) < 2:
                out["skipped"].append({"subset": subset, "pair": key, "n_rows": n, "reason":
                                       f"only {n} rows from {len(shared)} shared classes (need >= {min_rows} rows "
                                       "and 2 classes); a CKA on fewer rows is noise"})
                continue
            # bootstrap over classes: each draw re-collects the rows of the drawn classes, kept as
            # row counts (B, n) that every point and kernel below reuses
            by_class = {k: np.flatnonzero(row_class == k) for k in shared}
            counts = torch.zeros(n_boot, n, dtype=torch.float64)
            for i in range(n_boot):
                rows = np.concatenate([by_class[k] for k in rng.choice(shared, size=len(shared))])
                counts[i] = torch.from_numpy(np.bincount(rows, minlength=n).astype(np.float64))
            perms = torch.from_numpy(np.stack([rng.permutation(n) for _ in range(n_perm)])) if n_perm \
                else torch.zeros(0, n, dtype=torch.long)
            res = {k: {"cka": [], "ci_low": [], "ci_high": [], "perm_mean": [], "perm_p95": [],
                       "n_rows": n, "n_classes": len(shared), "classes_missing": listed - len(shared),
                       "boot_failed": [], "error": []} for k in kernels}
            for kernel in kernels:
                out["results"][subset][kernel][key] = res[kernel]
            plans.append((a, b, torch.as_tensor(shared, dtype=torch.long), rows_a, rows_b, counts, perms, res))
    n_classes = int(class_idx.max()) + 1 if len(class_idx) else 0
    for p in tqdm(points, desc="CKA per point", unit="point", disable=not progress):
        table = _centroid_table(F[p], class_idx, domain_idx, len(domains), n_classes) if mode == "centroid" else None
        for a, b, shared, rows_a, rows_b, counts, perms, res in plans:
            if mode == "centroid":
                X, Y = table[a, shared], table[b, shared]
            else:
                X, Y = F[p][torch.from_numpy(rows_a)], F[p][torch.from_numpy(rows_b)]
            for kernel in kernels:
                _append_point(res[kernel], X, Y, kernel, estimator, counts, perms, ci)
    for *_, res in plans:
        for r in res.values():
            r["unreliable"] = [_range_flag(v, lo, hi, estimator) for v, lo, hi in zip(r["cka"], r["ci_low"], r["ci_high"])]
    return out


def _range_flag(value: float | None, low: float | None, high: float | None, estimator: str) -> str | None:
    """Why a CKA point cannot be trusted (its CI or value leaves CKA's range), else None. Unbiased
    CKA lies in [-1, 1] (it can be negative), biased CKA in [0, 1]; a normal bootstrap interval that
    leaves it means the resamples vary wildly: too few rows or classes for an interval."""
    lo_bound = -1.0 if estimator == "unbiased" else 0.0
    if value is None:
        return None
    outside = [f"{x:.2f}" for x in (value, low, high) if x is not None and not lo_bound - 1e-9 <= x <= 1 + 1e-9]
    if not outside:
        return None
    return (f"CI [{low:.2f}, {high:.2f}] leaves CKA's range [{lo_bound:g}, 1] ({', '.join(outside)}): the bootstrap "
            "varies too much for an interval; use more classes or rows" if low is not None and high is not None
            else f"value {value:.2f} leaves CKA's range [{lo_bound:g}, 1]")


def _append_point(res: dict, X: torch.Tensor, Y: torch.Tensor, kernel: str, estimator: str,
                  counts: torch.Tensor, perms: torch.Tensor, ci: float) -> None:
    """Append one point's CKA, bootstrap CI (resamples as row counts (B, n)) and permutation baseline
    (perms (P, n)) to `res` (None + error if undefined)."""
    try:
        value = cka(X, Y, kernel, estimator, form="gram")
    except ValueError as err:
        for f in ("cka", "ci_low", "ci_high", "perm_mean", "perm_p95"):
            res[f].append(None)
        res["boot_failed"].append(len(counts))
        res["error"].append(str(err))
        return
    Sx, Sy = _kernel_source(X, kernel), _kernel_source(Y, kernel)
    boot = _bootstrap_cka(Sx, Sy, counts, kernel, estimator)
    boot = boot[np.isfinite(boot)]
    # Normal interval from the bootstrap SE. Percentile intervals can exclude the estimate: drawing a
    # class twice adds identical off-diagonal pairs, which bias resampled (unbiased-HSIC) CKA upwards.
    half = float(_z(ci) * boot.std(ddof=1)) if len(boot) > 1 else None
    perm = _permutation_cka(Sx, Sy, perms, kernel, estimator)
    perm = perm[np.isfinite(perm)]
    res["cka"].append(value)
    res["ci_low"].append(value - half if half is not None else None)
    res["ci_high"].append(value + half if half is not None else None)
    res["perm_mean"].append(float(perm.mean()) if len(perm) else None)
    res["perm_p95"].append(float(np.percentile(perm, 95)) if len(perm) else None)
    res["boot_failed"].append(len(counts) - len(boot))
    res["error"].append(None)


def _z(ci: float) -> float:
    """Two-sided standard-normal quantile for confidence level `ci`."""
    from statistics import NormalDist  # stdlib: scipy.stats costs seconds to import
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1); got {ci}")
    return NormalDist().inv_cdf((1 + ci) / 2)
