"""Train a Vision Transformer (vit.py) on CIFAR or an image folder (data.py), and evaluate it.

    python train.py --epochs 10 --batch-size 32                    # CIFAR-10, the small CPU model
    python train.py --dataset folder --data-dir data/cifar10-jpeg  # any train/ + test/ image tree
    python train.py --eval-only --ckpt model.pt                    # loss and accuracy of a checkpoint
    torchrun --nproc_per_node=4 train.py ...                       # several GPUs (or CPU processes)

The loop is the paper's recipe for training from scratch (Sec. 4.1 and Appendix B.1) scaled down to
CIFAR: AdamW, linear warmup then cosine decay of the learning rate, updated every step; label
smoothing; gradient clipping at global norm 1. Each epoch writes `model.pt` (everything needed to
rebuild the model or to continue training) and appends one JSON line to `model.metrics.jsonl`.

Letters in shape comments: B batch, C channels, H/W image size, K classes.
"""

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data as datasets
from data import DataError
from vit import MODELS, ViT, ViTConfig, build_model, num_params


def get_parser():
    p = argparse.ArgumentParser(
        description="Train a Vision Transformer from scratch, or evaluate a checkpoint.",
        epilog="Example: python train.py --dataset folder --data-dir data/cifar10-jpeg --epochs 10 "
               "--batch-size 32")
    a = p.add_argument
    # data
    a("--dataset", default=None, help="cifar10, cifar100, folder or fake (default: cifar10, or the "
      "checkpoint's with --eval-only/--resume)")
    a("--data-dir", default=None, help="where the data is, or is downloaded to (default: ./data, or "
      "the checkpoint's)")
    a("--val-split", type=float, default=0.0, help="fraction of the training set held out to "
      "evaluate on each epoch, so the test set is only reported, never tuned on (default: 0, evaluate "
      "on the test set)")
    a("--workers", type=int, default=None, help="data loader processes (default: 0 on CPU, where "
      "the model needs both cores; 4 on a GPU)")
    a("--crop-padding", type=int, default=4, help="random crop of the image padded by this many "
      "pixels; 0 turns it off (default: 4)")
    a("--no-flip", action="store_true", help="turn off random horizontal flips")
    # model
    a("--model", default="cifar_tiny", help=f"named shape: {', '.join(MODELS)} (default: cifar_tiny)")
    a("--image-size", type=int, help="input size in pixels (default: the model's, 32 for CIFAR shapes)")
    a("--patch-size", type=int, help="patch size P (default: the model's)")
    a("--dim", type=int, help="width D (default: the model's)")
    a("--depth", type=int, help="number of blocks (default: the model's)")
    a("--heads", type=int, help="attention heads; must divide --dim (default: the model's)")
    a("--mlp-ratio", type=float, help="MLP width as a multiple of D (default: the model's)")
    a("--pool", choices=["cls", "mean"], help="classify the class token (paper) or the mean token")
    a("--dropout", type=float, help="dropout rate (default: 0)")
    a("--drop-path", type=float, help="stochastic depth rate of the last block (default: 0)")
    # optimisation
    a("--epochs", type=int, default=10, help="passes over the training set (default: 10)")
    a("--batch-size", type=int, default=128, help="images per step, over all processes (default: 128)")
    a("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 * sqrt(batch/256): "
      "Adam's step size scales roughly with the square root of the batch size)")
    a("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine (default: 1e-5)")
    a("--warmup-epochs", type=float, default=1.0, help="epochs of linear warmup (default: 1)")
    a("--weight-decay", type=float, default=0.05, help="AdamW weight decay on matrices; norms, "
      "biases and embeddings get none (default: 0.05)")
    a("--label-smoothing", type=float, default=0.1, help="weight moved from the true class to the "
      "others in the loss target (default: 0.1)")
    a("--grad-clip", type=float, default=1.0, help="clip the gradients' global norm to this; 0 turns "
      "it off (default: 1)")
    # system
    a("--device", default="auto", help="cuda, mps, cpu or e.g. cuda:1 (default: auto, the first of "
      "cuda, mps, cpu that is there)")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
      help="auto: bf16 autocast on GPUs that support it, fp16 with loss scaling on older ones, fp32 "
      "on CPU and MPS")
    a("--compile", action="store_true", help="torch.compile the model (faster steps after a minute "
      "of compiling)")
    a("--seed", type=int, default=0, help="random seed (default: 0)")
    a("--out", default="model.pt", help="checkpoint written every epoch (default: model.pt); the "
      "metrics log goes next to it as <name>.metrics.jsonl")
    a("--resume", metavar="CKPT", help="continue the run saved in this checkpoint")
    a("--eval-only", action="store_true", help="evaluate --ckpt on the test set and exit")
    a("--ckpt", help="checkpoint to evaluate with --eval-only")
    return p


