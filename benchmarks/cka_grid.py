"""Full L x L minibatch CKA grid between two models: clipmech's MinibatchCKA vs the torch-cka approach.

Both run on the same cached, per-batch column-centred activations (forward passes are excluded from
the timing, they are identical for both) in float64 with the unbiased HSIC, and must give the same grid.
  ours:      per batch, each layer's centered Gram once ((L1 + L2) Grams), then one matrix product.
  torch-cka: per batch, for every layer i of model 1 its Gram, then for every layer j of model 2 the
             Gram again (L1 * L2 Grams) and three unbiased HSICs via n x n matrix products, each
             synchronised with .item() (AntixK/PyTorch-Model-Compare, re-implemented here from its
             description; the package is not a dependency).

    python benchmarks/cka_grid.py [--model RN50] [--image-size 64] [--n 256] [--batch 64] [--pool none] [--repeat 3]
"""
from __future__ import annotations

import argparse
import time

import torch

from clipmech.analysis.activations import pool
from clipmech.analysis.cka import MinibatchCKA
from clipmech.models import HookedCLIP


def activations(seed: int, model_name: str, images: torch.Tensor, batch: int, how: str) -> tuple[list[str], list[list[torch.Tensor]]]:
    """Per batch, the list of pooled float64 activations at every analysis point but the input."""
    torch.manual_seed(seed)
    model = HookedCLIP.from_config(model_name).eval()
    points = [p for p in model.analysis_points() if p != "visual.hook_input"]
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            _, cache = model.run_with_cache(image=images[s:s + batch], names_filter=points, stop_at=points[-1])
            acts = [pool(cache[p], how).double() for p in points]
            # Column-centred per batch (CKA is unchanged): on raw post-ReLU features of a random-init
            # net, nearly constant across images, torch-cka's uncentred Grams lose ~4 digits to
            # cancellation even in float64, which would hide whether the two agree.
            out.append([a - a.mean(0) for a in acts])
    return points, out


def ours(xb: list[list[torch.Tensor]], yb: list[list[torch.Tensor]]) -> torch.Tensor:
    acc = MinibatchCKA("linear", "unbiased")
    for xs, ys in zip(xb, yb):
        acc.update(xs, ys)
    return torch.from_numpy(acc.compute())


def _hsic_torchcka(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC on Grams with zeroed diagonals, via n x n products (torch-cka's formula)."""
    n = K.shape[0]
    ones = torch.ones(n, 1, dtype=K.dtype)
    res = torch.trace(K @ L)
    res = res + ((ones.T @ K @ ones @ ones.T @ L @ ones) / ((n - 1) * (n - 2))).squeeze()
    res = res - ((ones.T @ K @ L @ ones) * 2 / (n - 2)).squeeze()
    return res / (n * (n - 3))


def torch_cka_style(xb: list[list[torch.Tensor]], yb: list[list[torch.Tensor]]) -> torch.Tensor:
    L1, L2 = len(xb[0]), len(yb[0])
    hsic = torch.zeros(L1, L2, 3, dtype=torch.float64)
    for xs, ys in zip(xb, yb):
        for i, x in enumerate(xs):
            X = x.flatten(1)
            K = X @ X.T
            K.fill_diagonal_(0.0)
            hsic[i, :, 0] += _hsic_torchcka(K, K).item()
            for j, y in enumerate(ys):
                Y = y.flatten(1)
                L = Y @ Y.T
                L.fill_diagonal_(0.0)
                hsic[i, j, 1] += _hsic_torchcka(K, L).item()
                hsic[i, j, 2] += _hsic_torchcka(L, L).item()
    return hsic[:, :, 1] / (hsic[:, :, 0].sqrt() * hsic[:, :, 2].sqrt())


def _fastest(repeat: int, fn, *args) -> tuple[float, torch.Tensor]:
    """Best wall time of `repeat` runs (ours takes well under a second, so one run is noisy) and the result."""
    best = float("inf")
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="RN50")
    ap.add_argument("--image-size", type=int, default=64, help="input side (random images)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pool", default="none", choices=("none", "mean"), help="torch-cka flattens (none)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per side; the fastest counts")
    a = ap.parse_args()
    name = a.model
    if a.image_size:
        from clipmech.models.configs import resolve_config
        _, cfg = resolve_config(a.model)
        cfg = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "image_size": a.image_size}}
        name = cfg
    g = torch.Generator().manual_seed(0)
    images = torch.randn(a.n, 3, a.image_size, a.image_size, generator=g)
    points, xb = activations(0, name, images, a.batch, a.pool)
    _, yb = activations(1, name, images, a.batch, a.pool)
    dims = [x.shape[1] for x in xb[0]]
    print(f"{a.model} @ {a.image_size}px, {len(points)} x {len(points)} grid, N={a.n}, batch={a.batch}, "
          f"pool={a.pool}, widths {min(dims)}..{max(dims)}, threads={torch.get_num_threads()}")
    t_ours, g_ours = _fastest(a.repeat, ours, xb, yb)
    t_ref, g_ref = _fastest(a.repeat, torch_cka_style, xb, yb)
    diff = (g_ours - g_ref).abs().max().item()
    print(f"best of {a.repeat}: ours {t_ours:.2f}s   torch-cka approach {t_ref:.2f}s   ratio {t_ref / t_ours:.1f}x   "
          f"max |diff| {diff:.2e}")
    if diff > 1e-8:
        raise SystemExit(f"grids disagree (max |diff| {diff:.2e})")


if __name__ == "__main__":
    main()
