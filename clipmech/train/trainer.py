"""Contrastive training of an open_clip CLIP on a clipmech mixture, single process or torchrun DDP.

Reused: open_clip's CLIP model and `ClipLoss(local_loss=True, gather_with_grad=True)`,
open_clip_train's warm-up + cosine schedule and parameter-group rule. Own code (why): open_clip_train
is an argparse program that reads CSV/webdataset files and resumes only at epoch boundaries; clipmech
trains on in-memory mixtures too, must resume bit-exactly mid-epoch, and needs a Python API.

Run directory: config.toml, epoch_0.pt (untrained) .. epoch_N.pt ({"epoch", "name", "state_dict",
"model_cfg"}), latest.pt (adds optimizer, scaler, schedule, RNG states, global step), log.csv, tb/,
and `done` written last (its absence means the run did not finish).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss
from open_clip_train.scheduler import assign_learning_rate, const_lr, cosine_lr
from torch.utils.data import DataLoader

from clipmech.data.dataset import report_unreadable
from clipmech.models.configs import create_open_clip, model_config
from clipmech.train.config import config_difference, load_config, save_config
from clipmech.train.data import MixtureView, ResumableBatchSampler
from clipmech.train.supervised import SupervisedClassifier, supervised_labels, supervised_step
from clipmech.utils import atomic_torch_save, atomic_write_text, read_checkpoint

LOG_FIELDS = ["epoch", "step", "loss", "lr", "logit_scale", "images_per_s"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the run stopped without saving the bad state."""