# --------------------------------------------------------------------------------------------------
# Checkpoints: one dict of plain data and tensors, so torch.load(weights_only=True) can read it
# without running any code from the file.


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit; printed as one sentence."""


def save_checkpoint(ckpt, path):
    # Write to a temporary file, then rename: a rename is atomic, so a crash or a full disk while
    # saving leaves the previous checkpoint intact instead of half a new one.
    tmp = f"{path}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist (train one with python train.py)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint; it may be truncated "
                              f"or not a checkpoint at all ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project: it holds no 'config' and "
                              f"'model' entries (a bare state_dict from elsewhere goes through "
                              f"vit.from_torchvision or load_weights)")
    return ckpt


def load_weights(model, state_dict, source="checkpoint"):
    """Load a state dict strictly, after removing the wrappers' prefixes; name any mismatch."""
    clean = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):   # DistributedDataParallel, torch.compile
            k = k[len(prefix):] if k.startswith(prefix) else k
        clean[k] = v
    own = model.state_dict()
    missing = [k for k in own if k not in clean]
    unexpected = [k for k in clean if k not in own]
    wrong = [f"{k} {tuple(clean[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in clean and clean[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{name}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected),
                                    ("wrong shape (file vs model)", wrong)) if keys]
        raise CheckpointError(f"the weights in the {source} do not fit the model; " + "; ".join(parts))
    model.load_state_dict(clean)


def model_from_checkpoint(ckpt):
    """Rebuild the trained ViT from a checkpoint dict alone."""
    try:
        cfg = ViTConfig(**ckpt["config"])
    except TypeError as e:
        raise CheckpointError(f"the checkpoint's config does not fit this vit.py ({e})") from None
    model = ViT(cfg)
    load_weights(model, ckpt["model"])
    return model


# --------------------------------------------------------------------------------------------------
# Devices, processes, precision


def setup_distributed():
    """(rank, world_size, local_rank). torchrun sets these variables; a plain `python` run has none."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world, local = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    return rank, world, local


def pick_device(name, local_rank=0):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name; use cuda, cuda:N, mps or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} GPUs")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps asked for, but MPS (Apple GPU) is not available here; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def pick_precision(name, device):
    """The autocast dtype, or None for plain float32."""
    if name == "auto":
        if device.type != "cuda":
            # CPU: bf16 is slower than fp32 on most laptop CPUs (no bf16 matrix units); MPS: autocast
            # support is recent and uneven across macOS versions, so fp32 is the safe default there.
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def lr_at(step, total_steps, warmup_steps, lr, min_lr):
    """The learning rate at a step: linear warmup, then a cosine from lr down to min_lr.

    1) Warmup: Adam's second-moment estimates are noise in the first steps, and a full-size step on
       them can push a Transformer's attention into a bad, saturated state it never leaves.
    2) Cosine: large steps early to move far, small steps late to settle into a minimum.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model, lr, weight_decay, device):
    """AdamW with weight decay on weight matrices only.

    Decay pulls a weight towards 0. That regularises matrices, but a LayerNorm gain pulled to 0 or a
    position embedding shrunk towards 0 only loses information, so vectors (norms, biases) and the
    embeddings (class token, positions) are left alone, as in the paper's code and DeiT.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in ("pos_embed", "cls_token") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates all parameters in a few launches instead of several per tensor.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused)


# --------------------------------------------------------------------------------------------------
# Progress on one line


class Progress:
    """Rewrites one terminal line with the epoch's progress; in a log file, writes a line now and then."""

    def __init__(self, total, prefix, enabled=True):
        self.total, self.prefix, self.enabled = total, prefix, enabled
        self.tty = sys.stdout.isatty()
        self.start = self.last = time.time()

    def update(self, done, text_fn):
        now = time.time()
        if not self.enabled or done == self.total or now - self.last < (0.5 if self.tty else 60):
            return
        self.last = now
        eta = (now - self.start) / done * (self.total - done)
        line = f"{self.prefix} [{done:>{len(str(self.total))}}/{self.total}] {text_fn()} eta {eta:4.0f}s"
        print(("\r" + line + "\033[K") if self.tty else line, end="" if self.tty else "\n", flush=True)

    def close(self):
        if self.enabled and self.tty:
            print("\r\033[K", end="", flush=True)


