"""Sparse autoencoders on activations of any hook point, trained from on-disk activation shards.

Own code rather than a library: SAELens pins TransformerLens < 4 (and the house rules exclude it),
dictionary_learning pins nnsight < 0.4, saev only handles open_clip ViTs. The model is ~40 lines.

Architecture (docs/methods.md#sae, Discover-then-Name lineage): x -> (x - b_pre) @ W_enc + b_enc -> ReLU
-> z (optionally only the top-k kept) -> z @ W_dec + b_pre, with unit-norm decoder rows and the
pre-encoder bias b_pre tied to the decoder bias. Loss (the paper's): squared error AVERAGED over the d
input features + l1 * |z|_1, both averaged over the batch (the L1 term is dropped in the top-k variant,
whose sparsity is fixed by k). Summing the error over features instead makes the same coefficient d
times weaker and the SAE dense (L0 91-122 of 256 on 64-d embeddings). Default l1 = 1e-4 * 1024 / d
(`paper_l1`): the paper's strength per input dimension at width d. Init: Kaiming-uniform encoder and
decoder (decoder rows then unit-normalised), b_pre = 0 (docs/methods.md#sae).

Input standardisation (our addition, on by default in `train_sae`): the SAE sees (x - mean) / scale,
mean and scale (root mean squared distance from the mean) from the training data, stored as buffers
and undone by `decode`. The paper's per-dimension penalty assumes its embeddings' spread; a small
model's L2-normalised embeddings can nearly collapse onto their mean (measured on a quickstart
natural-only tiny-rn: total variance 0.04), and there the paper's L1 gave FVU 0.40 with 61 % dead
latents; standardised, FVU 0.05 at L0 14. FVU is unchanged by this affine map.

Data larger than memory: `ShardWriter` writes (m, d) float tensors as numbered shard files;
`ActivationShards` streams them (one shard in memory at a time, shard order and rows shuffled per
epoch, seeded).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from clipmech.utils import PathLike, atomic_torch_save, atomic_write_json


class ShardWriter:
    """Append activation rows (m, d) and write them as `shard_00000.pt`, ... of `shard_size` rows."""

    def __init__(self, root: PathLike, shard_size: int = 65536):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        if (self.root / "meta.json").exists():
            raise FileExistsError(f"{self.root} already holds an activation shard set; choose a new folder")
        self.shard_size, self._buf, self._rows, self._shards, self._dim = shard_size, [], 0, [], None

    def add(self, x: torch.Tensor) -> None:
        """Add rows x (m, d) (any float dtype; stored as float32)."""
        x = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float32)
        if self._dim is None:
            self._dim = x.shape[1]
        elif x.shape[1] != self._dim:
            raise ValueError(f"activation width changed from {self._dim} to {x.shape[1]} within one shard set")
        self._buf.append(x)
        self._rows += x.shape[0]
        while self._rows >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, m: int) -> None:
        allrows = torch.cat(self._buf)
        name = f"shard_{len(self._shards):05d}.pt"
        atomic_torch_save(allrows[:m].clone(), self.root / name)
        self._shards.append({"file": name, "rows": m})
        self._buf, self._rows = [allrows[m:]], allrows.shape[0] - m

    def close(self) -> "ActivationShards":
        """Write the remainder and `meta.json`; returns the reader."""
        if self._rows:
            self._flush(self._rows)
        if not self._shards:
            raise ValueError("ShardWriter.close(): no activations were added")
        atomic_write_json({"dim": self._dim, "rows": sum(s["rows"] for s in self._shards),
                           "shards": self._shards}, self.root / "meta.json")
        return ActivationShards(self.root)


class ActivationShards:
    """Reader for a folder written by `ShardWriter`. len() = total rows, .dim = width."""

    def __init__(self, root: PathLike):
        self.root = Path(root)
        meta = self.root / "meta.json"
        if not meta.exists():
            raise FileNotFoundError(f"no activation shards at {self.root} (missing meta.json); write them with ShardWriter")
        info = json.loads(meta.read_text())
        self.dim, self.rows, self.shards = int(info["dim"]), int(info["rows"]), info["shards"]

    def __len__(self) -> int:
        return self.rows

    def iter_batches(self, batch_size: int, shuffle: bool = True, seed: int = 0) -> Iterator[torch.Tensor]:
        """Yield (<= batch_size, dim) float32 batches; memory = one shard. Seeded shuffling."""
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.shards), generator=g).tolist() if shuffle else range(len(self.shards))
        for i in order:
            x = torch.load(self.root / self.shards[i]["file"], map_location="cpu", weights_only=True)
            if shuffle:
                x = x[torch.randperm(x.shape[0], generator=g)]
            yield from x.split(batch_size)


PAPER_L1, PAPER_WIDTH = 1e-4, 1024


def paper_l1(d_in: int) -> float:
    """The L1 coefficient giving the paper's penalty per input dimension at width d_in: 1e-4 * 1024 / d_in
    (1e-4 at the paper's 1024-d embeddings, 1.6e-3 at 64-d)."""
    if d_in < 1:
        raise ValueError(f"SAE input width must be positive, got {d_in}")
    return PAPER_L1 * PAPER_WIDTH / d_in


@dataclass
class SAEConfig:
    d_in: int
    n_latents: int
    k: int | None = None          # top-k variant when set
    l1_coef: float | None = None  # None: paper_l1(d_in); ignored when k is set

    def __post_init__(self):
        if self.l1_coef is None:
            self.l1_coef = paper_l1(self.d_in)


class SparseAutoencoder(nn.Module):
    """SAE with tied pre-encoder bias, ReLU (or top-k ReLU) encoder and unit-norm decoder rows."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if cfg.k is not None and not 0 < cfg.k <= cfg.n_latents:
            raise ValueError(f"top-k needs 0 < k <= n_latents={cfg.n_latents}; got k={cfg.k}")
        self.cfg = cfg
        self.b_pre = nn.Parameter(torch.zeros(cfg.d_in))
        # [n_latents, d_in] so that Kaiming's fan-in is d_in; stored transposed for x @ W_enc.
        self.W_enc = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(cfg.n_latents, cfg.d_in)).T.contiguous())
        W = nn.init.kaiming_uniform_(torch.empty(cfg.n_latents, cfg.d_in))
        self.W_dec = nn.Parameter(W / W.norm(dim=1, keepdim=True))
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.register_buffer("x_mean", torch.zeros(cfg.d_in))
        self.register_buffer("x_scale", torch.ones(()))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent codes (B, n_latents) >= 0 for inputs x (B, d_in)."""
        z = torch.relu(((x - self.x_mean) / self.x_scale - self.b_pre) @ self.W_enc + self.b_enc)
        if self.cfg.k is not None:
            top = z.topk(self.cfg.k, dim=-1)
            z = torch.zeros_like(z).scatter(-1, top.indices, top.values)
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.W_dec + self.b_pre) * self.x_scale + self.x_mean

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """mean_b [ mean_i (x_hat - x)_bi^2 + l1 * sum_j |z_bj| ] (the L1 term only without top-k), the
        error measured on the standardised scale (divided by x_scale)."""
        x_hat, z = self(x)
        recon = (((x_hat - x) / self.x_scale) ** 2).mean()
        l1 = z.abs().sum(-1).mean()
        total = recon if self.cfg.k is not None else recon + self.cfg.l1_coef * l1
        return total, {"recon": float(recon.detach()), "l1": float(l1.detach()), "l0": float((z > 0).float().sum(-1).mean())}

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def save(self, path: PathLike, extra: dict | None = None) -> None:
        atomic_torch_save({"config": asdict(self.cfg), "state_dict": self.state_dict(), "extra": extra or {}}, path)

    @classmethod
    def load(cls, path: PathLike) -> "SparseAutoencoder":
        blob = torch.load(path, map_location="cpu", weights_only=False)
        sae = cls(SAEConfig(**blob["config"]))
        missing, unexpected = sae.load_state_dict(blob["state_dict"], strict=False)
        if unexpected or set(missing) - {"x_mean", "x_scale"}:  # files from before standardisation lack only those
            raise ValueError(f"{path} does not hold this SAE's parameters (missing {missing}, unexpected {unexpected})")
        return sae