@dataclass
class DistEnv:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_pref: str = "auto") -> DistEnv:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on GPU, gloo on CPU)."""
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = 'cuda' requested but no CUDA device is available; use device = 'cpu'")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return DistEnv(rank, world, device)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip_train's AdamW groups: no decay on gains, biases, norms and logit_scale."""
    def exclude(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "amp_bf16" if torch.cuda.is_bf16_supported() else "amp_fp16"
    if precision != "fp32" and device.type != "cuda":
        raise ValueError(f"precision {precision!r} needs a GPU; use precision = 'fp32' on CPU")
    return precision


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def build_mixture_from_config(cfg: dict):
    """The training Mixture named by the [data] and [mixture] sections."""
    source = cfg["data"]["dataset"]
    looks_like_path = os.sep in str(source) or str(source).startswith(".")
    if looks_like_path and not Path(source).exists():
        raise FileNotFoundError(f"dataset root {source} does not exist; pass --dataset emoji or a DomainNet folder")
    from clipmech.data import load_dataset
    from clipmech.data.mixtures import build_mixture
    dataset = load_dataset(source, verify=cfg["data"]["verify"])
    m = cfg["mixture"]
    base = cfg["data"]["base"]
    if base is not None and not Path(base).is_file():
        raise FileNotFoundError(f"base TSV {base} does not exist; set [data] base to an open_clip TSV "
                                "(filepath<TAB>title) or remove it")
    mixture = build_mixture(dataset, m["setup"], test_domain=m["test_domain"], test_classes=m["test_classes"],
                            allow_p=m["allow_p"], domains=m["domains"], aligned=m["aligned"], split="train",
                            seed=m["seed"], base=base, paper_compat=cfg["analysis"]["paper_compat"])
    if m["in_sketch"] is None:
        if m["in_sketch_keep"] is not None:
            raise ValueError("[mixture] in_sketch_keep needs in_sketch = the ImageNet-Sketch root folder")
        return mixture
    from clipmech.data.imagenet_sketch import add_imagenet_sketch
    return add_imagenet_sketch(mixture, m["in_sketch"], keep=m["in_sketch_keep"],
                               filter=m["in_sketch_filter"], seed=m["seed"])


def step_lr(optimizer, base_lr: float, warmup: int, steps_per_epoch: int, milestones: list[int], gamma: float):
    """Linear warm-up, then lr * gamma^(number of milestone epochs passed); open_clip_train's adjuster style."""
    def adjust(step: int) -> float:
        if step < warmup:
            lr = base_lr * (step + 1) / warmup
        else:
            lr = base_lr * gamma ** sum(step >= m * steps_per_epoch for m in milestones)
        assign_learning_rate(optimizer, lr)
        return lr
    return adjust


def make_schedule(cfg: dict, optimizer, warmup: int, steps_per_epoch: int, total_steps: int):
    """step -> lr adjuster (sets the optimizer's lr) for the [schedule] section."""
    s, lr = cfg["schedule"], cfg["optim"]["lr"]
    if s["kind"] == "step":
        return step_lr(optimizer, lr, warmup, steps_per_epoch, list(s["milestones"]), s["gamma"])
    return (cosine_lr if s["kind"] == "cosine" else const_lr)(optimizer, lr, warmup, total_steps)


def make_optimizer(cfg: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or Nesterov SGD) over `param_groups` as the [optim] section says."""
    o = cfg["optim"]
    groups = param_groups(model, o["weight_decay"])
    # fused kernels: one pass over all parameters instead of a Python loop (the 49k x width token
    # embedding of tiny models makes the optimizer step a large share of a CPU step)
    if o["name"] == "sgd":
        return torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"], nesterov=True, fused=True)
    return torch.optim.AdamW(groups, lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"], fused=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def contrastive_step(model, loss_fn: ClipLoss, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
                     autocast, scaler) -> float:
    """Forward + backward of one optimizer step; returns the loss (float).

    With several micro-batches (accum_freq > 1) the features of all of them are first computed
    without grad, then each micro-batch is recomputed with grad and substituted into the full set,
    so every micro-batch sees the whole accumulated batch as negatives (open_clip_train's scheme).
    logit_scale keeps its graph only in the last micro-batch: the loss depends on it once, not once
    per micro-batch, and the last backward is the one DDP synchronises.
    """
    def backward(loss: torch.Tensor) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    if len(micro_batches) == 1:
        images, texts = micro_batches[0]
        with autocast():
            img, txt, scale = model(images, texts)
            loss = loss_fn(img, txt, scale)
        _check_finite(loss)
        backward(loss)
        return loss.item()

    with torch.no_grad(), autocast():
        cached = [model(images, texts)[:2] for images, texts in micro_batches]
    last = len(micro_batches) - 1
    for j, (images, texts) in enumerate(micro_batches):
        sync = model.no_sync if (j < last and hasattr(model, "no_sync")) else contextlib.nullcontext
        with sync(), autocast():
            img, txt, scale = model(images, texts)
            if j < last:
                scale = scale.detach()
            all_img = torch.cat([c[0] for c in cached[:j]] + [img] + [c[0] for c in cached[j + 1:]])
            all_txt = torch.cat([c[1] for c in cached[:j]] + [txt] + [c[1] for c in cached[j + 1:]])
            loss = loss_fn(all_img, all_txt, scale)
        _check_finite(loss)
        backward(loss)
    return loss.item()


def _check_finite(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(f"loss is {loss.item()}")


def _prepare_run_dir(out: Path, resume: bool, cfg: dict) -> None:
    """Create `out` (or check it) and prove it is writable; refuse to overwrite a finished/started run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"run directory {out} is not writable ({err.strerror}); choose another --out") from err
    started = any(out.glob("epoch_*.pt")) or (out / "latest.pt").exists()
    if started and not resume:
        try:
            changed = config_difference(load_config(out / "config.toml"), cfg, {("train", "out")})
        except (ValueError, OSError):  # no readable config.toml: nothing to compare
            changed = []
        what = f" of another configuration ({'; '.join(changed)})" if changed else ""
        raise ValueError(f"run directory {out} already holds a run{what}; pass --resume to continue it "
                         "or choose another --out")


def _load_resume(out: Path, name: str | None, mcfg: dict, objective: str) -> dict | None:
    path = out / "latest.pt"
    if not path.exists():
        return None
    ckpt = read_checkpoint(path, trusted=True)  # our own file: it holds optimizer and RNG state
    if ckpt.get("objective", "clip") != objective:
        raise ValueError(f"cannot resume: {path} is a {ckpt.get('objective')!r} run but the config asks for "
                         f"objective {objective!r}")
    if ckpt["model_cfg"] != mcfg:
        raise ValueError(f"cannot resume: {path} was trained with model {ckpt.get('name')!r} "
                         f"({json.dumps(ckpt['model_cfg'], sort_keys=True)}), but the config asks for "
                         f"{name!r} ({json.dumps(mcfg, sort_keys=True)}); use the run's own config.toml "
                         "or a new --out")
    return ckpt


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (they will be recomputed)."""
    if not path.exists():
        return
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= step]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(buf.getvalue(), path)


@dataclass
class _Run:
    """Everything one training run holds while it runs; `step` counts optimizer steps so far."""
    cfg: dict
    out: Path
    env: DistEnv
    name: str | None
    mcfg: dict
    mixture: Any
    view: MixtureView
    sampler: ResumableBatchSampler
    model: torch.nn.Module
    run_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    schedule: Any
    warmup: int
    total_steps: int
    loss_fn: ClipLoss
    autocast: Any
    ckpt: dict | None
    labels: torch.Tensor | None = None  # supervised: class label per training sample (view order)
    num_classes: int | None = None  # supervised: width of the class head
    step: int = 0
    writer: Any = None

    @property
    def supervised(self) -> bool:
        return self.cfg["train"]["objective"] == "supervised"

    def epoch_payload(self, epoch: int) -> dict:
        payload = {"epoch": epoch, "name": self.name or "custom", "state_dict": self.model.state_dict(),
                   "model_cfg": self.mcfg}
        if self.supervised:
            payload.update(objective="supervised", num_classes=self.num_classes)
        return payload

    def save_latest(self) -> None:
        payload = self.epoch_payload(self.step // self.sampler.steps_per_epoch)
        payload.update(step=self.step, optimizer=self.optimizer.state_dict(),
                       scaler=self.scaler.state_dict() if self.scaler is not None else None,
                       schedule={"kind": self.cfg["schedule"]["kind"], "lr": self.cfg["optim"]["lr"],
                                 "warmup": self.warmup, "total_steps": self.total_steps},
                       rng=rng_state(), config=self.cfg, world_size=self.env.world_size,
                       objective=self.cfg["train"]["objective"])
        atomic_torch_save(payload, self.out / "latest.pt")


def train(config: dict | str | Path | None = None, *, overrides: dict | None = None, resume: bool = False,
          mixture=None) -> Path:
    """Train a CLIP as configured; returns the run directory.

    config: dict or TOML path (see clipmech.train.config.DEFAULTS); overrides: nested dict applied on
    top. resume: continue from run_dir/latest.pt (starts fresh if there is none). mixture: a
    clipmech.data Mixture to train on instead of the one the config names. Under torchrun every
    process calls this; rank 0 writes files. Cost: epochs * len(mixture) image+text forward/backward.
    Evaluation is the caller's (clipmech.eval.evaluate_run; `clipmech train` runs it when [eval]
    after_train is set).
    """
    cfg = load_config(config, overrides)
    if cfg["train"]["out"] is None:
        raise ValueError("no run directory: set [train] out in the config or pass --out RUN_DIR")
    run = _build_run(cfg, resume, mixture)
    try:
        _open_run_files(run)
        _train_epochs(run)
    finally:
        if run.writer is not None:
            run.writer.close()
    return run.out


def _build_run(cfg: dict, resume: bool, mixture) -> _Run:
    """Data, sampler, model, optimizer and schedule of a run, restored from latest.pt when resuming."""
    out = Path(cfg["train"]["out"])
    env = setup_distributed(cfg["train"]["device"])
    precision = resolve_precision(cfg["train"]["precision"], env.device)
    name, mcfg = model_config(cfg)
    t = cfg["train"]
    if mixture is None:
        mixture = build_mixture_from_config(cfg)
    view = MixtureView(mixture, mcfg["vision_cfg"]["image_size"], mcfg["text_cfg"].get("context_length", 77))
    sampler = ResumableBatchSampler(len(view), t["batch_size"], t["seed"], env.world_size, env.rank,
                                    t["accum_freq"])
    if env.is_main:
        _prepare_run_dir(out, resume, cfg)
    _barrier(env)
    ckpt = _load_resume(out, name, mcfg, t["objective"]) if resume else None
    if resume and ckpt is None and env.is_main:
        print(f"clipmech train: no {out / 'latest.pt'} to resume from; starting a fresh run")

    torch.manual_seed(t["seed"])
    supervised = t["objective"] == "supervised"
    labels, num_classes = supervised_labels(mixture) if supervised else (None, None)
    model = SupervisedClassifier(mcfg, num_classes) if supervised else create_open_clip(mcfg)
    if cfg["model"]["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    model.to(env.device)
    optimizer = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda") if precision == "amp_fp16" else None
    total_steps = sampler.steps_per_epoch * t["epochs"]
    warmup = min(cfg["schedule"]["warmup"], max(total_steps // 10, 1))
    if warmup < cfg["schedule"]["warmup"] and env.is_main:
        print(f"clipmech train: warmup {cfg['schedule']['warmup']} steps exceeds 10% of the {total_steps} "
              f"steps; using {warmup}")
    run = _Run(cfg=cfg, out=out, env=env, name=name, mcfg=mcfg, mixture=mixture, view=view, sampler=sampler,
               model=model, run_model=model, optimizer=optimizer, scaler=scaler,
               schedule=make_schedule(cfg, optimizer, warmup, sampler.steps_per_epoch, total_steps),
               warmup=warmup, total_steps=total_steps,
               loss_fn=ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=env.rank,
                                world_size=env.world_size),
               autocast=autocast_for(precision, env.device), ckpt=ckpt, labels=labels, num_classes=num_classes)
    if ckpt is not None:
        _restore(run)
    if env.world_size > 1:
        run.run_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return run


def _restore(run: _Run) -> None:
    """Load model, optimizer, scaler and step from the resume checkpoint (RNG state comes later)."""
    ckpt = run.ckpt
    run.model.load_state_dict(ckpt["state_dict"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.scaler is not None and ckpt.get("scaler") is not None:
        run.scaler.load_state_dict(ckpt["scaler"])
    run.step = ckpt["step"]
    saved = ckpt["config"]["train"]
    saved_batch = saved["batch_size"] * ckpt["world_size"] * saved["accum_freq"]
    if saved_batch != run.sampler.global_batch and run.env.is_main:
        print(f"clipmech train: resuming with a global batch of {run.sampler.global_batch} instead of "
              f"{saved_batch}; the rest of the run will not repeat the interrupted run's data order")


def _open_run_files(run: _Run) -> None:
    """Rank 0: config.toml, epoch_0.pt / truncated log, TensorBoard writer. Then restore RNG state."""
    if run.env.is_main:
        out = run.out
        (out / "done").unlink(missing_ok=True)  # a resumed run is unfinished until it ends
        save_config(run.cfg, out / "config.toml")
        if run.ckpt is None:
            atomic_torch_save(run.epoch_payload(0), out / "epoch_0.pt")
            (out / "log.csv").unlink(missing_ok=True)
        else:
            _truncate_log(out / "log.csv", run.step)
        if run.cfg["train"]["tensorboard"]:
            from torch.utils.tensorboard import SummaryWriter
            run.writer = SummaryWriter(str(out / "tb"), purge_step=run.step if run.ckpt is not None else None)
    if run.ckpt is not None:
        set_rng_state(run.ckpt["rng"])


def _train_epochs(run: _Run) -> None:
    """The epoch loop from the current step to the configured end; writes `done` last."""
    from tqdm.auto import tqdm

    t, sampler = run.cfg["train"], run.sampler
    loader_kwargs = dict(batch_sampler=sampler, num_workers=run.cfg["data"]["workers"])
    if run.cfg["data"]["workers"] > 0:
        loader_kwargs.update(persistent_workers=False, pin_memory=run.env.device.type == "cuda")
    loader = DataLoader(run.view, **loader_kwargs)
    unreadable: set[str] = set()  # files skipped since this process started (counted per resume)
    limit = run.cfg["data"]["max_unreadable"]
    for epoch in range(run.step // sampler.steps_per_epoch, t["epochs"]):
        sampler.set_epoch(epoch, run.step - epoch * sampler.steps_per_epoch)
        run.run_model.train()
        bar = tqdm(total=sampler.steps_per_epoch, initial=sampler.start_step, desc=f"epoch {epoch + 1}/{t['epochs']}",
                   disable=not (t["progress"] and run.env.is_main), dynamic_ncols=True)
        micro: list = []
        tick = time.perf_counter()
        for images, texts, pos, bad in loader:
            unreadable.update(b for b in bad if b)
            if len(unreadable) > limit * len(run.view) and run.env.is_main:
                report_unreadable(unreadable, len(run.view), run.out / "unreadable.txt", limit, "training images")
            target = torch.as_tensor(run.labels[pos]) if run.supervised else texts
            micro.append((images.to(run.env.device, non_blocking=True),
                          target.to(run.env.device, non_blocking=True)))
            if len(micro) < t["accum_freq"]:
                continue
            loss, lr = _optimizer_step(run, micro, epoch)
            micro = []
            now = time.perf_counter()
            ips = sampler.global_batch / max(now - tick, 1e-9)
            tick = now
            if run.env.is_main:
                _log_step(run, {"epoch": epoch + 1, "step": run.step, "loss": loss, "lr": lr,
                                "logit_scale": 0.0 if run.supervised else run.model.logit_scale.exp().item(),
                                "images_per_s": ips})
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
            bar.update(1)
            _save_checkpoints(run, epoch)
        bar.close()
    _barrier(run.env)
    if run.env.is_main:
        summary = report_unreadable(unreadable, len(run.view), run.out / "unreadable.txt", limit, "training images")
        if summary:
            print(f"clipmech train: {summary}")
        atomic_write_text(json.dumps({"epochs": t["epochs"], "steps": run.step, "unreadable": len(unreadable)}) + "\n",
                          run.out / "done")


def _optimizer_step(run: _Run, micro: list, epoch: int) -> tuple[float, float]:
    """One optimizer step over the accumulated micro-batches; returns (global loss, lr) and advances `step`."""
    lr = run.schedule(run.step)
    run.optimizer.zero_grad(set_to_none=True)
    try:
        if run.supervised:
            loss = supervised_step(run.run_model, micro, run.autocast, run.scaler, _check_finite)
        else:
            loss = contrastive_step(run.run_model, run.loss_fn, micro, run.autocast, run.scaler)
    except NonFiniteLossError as err:
        last = run.out / "latest.pt" if (run.out / "latest.pt").exists() else run.out / "epoch_0.pt"
        raise NonFiniteLossError(
            f"{err} at epoch {epoch + 1}, step {run.step + 1} (lr {lr:.3g}); stopped without saving. "
            f"Last good checkpoint: {last}. Lower --lr, lengthen the warmup or use precision "
            "'fp32'.") from None
    if run.env.world_size > 1:  # log the global loss: the mean of the ranks' local-row losses
        loss_t = torch.tensor([loss], device=run.env.device)
        dist.all_reduce(loss_t)
        loss = loss_t.item() / run.env.world_size
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    if not run.supervised:
        with torch.no_grad():  # open_clip_train clamps the temperature at 100
            run.model.logit_scale.clamp_(0, math.log(100))
    run.step += 1
    return loss, lr


def _log_step(run: _Run, row: dict[str, Any]) -> None:
    _append_log(run.out / "log.csv", row)
    if run.writer is not None:
        for key in ("loss", "lr", "logit_scale", "images_per_s"):
            run.writer.add_scalar(f"train/{key}", row[key], run.step)


def _save_checkpoints(run: _Run, epoch: int) -> None:
    """Rank 0, after a step: epoch_N.pt at a kept epoch's end; latest.pt at epoch ends and every save_every steps."""
    if not run.env.is_main:
        return
    t = run.cfg["train"]
    end_of_epoch = run.step % run.sampler.steps_per_epoch == 0
    keep = t["save_epochs"] is None or epoch + 1 in t["save_epochs"] or epoch + 1 == t["epochs"]
    if end_of_epoch and keep:
        atomic_torch_save(run.epoch_payload(epoch + 1), run.out / f"epoch_{epoch + 1}.pt")
    if end_of_epoch or run.step % t["save_every"] == 0:
        run.save_latest()


def _append_log(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()