# --------------------------------------------------------------------------------------------------
# One epoch of training, and evaluation


def train_one_epoch(model, loader, optimizer, scaler, step, sched, ctx):
    """Train for one pass over `loader`; returns (step, mean loss, accuracy, images)."""
    model.train()
    device = ctx["device"]
    loss_sum = torch.zeros((), device=device)     # summed on the device: a .item() per step would make
    correct = torch.zeros((), device=device)      # the CPU wait for the GPU after every step
    seen = 0
    progress = Progress(len(loader), ctx["prefix"], ctx["rank"] == 0)
    for i, (images, labels) in enumerate(loader):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, **sched)
        images = images.to(device, non_blocking=True)                     # (B, C, H, W) uint8
        labels = labels.to(device, non_blocking=True)                     # (B,)
        x = datasets.normalize(images, ctx["mean"], ctx["std"], ctx["image_size"])   # (B, C, H, W) float
        with ctx["autocast"]():
            logits = model(x)                                             # (B, K)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=ctx["label_smoothing"])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if ctx["grad_clip"] > 0:
            scaler.unscale_(optimizer)            # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), ctx["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        step += 1
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        progress.update(i + 1, lambda: f"loss {loss_sum.item() / seen:.3f} acc "
                                       f"{100 * correct.item() / seen:5.1f}% "
                                       f"{seen * ctx['world'] / (time.time() - progress.start):5.0f} img/s")
    progress.close()
    totals = reduce_sum(torch.stack([loss_sum, correct, torch.tensor(float(seen), device=device)]))
    return step, (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item(), int(totals[2].item())


@torch.no_grad()
def evaluate(model, split, ctx, batch_size=500):
    """(mean loss, accuracy) on a whole Split; each process takes every world-th batch."""
    model.eval()
    device = ctx["device"]
    sums = torch.zeros(3, device=device)       # loss sum, correct, count
    starts = range(ctx["rank"] * batch_size, len(split), ctx["world"] * batch_size)
    for s in starts:
        images = split.images[s:s + batch_size].to(device, non_blocking=True)
        labels = split.labels[s:s + batch_size].to(device, non_blocking=True)
        x = datasets.normalize(images, ctx["mean"], ctx["std"], ctx["image_size"])
        with ctx["autocast"]():
            logits = model(x)                                              # (B, K)
        # Plain cross-entropy, without label smoothing: the number people compare across papers.
        sums[0] += F.cross_entropy(logits.float(), labels, reduction="sum")
        sums[1] += (logits.argmax(1) == labels).sum()
        sums[2] += len(labels)
    sums = reduce_sum(sums)
    return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()


def reduce_sum(t):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# --------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, DataError, CheckpointError) as e:
        # Mistakes the user can fix end with one sentence, not a traceback. Bad flags are usage
        # errors (exit 2); a problem found while running (data, checkpoints) exits 1.
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run(args):
    if args.eval_only:
        return run_eval_only(args)
    rank, world, local_rank = setup_distributed()
    device = pick_device(args.device, local_rank)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)

    resume = load_checkpoint(args.resume) if args.resume else None
    saved = resume["args"] if resume else {}
    dataset = args.dataset or saved.get("dataset", "cifar10")
    data_dir = args.data_dir or saved.get("data_dir", "./data")

    # The model: a named shape, any field overridden by a flag; on --resume, the checkpoint's.
    if resume:
        cfg = ViTConfig(**resume["config"])
    else:
        overrides = dict(image_size=args.image_size, patch_size=args.patch_size, dim=args.dim,
                         depth=args.depth, heads=args.heads, mlp_ratio=args.mlp_ratio, pool=args.pool,
                         dropout=args.dropout, drop_path=args.drop_path)
        cfg = build_model_config(args.model, overrides)
    if args.batch_size <= 0 or args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be positive and divisible by the "
                         f"{world} processes (it is the global batch)")
    if args.epochs <= 0:
        raise ValueError(f"--epochs must be positive, got {args.epochs}")
    check_writable(args.out)

    torch.manual_seed(args.seed)
    data = datasets.load_data(dataset, data_dir, cfg.image_size, args.val_split, args.seed)
    if cfg.num_classes != len(data.classes):
        if resume:
            raise CheckpointError(f"the checkpoint has {cfg.num_classes} classes but {dataset} has "
                                  f"{len(data.classes)}")
        cfg.num_classes = len(data.classes)
    model = ViT(cfg).to(device)
    if resume:
        load_weights(model, resume["model"])

    lr = args.lr if args.lr is not None else 1e-3 * math.sqrt(args.batch_size / 256)
    steps_per_epoch = len(data.train) // args.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"the training set has {len(data.train)} images, fewer than one batch of "
                        f"{args.batch_size}; lower --batch-size")
    sched = dict(total_steps=args.epochs * steps_per_epoch, lr=lr, min_lr=args.min_lr,
                 warmup_steps=round(args.warmup_epochs * steps_per_epoch))
    optimizer = make_optimizer(model, lr, args.weight_decay, device)
    amp_dtype = pick_precision(args.precision, device)
    # Loss scaling keeps small fp16 gradients from rounding to zero; bf16 has fp32's range, needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, step, history = 0, 0, []
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        start_epoch, step, history = resume["epoch"], resume["step"], resume["metrics"]
        torch.set_rng_state(resume["rng"]["cpu"])
        say(f"resuming {args.resume} after epoch {start_epoch}, step {step}")

    # torch.compile and DDP wrap the model; `model` itself stays unwrapped, and is what we save.
    train_model = torch.compile(model) if args.compile else model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)

    workers = args.workers if args.workers is not None else (0 if device.type == "cpu" else 4)
    transform = datasets.train_transform(cfg.image_size, args.crop_padding, not args.no_flip)
    train_set = datasets.ImageDataset(data.train, transform)
    # A DistributedSampler with one replica is a plain seeded shuffle, so one code path serves a single
    # process and torchrun alike; set_epoch() gives every epoch (and a resumed one) its own order.
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank,
                                                  shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size // world, sampler=sampler, drop_last=True,
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    eval_name, eval_split = ("val", data.val) if data.val is not None else ("test", data.test)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    ctx = dict(device=device, rank=rank, world=world, mean=data.mean, std=data.std,
               image_size=cfg.image_size, autocast=autocast, label_smoothing=args.label_smoothing,
               grad_clip=args.grad_clip, prefix="")

    say(f"model {args.model}: {num_params(model) / 1e6:.2f}M parameters, {asdict(cfg)}")
    say(f"data {dataset}: {len(data.train)} train, {len(data.val) if data.val else 0} val, "
        f"{len(data.test)} test images, {len(data.classes)} classes; evaluating on {eval_name}")
    say(f"device {device}, precision {amp_dtype or 'fp32'}, {world} process(es), global batch "
        f"{args.batch_size}, {steps_per_epoch} steps/epoch, peak lr {lr:.2e}, "
        f"{workers} loader workers{', compiled' if args.compile else ''}")

    metrics_path = os.path.splitext(args.out)[0] + ".metrics.jsonl"
    if is_main and not resume:
        open(metrics_path, "w").close()       # a new run starts a new log
    run_start = time.time() - (history[-1]["elapsed_s"] if history else 0.0)
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        ctx["prefix"] = f"epoch {epoch + 1}/{args.epochs}"
        t0 = time.time()
        step, train_loss, train_acc, n = train_one_epoch(train_model, loader, optimizer, scaler, step,
                                                         sched, ctx)
        train_time = time.time() - t0
        eval_loss, eval_acc = evaluate(train_model, eval_split, ctx)
        record = dict(epoch=epoch + 1, step=step, train_loss=round(train_loss, 4),
                      train_acc=round(train_acc, 4), eval_split=eval_name,
                      eval_loss=round(eval_loss, 4), eval_acc=round(eval_acc, 4),
                      lr=lr_at(step - 1, **sched), images_per_s=round(n / train_time, 1),
                      epoch_s=round(time.time() - t0, 1), elapsed_s=round(time.time() - run_start, 1))
        history.append(record)
        say(f"epoch {epoch + 1:>3}/{args.epochs}  train loss {train_loss:.3f} acc {100 * train_acc:5.2f}%  "
            f"{eval_name} loss {eval_loss:.3f} acc {100 * eval_acc:5.2f}%  lr {record['lr']:.2e}  "
            f"{record['images_per_s']:.0f} img/s  {format_time(record['elapsed_s'])}")
        if is_main:
            save_checkpoint(dict(
                config=asdict(cfg), model=model.state_dict(), optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict(), epoch=epoch + 1, step=step, metrics=history,
                rng=dict(cpu=torch.get_rng_state()),
                args=dict(vars(args), dataset=dataset, data_dir=data_dir, lr=lr),
                data=dict(dataset=dataset, classes=data.classes, mean=data.mean, std=data.std),
            ), args.out)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    if data.val is not None:   # the test set, reported once at the end, never looked at before
        test_loss, test_acc = evaluate(train_model, data.test, ctx)
        say(f"test loss {test_loss:.4f}  test accuracy {100 * test_acc:.2f}%")
    say(f"saved {args.out} and {metrics_path} ({format_time(time.time() - run_start)} in all)")
    return 0


