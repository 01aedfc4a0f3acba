"""clipmech against the installed peer packages, each row on identical inputs in one run.

Every row runs clipmech and the peer side by side, interleaved, best of `--repeat` (the machine may be
shared: the best run is the least disturbed one; with one thread the clock is process CPU time, which
other processes on the same cores do not inflate), and prints both times, the ratio peer / clipmech
(> 1: clipmech is faster) and the max |difference| of the results. A row whose peer package is not
installed is skipped with a note (pip install -e '.[bench]' installs them all).

  cka-*      CKA grid, 21 x 21 layers with RN50's pooled widths (32..2048), unbiased HSIC, synthetic
             features sharing a latent (true CKA in [0, 1], so pytorch-cka's clamp does not bite):
             clipmech.MinibatchCKA vs pytorch-cka `cka_from_features` (full batch) / its `CKA` over
             a DataLoader (minibatch), and torch-cka 0.21's `CKA.compare` (float32 only: its HSIC
             builds float32 ones). RBF: pytorch-cka has no RBF kernel; its `hsic` gets RBF Grams built
             in plain torch (cdist, quantile median rule, exp), the same kernels as clipmech's.
  ig         integrated gradients of the true-class cosine logit at one RN50 hook point, 10 steps,
             right Riemann sum, baseline = the point's activation for an all-zero image (what captum's
             LayerIntegratedGradients does with zero input baselines): clipmech `integrated_gradients`
             vs captum `LayerIntegratedGradients` (same internal batch of path points).
  node-ig    the paper's node scores at all 22 RN50 analysis points (10 steps, zero baseline) for one
             (domain, class) batch: clipmech `ig_node_scores` vs the paper's stack, nnsight tracing
             open_clip's RN50 (clean trace, then per point one trace with the point's output replaced
             by the path batch). Few images on CPU; time per image is linear in images.
  cache-*    caching all analysis points during an image-tower forward: overhead over the plain
             open_clip forward, clipmech `run_with_cache` vs nnsight `trace` + `.save()`.
  train      training images/s, clipmech train vs open_clip_train.main (benchmarks/train_throughput.py).

    python benchmarks/peers.py [--quick] [--threads 1] [--repeat 3] [--rows cka ig node-ig cache train]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

RN50_WIDTHS = [32, 32, 64, 64, 256, 256, 256, 512, 512, 512, 512, 1024, 1024, 1024, 1024, 1024, 1024,
               2048, 2048, 2048, 1024]  # mean-pooled analysis points after the input


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCK["cpu"]


def race(repeat: int, **sides: Callable[[], object]) -> tuple[dict[str, float], dict[str, object]]:
    """Best time per side (`clock`) over `repeat` interleaved rounds, and each side's last result."""
    best = {k: float("inf") for k in sides}
    out = {}
    for _ in range(max(1, repeat)):
        for k, fn in sides.items():
            t = clock()
            out[k] = fn()
            best[k] = min(best[k], clock() - t)
    return best, out


def row(name: str, setting: str, t: dict[str, float], diff: float | None, note: str = "") -> dict:
    ours, peer = t["clipmech"], t["peer"]
    r = {"row": name, "setting": setting, "clipmech_s": ours, "peer_s": peer, "ratio": peer / ours,
         "max_diff": diff, "note": note}
    d = "n/a" if diff is None else f"{diff:.1e}"
    print(f"{name:<22} clipmech {ours:8.3f}s  peer {peer:8.3f}s  ratio {peer / ours:5.2f}x  "
          f"max|diff| {d:>8}  {setting}{'  (' + note + ')' if note else ''}", flush=True)
    return r


def skip(name: str, why: str) -> dict:
    print(f"{name:<22} SKIPPED: {why}", flush=True)
    return {"row": name, "skipped": why}


