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
from clipmech.models.configs import create_open_clip, resolve_config
from clipmech.train.config import config_difference, load_config, save_config
from clipmech.train.data import MixtureView, ResumableBatchSampler
from clipmech.train.supervised import SupervisedClassifier, supervised_step
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


def model_config(cfg: dict) -> tuple[str | None, dict]:
    """(name, open_clip model cfg) for the run config's [model] section (image_size applied)."""
    name, mcfg = resolve_config(cfg["model"]["name"])
    if cfg["model"]["image_size"] is not None:
        mcfg["vision_cfg"]["image_size"] = int(cfg["model"]["image_size"])
    return name, mcfg


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
                            seed=m["seed"], base=base)
    if m["in_sketch"] is None:
        if m["in_sketch_keep"] is not None:
            raise ValueError("[mixture] in_sketch_keep needs in_sketch = the ImageNet-Sketch root folder")
        return mixture
    from clipmech.data.imagenet_sketch import add_imagenet_sketch
    return add_imagenet_sketch(mixture, m["in_sketch"], keep=m["in_sketch_keep"],
                               word_match=m["in_sketch_word_match"], seed=m["seed"])


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


def train(config: dict | str | Path | None = None, *, overrides: dict | None = None, resume: bool = False,
          mixture=None) -> Path:
    """Train a CLIP as configured; returns the run directory.

    config: dict or TOML path (see clipmech.train.config.DEFAULTS); overrides: nested dict applied on
    top. resume: continue from run_dir/latest.pt (starts fresh if there is none). mixture: a
    clipmech.data Mixture to train on instead of the one the config names. Under torchrun every
    process calls this; rank 0 writes files. Cost: epochs * len(mixture) image+text forward/backward.
    """
    cfg = load_config(config, overrides)
    if cfg["train"]["out"] is None:
        raise ValueError("no run directory: set [train] out in the config or pass --out RUN_DIR")
    out = Path(cfg["train"]["out"])
    env = setup_distributed(cfg["train"]["device"])
    precision = resolve_precision(cfg["train"]["precision"], env.device)
    name, mcfg = model_config(cfg)
    t = cfg["train"]

    if mixture is None:
        mixture = build_mixture_from_config(cfg)
    view = MixtureView(mixture, mcfg["vision_cfg"]["image_size"], mcfg["text_cfg"].get("context_length", 77))
    if t["objective"] == "supervised" and view.base:
        raise ValueError("the supervised baseline needs class labels, which base TSV pairs lack; "
                         "unset [data] base for objective = 'supervised'")
    sampler = ResumableBatchSampler(len(view), t["batch_size"], t["seed"], env.world_size, env.rank,
                                    t["accum_freq"])

    if env.is_main:
        _prepare_run_dir(out, resume, cfg)
    _barrier(env)
    supervised = t["objective"] == "supervised"
    ckpt = _load_resume(out, name, mcfg, t["objective"]) if resume else None
    if resume and ckpt is None and env.is_main:
        print(f"clipmech train: no {out / 'latest.pt'} to resume from; starting a fresh run")

    torch.manual_seed(t["seed"])
    num_classes = len(mixture.dataset.classes) if supervised else None
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
    schedule = make_schedule(cfg, optimizer, warmup, sampler.steps_per_epoch, total_steps)

    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        saved = ckpt["config"]["train"]
        saved_batch = saved["batch_size"] * ckpt["world_size"] * saved["accum_freq"]
        if saved_batch != sampler.global_batch and env.is_main:
            print(f"clipmech train: resuming with a global batch of {sampler.global_batch} instead of "
                  f"{saved_batch}; the rest of the run will not repeat the interrupted run's data order")
    run_model = model
    if env.world_size > 1:
        run_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=env.rank,
                       world_size=env.world_size)
    autocast = autocast_for(precision, env.device)

    def epoch_payload(epoch: int) -> dict:
        payload = {"epoch": epoch, "name": name or "custom", "state_dict": model.state_dict(), "model_cfg": mcfg}
        if supervised:
            payload.update(objective="supervised", num_classes=num_classes)
        return payload

    def save_latest() -> None:
        payload = epoch_payload(step // sampler.steps_per_epoch)
        payload.update(step=step, optimizer=optimizer.state_dict(),
                       scaler=scaler.state_dict() if scaler is not None else None,
                       schedule={"kind": cfg["schedule"]["kind"], "lr": cfg["optim"]["lr"], "warmup": warmup,
                                 "total_steps": total_steps},
                       rng=rng_state(), config=cfg, world_size=env.world_size, objective=t["objective"])
        atomic_torch_save(payload, out / "latest.pt")

    log_path = out / "log.csv"
    writer = None
    if env.is_main:
        (out / "done").unlink(missing_ok=True)  # a resumed run is unfinished until it ends
        save_config(cfg, out / "config.toml")
        if ckpt is None:
            atomic_torch_save(epoch_payload(0), out / "epoch_0.pt")
            log_path.unlink(missing_ok=True)
        else:
            _truncate_log(log_path, step)
        if t["tensorboard"]:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out / "tb"), purge_step=step if ckpt is not None else None)
    if ckpt is not None:
        set_rng_state(ckpt["rng"])

    loader_kwargs = dict(batch_sampler=sampler, num_workers=cfg["data"]["workers"])
    if cfg["data"]["workers"] > 0:
        loader_kwargs.update(persistent_workers=False, pin_memory=env.device.type == "cuda")
    loader = DataLoader(view, **loader_kwargs)
    images_per_step = sampler.global_batch
    labels = torch.as_tensor(mixture.dataset.class_idx[np.asarray(mixture.indices)]) if supervised else None
    unreadable: set[str] = set()  # files skipped since this process started (counted per resume)
    try:
        from tqdm.auto import tqdm
        for epoch in range(step // sampler.steps_per_epoch, t["epochs"]):
            sampler.set_epoch(epoch, step - epoch * sampler.steps_per_epoch)
            run_model.train()
            bar = tqdm(total=sampler.steps_per_epoch, initial=sampler.start_step,
                       desc=f"epoch {epoch + 1}/{t['epochs']}",
                       disable=not (t["progress"] and env.is_main), dynamic_ncols=True)
            micro: list = []
            tick = time.perf_counter()
            for images, texts, pos, bad in loader:
                unreadable.update(b for b in bad if b)
                if len(unreadable) > cfg["data"]["max_unreadable"] * len(view) and env.is_main:
                    report_unreadable(unreadable, len(view), out / "unreadable.txt", cfg["data"]["max_unreadable"],
                                      "training images")
                target = torch.as_tensor(labels[pos]) if supervised else texts
                micro.append((images.to(env.device, non_blocking=True), target.to(env.device, non_blocking=True)))
                if len(micro) < t["accum_freq"]:
                    continue
                lr = schedule(step)
                optimizer.zero_grad(set_to_none=True)
                try:
                    if supervised:
                        loss = supervised_step(run_model, micro, autocast, scaler, _check_finite)
                    else:
                        loss = contrastive_step(run_model, loss_fn, micro, autocast, scaler)
                except NonFiniteLossError as err:
                    last = out / "latest.pt" if (out / "latest.pt").exists() else out / "epoch_0.pt"
                    raise NonFiniteLossError(
                        f"{err} at epoch {epoch + 1}, step {step + 1} (lr {lr:.3g}); stopped without saving. "
                        f"Last good checkpoint: {last}. Lower --lr, lengthen the warmup or use precision "
                        "'fp32'.") from None
                micro = []
                if env.world_size > 1:  # log the global loss: the mean of the ranks' local-row losses
                    loss_t = torch.tensor([loss], device=env.device)
                    dist.all_reduce(loss_t)
                    loss = loss_t.item() / env.world_size
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if not supervised:
                    with torch.no_grad():  # open_clip_train clamps the temperature at 100
                        model.logit_scale.clamp_(0, math.log(100))
                step += 1
                now = time.perf_counter()
                ips = images_per_step / max(now - tick, 1e-9)
                tick = now
                if env.is_main:
                    row = {"epoch": epoch + 1, "step": step, "loss": loss, "lr": lr,
                           "logit_scale": 0.0 if supervised else model.logit_scale.exp().item(),
                           "images_per_s": ips}
                    _append_log(log_path, row)
                    if writer is not None:
                        for key in ("loss", "lr", "logit_scale", "images_per_s"):
                            writer.add_scalar(f"train/{key}", row[key], step)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
                bar.update(1)
                end_of_epoch = step % sampler.steps_per_epoch == 0
                keep = t["save_epochs"] is None or epoch + 1 in t["save_epochs"] or epoch + 1 == t["epochs"]
                if env.is_main and end_of_epoch and keep:
                    atomic_torch_save(epoch_payload(epoch + 1), out / f"epoch_{epoch + 1}.pt")
                if env.is_main and (end_of_epoch or step % t["save_every"] == 0):
                    save_latest()
            bar.close()
        _barrier(env)
        if env.is_main:
            summary = report_unreadable(unreadable, len(view), out / "unreadable.txt", cfg["data"]["max_unreadable"],
                                        "training images")
            if summary:
                print(f"clipmech train: {summary}")
            atomic_write_text(json.dumps({"epochs": t["epochs"], "steps": step, "unreadable": len(unreadable)}) + "\n",
                              out / "done")
    finally:
        if writer is not None:
            writer.close()
    if env.is_main and cfg["eval"]["after_train"]:
        from clipmech.eval.zeroshot import evaluate_run
        evaluate_run(out)
    return out


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