def build_model_config(name, overrides):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return build_model(name, **overrides).cfg


def run_eval_only(args):
    if not args.ckpt:
        raise ValueError("--eval-only needs --ckpt PATH, the checkpoint to evaluate")
    ckpt = load_checkpoint(args.ckpt)
    device = pick_device(args.device)
    model = model_from_checkpoint(ckpt).to(device)
    cfg = model.cfg
    info = ckpt.get("data", {})
    dataset = args.dataset or info.get("dataset", "cifar10")
    data_dir = args.data_dir or ckpt.get("args", {}).get("data_dir", "./data")
    data = datasets.load_data(dataset, data_dir, cfg.image_size)
    if len(data.classes) != cfg.num_classes:
        raise CheckpointError(f"{args.ckpt} predicts {cfg.num_classes} classes but {dataset} has "
                              f"{len(data.classes)}")
    amp_dtype = pick_precision(args.precision, device)
    ctx = dict(device=device, rank=0, world=1, image_size=cfg.image_size,
               mean=info.get("mean", data.mean), std=info.get("std", data.std),
               autocast=(lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext)
    loss, acc = evaluate(model, data.test, ctx)
    print(f"{args.ckpt}: {num_params(model) / 1e6:.2f}M parameters, trained {ckpt.get('epoch', '?')} "
          f"epochs on {info.get('dataset', '?')}; evaluated on {len(data.test)} {dataset} test images")
    print(f"test loss {loss:.4f}  test accuracy {100 * acc:.2f}%")
    return 0


def check_writable(path):
    """Fail now, not after an hour of training, if the checkpoint can't be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--out {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"--out {path} can't be written (no permission); choose another --out")


def format_time(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


if __name__ == "__main__":
    sys.exit(main())