# ------------------------------------------------------------------------------------------- CKA
def latent_features(n: int, seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Per RN50 width, features = shared latent (n, 32) mixed in + isotropic noise, so CKA is in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(n, 32, generator=g, dtype=torch.float64)
    g.manual_seed(seed)
    feats = [Z @ torch.randn(32, d, generator=g, dtype=torch.float64)
             + 2 * torch.randn(n, d, generator=g, dtype=torch.float64) for d in RN50_WIDTHS]
    return [f.to(dtype) for f in feats]


def _ours_grid(xs, ys, kernel: str = "linear", dtype: torch.dtype = torch.float64, batch: int | None = None):
    from clipmech.analysis.cka import MinibatchCKA
    acc = MinibatchCKA(kernel, "unbiased", dtype=dtype)
    n = len(xs[0])
    for s in range(0, n, batch or n):
        acc.update([x[s:s + (batch or n)] for x in xs], [y[s:s + (batch or n)] for y in ys])
    return torch.from_numpy(acc.compute())


class _Replay(torch.nn.Module):
    """A 'model' whose layers emit cached features for the example indices it is fed (for peers that
    take models and DataLoaders): forward passes cost one row gather per layer."""

    def __init__(self, feats: list[torch.Tensor]):
        super().__init__()
        self.feats = feats
        self.layers = torch.nn.ModuleList(torch.nn.Identity() for _ in feats)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.long().flatten()
        for layer, f in zip(self.layers, self.feats):
            out = layer(f[idx])
        return out


def _loader(n: int, batch: int):
    from torch.utils.data import DataLoader, TensorDataset
    return DataLoader(TensorDataset(torch.arange(n, dtype=torch.float32)), batch_size=batch)


def cka_rows(a) -> list[dict]:
    if not have("cka"):
        return [skip("cka", "pytorch-cka is not installed (pip install pytorch-cka)")]
    from cka import CKA as PytorchCKA, cka_from_features, hsic
    rows = []
    n = a.cka_n
    xs, ys = latent_features(n, 1, torch.float64), latent_features(n, 2, torch.float64)
    setting = f"N={n}, 21x21, widths 32..2048"
    t, r = race(a.repeat, clipmech=lambda: _ours_grid(xs, ys), peer=lambda: cka_from_features(xs, ys))
    ref = r["clipmech"]
    rows.append(row("cka-linear-f64", setting + ", float64, one batch", t, (r["clipmech"] - r["peer"]).abs().max().item(),
                    f"grid range {ref.min():.2f}..{ref.max():.2f}"))
    x32, y32 = [x.float() for x in xs], [y.float() for y in ys]
    t, r = race(a.repeat, clipmech=lambda: _ours_grid(x32, y32, dtype=torch.float32),
                peer=lambda: cka_from_features(x32, y32))
    err = lambda g: (g.double() - ref).abs().max().item()  # noqa: E731
    rows.append(row("cka-linear-f32", setting + ", float32, one batch", t, (r["clipmech"] - r["peer"].double()).abs().max().item(),
                    f"error vs float64: clipmech {err(r['clipmech']):.1e}, pytorch-cka {err(r['peer']):.1e}"))

    def rbf(X: torch.Tensor) -> torch.Tensor:
        """exp(-D / (2 median D)), median over the non-zero off-diagonal squared distances, in torch."""
        D = torch.cdist(X, X).square()
        off = D[~torch.eye(len(X), dtype=torch.bool)]
        return torch.exp(-D / (2 * torch.quantile(off[off > 0], 0.5)))

    def peer_rbf():
        gx, gy = torch.stack([rbf(x) for x in xs]), torch.stack([rbf(y) for y in ys])
        kl, kk, ll = hsic(gx, gy)
        return kl / torch.sqrt(kk[:, None] * ll[None, :])
    t, r = race(a.repeat, clipmech=lambda: _ours_grid(xs, ys, "rbf"), peer=peer_rbf)
    rows.append(row("cka-rbf-f64", setting + ", float64, one batch", t, (r["clipmech"] - r["peer"]).abs().max().item(),
                    "peer has no RBF: its hsic() on torch-built RBF Grams"))

    nb, batch = a.cka_n * a.cka_batches, a.cka_n
    xb, yb = latent_features(nb, 1, torch.float64), latent_features(nb, 2, torch.float64)
    names = [f"layers.{i}" for i in range(len(RN50_WIDTHS))]

    def peer_minibatch():
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # pytorch-cka allocates its accumulators in the default dtype
        try:
            with PytorchCKA(_Replay(xb), _Replay(yb), layers=names, model2_layers=names) as c:
                return c._compare(_loader(nb, batch), progress=False)
        finally:
            torch.set_default_dtype(default)
    t, r = race(a.repeat, clipmech=lambda: _ours_grid(xb, yb, batch=batch), peer=peer_minibatch)
    rows.append(row("cka-linear-minibatch", f"N={nb} in batches of {batch}, float64", t,
                    (r["clipmech"] - r["peer"]).abs().max().item(), "pytorch-cka CKA over a DataLoader"))

    if not have("torch_cka"):
        rows.append(skip("cka-torch-cka", "torch-cka is not installed (pip install torch-cka)"))
        return rows
    import warnings
    from torch_cka import CKA as TorchCKA
    n2 = a.torch_cka_n
    xt, yt = [x[:n2].float() for x in xb], [y[:n2].float() for y in yb]

    def torch_cka():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c = TorchCKA(_Replay(xt), _Replay(yt), "m1", "m2", model1_layers=names, model2_layers=names)
            import torch_cka.cka as tc
            tc.tqdm = lambda it, **kw: it  # silence its progress bar
            c.compare(_loader(n2, n2 // 2))
        return c.hsic_matrix
    t, r = race(1, clipmech=lambda: _ours_grid(xt, yt, dtype=torch.float32, batch=n2 // 2), peer=torch_cka)
    rows.append(row("cka-torch-cka-f32", f"N={n2} in 2 batches, float32, one run", t,
                    (r["clipmech"].double() - r["peer"].double()).abs().max().item(), "torch-cka 0.21 CKA.compare"))
    return rows


# --------------------------------------------------------------------------------- attribution
def rn50(image_size: int, n_images: int, seed: int = 0):
    """Random-init open_clip RN50 at `image_size` px, the HookedCLIP sharing its weights, images,
    labels and a random unit zero-shot head of 10 classes."""
    from clipmech.models import HookedCLIP, create_open_clip
    from clipmech.models.configs import resolve_config
    torch.manual_seed(seed)
    _, cfg = resolve_config("RN50")
    cfg = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "image_size": image_size}}
    model = HookedCLIP.from_config(cfg).eval()
    clip = model.to_open_clip().eval()
    images = torch.randn(n_images, 3, image_size, image_size)
    head = F.normalize(torch.randn(10, cfg["embed_dim"]), dim=-1)
    labels = torch.arange(n_images) % 10
    return model, clip, images, labels, head


def _true_logit(visual, head: torch.Tensor, labels: torch.Tensor):
    """Per-example true-class cosine logit of open_clip's image tower, for batches of k stacked copies."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        emb = F.normalize(visual(x), dim=-1)
        lab = labels.repeat(len(x) // len(labels))
        return (emb * head[lab]).sum(-1)
    return fn


def ig_row(a) -> list[dict]:
    if not have("captum"):
        return [skip("ig", "captum is not installed")]
    from captum.attr import LayerIntegratedGradients
    from clipmech.analysis.patching import cache_points, integrated_gradients, node_sum, true_class_logit
    model, clip, images, labels, head = rn50(a.image_size, a.images)
    point, steps, per_pass = "visual.layer3.0.hook_out", 10, 5
    zeros = torch.zeros_like(images)

    def ours():
        a0 = cache_points(model, zeros, [point])[point]
        return integrated_gradients(model, images, true_class_logit(head, labels, reduce="sum"), point, ablation=a0,
                                    steps=steps, rule="right", internal_batch_size=per_pass)

    def peer():
        lig = LayerIntegratedGradients(_true_logit(clip.visual, head, labels), clip.visual.layer3[0])
        att = lig.attribute(images, baselines=zeros, n_steps=steps, method="riemann_right",
                            internal_batch_size=per_pass * len(images))
        return node_sum(att, point).sum(0)
    t, r = race(a.repeat, clipmech=ours, peer=peer)
    scale = r["peer"].abs().max().item()
    return [row("ig", f"RN50 @ {a.image_size}px, {a.images} images, {point}, {steps} steps, {per_pass} steps/pass", t,
                (r["clipmech"] - r["peer"]).abs().max().item() / scale, "max|diff| relative to max|attribution|")]


def _nnsight_node_scores(net, images, labels, head, modules: list[tuple[str, object]], steps: int) -> list[torch.Tensor]:
    """The paper's node scores with nnsight: one clean trace, then per point one trace of the
    images repeated `steps` times with the point replaced by alpha * clean, alpha = 1, 0.9, ..., 0.1."""
    saved = []
    with net.trace(images):
        for name, mod in modules:
            saved.append((mod.input if name == "input" else mod.output).save())
        out = net.output.save()
    del out
    alphas = torch.tensor([1 - s / steps for s in range(steps)])
    rep = images.repeat(steps, 1, 1, 1)
    lab = labels.repeat(steps)
    scores = []
    for (name, mod), clean in zip(modules, saved):
        clean = clean.detach()
        path = (alphas.view(-1, *([1] * clean.ndim)) * clean[None]).flatten(0, 1).requires_grad_(True)
        with net.trace(rep):
            if name == "input":
                mod.input = path
            else:
                mod.output = path
            emb = net.output.save()
        logit = (F.normalize(emb, dim=-1) * head[lab]).sum()
        (g,) = torch.autograd.grad(logit, path)
        g = g.unflatten(0, (steps, len(images))).mean(0)
        contrib = g * (0 - clean)
        contrib = contrib.flatten(2).sum(-1) if contrib.ndim > 2 else contrib
        scores.append(contrib.mean(0).abs())
    return scores


def rn50_modules(visual, raw) -> list[tuple[str, object]]:
    """nnsight handles (of the NNsight-wrapped `visual`; `raw` = the open_clip module) of RN50's 22
    analysis points, in HookedCLIP's order."""
    mods = [("input", visual.conv1), ("act1", visual.act1), ("act2", visual.act2), ("act3", visual.act3),
            ("avgpool", visual.avgpool)]
    for li in range(1, 5):
        mods += [(f"layer{li}.{b}", getattr(visual, f"layer{li}")[b]) for b in range(len(getattr(raw, f"layer{li}")))]
    return mods + [("attnpool", visual.attnpool)]


def node_ig_row(a) -> list[dict]:
    if not have("nnsight"):
        return [skip("node-ig", "nnsight is not installed (pip install nnsight)")]
    from nnsight import NNsight
    from clipmech.analysis.circuits import ig_node_scores
    model, clip, images, labels, head = rn50(a.image_size, a.node_images)
    points = model.analysis_points()
    net = NNsight(clip.visual)
    mods = rn50_modules(net, clip.visual)
    assert len(mods) == len(points) == 22, (len(mods), len(points))
    t, r = race(1, clipmech=lambda: [ig_node_scores(model, images, labels, head, p, steps=10) for p in points],
                peer=lambda: _nnsight_node_scores(net, images, labels, head, mods, 10))
    diff = max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(r["clipmech"], r["peer"]))
    per = {k: v / len(images) for k, v in t.items()}
    return [row("node-ig-22-points", f"RN50 @ {a.image_size}px, {len(images)} images, 10 steps, one run", t, diff,
                f"relative diff; per image clipmech {per['clipmech']:.1f}s, nnsight {per['peer']:.1f}s -> "
                f"50 images ~{50 * per['clipmech'] / 60:.0f} vs ~{50 * per['peer'] / 60:.0f} min")]


# ---------------------------------------------------------------------------------------- caching
def cache_rows(a) -> list[dict]:
    if not have("nnsight"):
        return [skip("cache", "nnsight is not installed (pip install nnsight)")]
    from nnsight import NNsight
    from clipmech.models import HookedCLIP, create_open_clip
    rows = []
    for name in a.cache_models:
        torch.manual_seed(0)
        clip = create_open_clip(name).eval()
        model = HookedCLIP.from_open_clip(clip, model_name=name).eval()
        points = model.analysis_points()
        v = NNsight(clip.visual)
        if name.startswith("RN"):
            mods = rn50_modules(v, clip.visual)
        else:
            blocks = v.transformer.resblocks
            mods = [("embed", v.ln_pre)] + [(f"b{i}", blocks[i]) for i in range(len(clip.visual.transformer.resblocks))] \
                + [("pooled", v.ln_post)]
        assert len(mods) == len(points), (name, len(mods), len(points))
        images = torch.randn(a.cache_batch, 3, model.image_size, model.image_size)

        def peer():
            saved = []
            with v.trace(images):
                for n, m in mods:
                    saved.append((m.input if n == "input" else m.output).save())
            return saved

        with torch.no_grad():
            t, _ = race(a.repeat + 2, plain=lambda: clip.visual(images),
                        clipmech=lambda: model.run_with_cache(image=images, names_filter=points)[1],
                        peer=peer)
        over = {k: t[k] / t["plain"] - 1 for k in ("clipmech", "peer")}
        r = row(f"cache-{name}", f"batch {a.cache_batch}, {len(points)} points, plain forward {t['plain']:.3f}s", t, None,
                f"overhead over open_clip forward: clipmech {over['clipmech']:+.1%}, nnsight {over['peer']:+.1%}")
        r.update(overhead_clipmech=over["clipmech"], overhead_peer=over["peer"])
        rows.append(r)
    return rows


# ---------------------------------------------------------------------------------------- training
def train_row(a) -> list[dict]:
    missing = [m for m in ("open_clip_train", "braceexpand", "webdataset", "pandas") if not have(m)]
    if missing:
        return [skip("train", f"{', '.join(missing)} not installed (pip install -e '.[bench]')")]
    sys.path.insert(0, str(Path(__file__).parent))
    import train_throughput
    r = train_throughput.measure(["--rounds", str(a.train_rounds), "--steps", str(a.train_steps)])
    return [row("train", r["setting"], {"clipmech": 1 / r["clipmech"], "peer": 1 / r["open_clip_train"]}, None,
                f"seconds per image; clipmech {r['clipmech']:.0f} img/s, open_clip_train {r['open_clip_train']:.0f} img/s")]


ROWS = {"cka": cka_rows, "ig": ig_row, "node-ig": node_ig_row, "cache": cache_rows, "train": train_row}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats (about 4 minutes)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and BLAS threads for both sides (default 1: stable on shared cores)")
    p.add_argument("--repeat", type=int, default=None, help="interleaved rounds per row (best counts); default 3")
    p.add_argument("--clock", choices=list(CLOCK), default=None,
                   help="cpu: process CPU seconds (default with 1 thread: on shared cores it counts only the "
                        "work of this process, and equals wall time on an idle core); wall: elapsed seconds")
    a = p.parse_args(argv)
    global clock
    a.clock = a.clock or ("cpu" if a.threads == 1 else "wall")
    clock = CLOCK[a.clock]
    q = a.quick
    a.repeat = a.repeat or (2 if q else 3)
    a.cka_n, a.cka_batches, a.torch_cka_n = (256, 4, 128) if q else (512, 4, 256)
    a.image_size, a.images, a.node_images = (64, 2, 1) if q else (96, 2, 1)
    a.cache_models, a.cache_batch = (["RN50", "ViT-B-32"], 2 if q else 4)
    a.train_rounds, a.train_steps = (1, 6) if q else (1, 12)
    torch.set_num_threads(a.threads)
    from threadpoolctl import threadpool_limits
    threadpool_limits(a.threads)  # numpy's BLAS too, so neither side gets more cores
    print(f"clipmech vs peers, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{a.threads} thread(s), {a.clock} clock, best of {a.repeat} interleaved rounds; "
          "ratio = peer time / clipmech time", flush=True)
    start = time.perf_counter()
    rows = []
    for key in a.rows:
        rows += ROWS[key](a)
    cpu = os.times()
    print(f"total {time.perf_counter() - start:.0f}s wall, "
          f"{cpu.user + cpu.system + cpu.children_user + cpu.children_system:.0f}s CPU (with subprocesses)")
    return rows


if __name__ == "__main__":
    main()