def _as_source(data: ActivationShards | torch.Tensor):
    if isinstance(data, ActivationShards):
        return data.dim, data.iter_batches
    if not isinstance(data, torch.Tensor) or data.ndim != 2:
        raise ValueError("SAE data must be an ActivationShards folder reader or a (N, d) tensor")

    def it(batch_size: int, shuffle: bool = True, seed: int = 0) -> Iterator[torch.Tensor]:
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(data))
        yield from (data[i].float() for i in idx.split(batch_size))
    return data.shape[1], it


def train_sae(data: ActivationShards | torch.Tensor, n_latents: int, k: int | None = None, l1_coef: float | None = None,
              lr: float = 1e-3, epochs: int = 10, batch_size: int = 1024, seed: int = 0,
              device: str = "cpu", standardize: bool = True, steps: int | None = None
              ) -> tuple[SparseAutoencoder, list[dict]]:
    """Train an SAE with Adam on streamed activations; returns (sae, per-epoch history).

    `steps`: the budget in Adam steps instead of `epochs` (a unit that carries from thousands of
    vectors to millions): passes over the data repeat, each reshuffled, and training stops after
    exactly `steps` steps (the history's last row may cover a partial pass). With N vectors,
    `steps` = epochs * ceil(N / batch_size) trains exactly as `epochs` does.
    l1_coef None = paper_l1(d) (recorded in the SAE's config and in every history row). b_pre starts
    at zero (docs/methods.md#sae) and is learned. Decoder rows are renormalised after every step. `standardize`:
    inputs centred and scaled by the data's mean and RMS distance from it (see module doc; one extra pass).
    Cost: steps * batch_size (or epochs * N) * d * n_latents * ~6 flops.
    """
    if steps is not None and steps < 1:
        raise ValueError(f"SAE steps must be >= 1, got {steps}")
    d, batches = _as_source(data)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        sae = SparseAutoencoder(SAEConfig(d, n_latents, k, l1_coef)).to(device)
    if standardize:
        _fit_standardization(sae, batches(batch_size, False))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    history, done, epoch = [], 0, 0
    while (epoch < epochs) if steps is None else (done < steps):
        sums, count = {"recon": 0.0, "l1": 0.0, "l0": 0.0}, 0
        for x in batches(batch_size, True, seed + epoch):
            if steps is not None and done == steps:
                break
            done += 1
            loss, parts = sae.loss(x.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sae.normalize_decoder()
            for key in sums:
                sums[key] += parts[key] * len(x)
            count += len(x)
        if count == 0:
            raise ValueError("SAE data is empty: no vectors to train on")
        history.append({"epoch": epoch, "l1_coef": sae.cfg.l1_coef, **{key: v / count for key, v in sums.items()}})
        epoch += 1
    return sae.cpu(), history


@torch.no_grad()
def _fit_standardization(sae: SparseAutoencoder, batches: Iterator[torch.Tensor]) -> None:
    """Set sae.x_mean / x_scale to the data's mean and sqrt(mean squared distance from it) (one pass, float64)."""
    n, sx, sxx = 0, 0.0, 0.0
    for x in batches:
        x = x.double()
        n, sx, sxx = n + len(x), sx + x.sum(0), sxx + float((x * x).sum())
    mean = sx / n
    var = sxx / n - float((mean * mean).sum())
    if not var > 0:
        raise ValueError("SAE training data has zero variance (constant activations); nothing to encode")
    sae.x_mean.copy_(mean.float())
    sae.x_scale.fill_(var ** 0.5)


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, data: ActivationShards | torch.Tensor, batch_size: int = 4096) -> dict:
    """Streamed metrics: fvu (fraction of variance unexplained, sum|x - x_hat|^2 / sum|x - mean|^2),
    mse, mean L0, dead latents (never active on `data`) and their fraction."""
    _, batches = _as_source(data)
    n, sx, sxx, sres, l0 = 0, 0.0, 0.0, 0.0, 0.0
    fired = torch.zeros(sae.cfg.n_latents, dtype=torch.bool)
    for x in batches(batch_size, False):
        x = x.double()
        x_hat, z = sae(x.float())
        n += len(x)
        sx = sx + x.sum(0)
        sxx += float((x * x).sum())
        sres += float(((x - x_hat.double()) ** 2).sum())
        l0 += float((z > 0).sum())
        fired |= (z > 0).any(0)
    total_var = sxx - float((sx * sx).sum()) / n
    if not total_var > 0:
        raise ValueError("SAE evaluation data has zero variance (constant activations); FVU is undefined")
    dead = int((~fired).sum())
    metrics = {"n": n, "fvu": sres / total_var, "mse": sres / n, "l0": l0 / n, "dead_latents": dead,
               "dead_fraction": dead / sae.cfg.n_latents}
    metrics["flags"] = sae_health(metrics)
    for flag in metrics["flags"]:
        warnings.warn(flag, SAEQualityWarning, stacklevel=2)
    return metrics


# An SAE with more dead latents than this share (never active on the evaluation data) wastes most of
# its dictionary; its features are flagged rather than trusted.
MAX_DEAD_FRACTION = 0.5


class SAEQualityWarning(UserWarning):
    """An SAE reconstructs worse than the mean (FVU > 1) or has too many dead latents."""


def sae_health(metrics: dict, max_dead: float = MAX_DEAD_FRACTION) -> list[str]:
    """Reasons not to trust an SAE, from `evaluate_sae` metrics: FVU > 1 (worse than predicting the
    mean) or a dead fraction above `max_dead`. Empty when healthy."""
    flags = []
    if metrics["fvu"] > 1:
        flags.append(f"SAE FVU {metrics['fvu']:.3f} > 1: it reconstructs worse than the data mean; train longer, "
                     "lower the L1 coefficient or check the activations")
    if metrics["dead_fraction"] > max_dead:
        flags.append(f"SAE has {metrics['dead_fraction']:.0%} dead latents (> {max_dead:.0%}): most features never "
                     "fire; train longer, lower the L1 coefficient or use fewer latents")
    return flags
