"""Train a Vision Transformer (vit.py) on CIFAR or an image folder (data.py), and evaluate it.

    python train.py --epochs 10 --batch-size 32                    # CIFAR-10, the small CPU model
    python train.py --dataset folder --data-dir data/cifar10-jpeg  # any train/ + test/ image tree
    python train.py --pretrained vit_b_16 --epochs 3               # fine-tune torchvision's weights
    python train.py --resume model.pt                              # continue a stopped run
    python train.py --eval-only --ckpt model.pt                    # loss and accuracy of a checkpoint
    torchrun --nproc_per_node=4 train.py ...                       # several GPUs (or CPU processes)

From scratch, the loop is the paper's pre-training recipe (Sec. 4.1, Appendix B.1) scaled down to
CIFAR: a linear warmup of the learning rate, updated every step, and gradient clipping at global
norm 1. Where it differs, it was measured (results/README.md): the rate decays along a cosine,
where Sec. 4.1 names a linear decay (the paper's fine-tuning code uses the cosine; the two ended
within a run's noise of each other here); label smoothing 0.1, as DeiT trains (0 ended level over
three seeds, 0.05 and 0.2 lower at one); and the blocks' weight matrices learn with Muon instead of
the paper's AdamW, the largest gain (`Muon` below; --optimizer adamw gives the paper's back).
Fine-tuning (--pretrained) follows the paper's fine-tuning recipe instead (SGD with momentum,
Table 4). Each epoch writes `model.pt` (everything needed to rebuild the model or to continue
training), keeps the best one as `model.best.pt`, and appends one JSON line to
`model.metrics.jsonl`; an earlier run's files there are kept as `model_prev.*`. Ctrl-C saves and
tells how to resume.

Reading for the first time? The learning is in `lr_at`, `make_optimizer`, `Muon`, `train_one_epoch`
and `evaluate`, and `run` puts them together top to bottom. The rest keeps a run safe to stop,
resume, share between processes and give wrong flags to; it can wait for a second reading.

Letters in shape comments: B batch, C channels, H/W image size, K classes.
"""

import argparse
import copy
import itertools
import json
import logging
import math
import os
import pickle
import signal
import sys
import time
import zipfile
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data as datasets
from data import DataError
import vit
from vit import MODELS, ViT, ViTConfig, num_params

TORCHVISION_VITS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")

# Defaults that depend on the mode. From scratch: Muon with AdamW (`Muon` says why; the paper
# pre-trains with AdamW alone, Sec. 4.1, which --optimizer adamw gives back). Weight decay 0.1, not
# the 0.05 we started with: 0.4 points better on average over three seeds of the used-by command,
# ahead in each (results/README.md, "Tries on top of Muon"). The peak learning rate depends on the
# optimizer: with Muon, 3e-3 for the mean-token model that is the default, 0.47 points above 2e-3
# on average over three seeds (results/README.md, "The learning rate for the mean token"); the
# class-token model of before did best at 2e-3, 1.4 points above 1e-3 ("The learning rate with
# Muon"): as the paper's Figure 9 found, the two poolings want their own rates. A wider model
# wants less: at 96 wide, 2e-3 ended 0.9 points above 3e-3 at one seed ("A larger rate still").
# All of those were measured at batch 32, the used-by command's. Another batch scales the rate by
# sqrt(batch / 32), the square-root rule for Adam-like optimizers (Malladi et al. 2022): Muon's and
# AdamW's steps have about one size whatever the batch, so four times the batch makes a quarter of
# the steps, and larger ones make up for it. At the default batch of 128 that gives 6e-3: 0.6
# points above 3e-3 on average over three seeds, ahead at each, 0.23 below batch 32
# (results/README.md, "The batch size when no flag is given").
# With AdamW for everything, 2e-3 ended 0.9 points below 1e-3 in one run of the class-token model,
# but it is the better rate for today's mean-token model: 1.6 points above 1e-3 on average over
# three seeds at batch 32, and at batch 128, scaled by the rule, 4e-3 ended 1.6 points above 2e-3
# (two seeds); ahead at every seed of both. 4e-3 at batch 32 ended 1.5 points below 2e-3 (one
# seed), so the rate peaks near 2e-3 (results/README.md, "AdamW's default rate, at batch 32 and 128").
# Fine-tuning pretrained weights: the paper's recipe (Sec. 4.1, Table 4, Appendix B.1.1): SGD with
# momentum 0.9, no weight decay, a short warmup, cosine decay, clipping at global norm 1.
MODE_DEFAULTS = {
    "scratch": dict(optimizer="muon", lr=dict(muon=3e-3, adamw=2e-3, sgd=1e-3), weight_decay=0.1,
                    warmup_epochs=1.0, label_smoothing=0.1),
    "finetune": dict(optimizer="sgd", lr=0.01, weight_decay=0.0, warmup_epochs=0.2, label_smoothing=0.0),
}


# Named recipes (--preset): a model and the training settings that go with it. A preset only sets
# defaults; any flag given on the command line still wins. README's Presets table says what each
# one reached, on what hardware, with its metrics log in results/.
PRESETS = {
    # The used-by command's own defaults (no flags), picked by measurement for a 10-epoch run on a
    # 2-core CPU: the small plain ViT, crop and flip only, the sine-cosine, PCA and mimetic starts,
    # Muon for the blocks' matrices.
    "cifar10-cpu": dict(dataset="cifar10", model="cifar_tiny", epochs=10, batch_size=32),
    # The plain-ViT baseline of Lee et al. 2021 (93.6% / 73.8% on CIFAR-10 / -100): 2.7M parameters,
    # 100 epochs, 3x repeated augmentation, AutoAugment, Mixup and CutMix, random erasing, stochastic
    # depth, label smoothing, AdamW with a 10-epoch warmup, their batch and learning rate. For one GPU.
    # (They mix half of the batches, we mix every one.)
    "cifar10-best": dict(dataset="cifar10", model="cifar_small", epochs=100, batch_size=128,
                         optimizer="adamw", lr=1e-3,
                         warmup_epochs=10, weight_decay=0.05, label_smoothing=0.1, drop_path=0.1,
                         augment="autoaugment", mixup=1.0, cutmix=1.0, random_erasing=0.25,
                         repeat_aug=3, crop_padding=4, flip="random"),
    # The same model on a short schedule with large batches and lighter regularisation, for a
    # result within minutes on one GPU; with Muon, the default, since short runs are where it helped.
    # 16x the used-by command's batch wants a larger rate (MODE_DEFAULTS says why); and the mean
    # token, as cifar_tiny has, instead of cifar_small's class token. Both picked on a CPU stand-in
    # of this recipe (results/README.md, "The learning rate of cifar10-fast"): 8e-3 ended ahead of
    # 2e-3 and 4e-3 in every pair and of 1.6e-2 in three of four, and the mean token ahead of the
    # class token in all five pairs. (The square-root rule would give 1.2e-2, between those two.)
    "cifar10-fast": dict(dataset="cifar10", model="cifar_small", pool="mean", epochs=30, batch_size=512,
                         lr=8e-3, warmup_epochs=2, weight_decay=0.05, label_smoothing=0.1,
                         augment="trivialaugment", crop_padding=4),
}
PRESETS["cifar100-best"] = dict(PRESETS["cifar10-best"], dataset="cifar100")   # the same recipe


def get_parser():
    p = argparse.ArgumentParser(
        description="Train a Vision Transformer from scratch, or evaluate a checkpoint.",
        epilog="Example: python train.py --dataset folder --data-dir data/cifar10-jpeg --epochs 10 "
               "--batch-size 32")
    a = p.add_argument
    a("--preset", choices=list(PRESETS), help="a named recipe that sets the model and the training "
      "settings together (flags you give still win); see README's Presets table")
    # data
    a("--dataset", default=None, help="cifar10, cifar100, folder or fake (default: cifar10, or the "
      "checkpoint's with --eval-only/--resume)")
    a("--data-dir", default=None, help="where the data is, or is downloaded to (default: ./data, or "
      "the checkpoint's)")
    a("--val-split", type=float, default=0.0, help="fraction of the training set held out to "
      "evaluate on each epoch, so the test set is only reported, never tuned on (default: 0, evaluate "
      "on the test set)")
    a("--workers", type=int, default=None, help="data loader processes (default: 0 on CPU, where "
      "the model needs both cores; on a GPU 4, or up to 8 with per-image --augment or "
      "--random-erasing)")
    a("--crop-padding", type=int, default=2, help="random crop of the image padded by this many "
      "pixels; 0 turns it off (default: 2, measured ahead of the usual 4 in 2-epoch runs and no "
      "worse in 10; the long-run presets use 4)")
    a("--flip", choices=["alternate", "random", "none"], help="horizontal flips: alternate mirrors "
      "each image in every other epoch (Jordan 2024), random tosses a coin per image and epoch, none "
      "turns them off (default: alternate; random with --repeat-aug, whose copies of an image would "
      "otherwise all be mirrored alike)")
    a("--augment", default="none", choices=datasets.AUGMENTS, help="a policy of stronger random "
      "changes per image (default: none)")
    a("--random-erasing", type=float, default=0.0, help="probability of blanking a random rectangle "
      "of each image (default: 0)")
    a("--mixup", type=float, default=0.0, help="Mixup alpha: blend pairs of images and their labels; "
      "0 is off (default: 0; 0.8 is DeiT's)")
    a("--cutmix", type=float, default=0.0, help="CutMix alpha: paste a patch of one image into "
      "another; 0 is off (default: 0; 1.0 is DeiT's)")
    a("--low-res", type=int, default=0, metavar="SIZE", help="progressive resizing: the first "
      "--low-res-epochs train on images shrunk to SIZE pixels, growing to the full size; a small "
      "image has fewer patches, so those epochs are cheaper (default: 0, off)")
    a("--low-res-epochs", type=float, default=0.0, help="epochs over which the size grows from "
      "--low-res to the full size (default: 0)")
    a("--repeat-aug", type=int, default=1, help="show each image this many times per epoch, "
      "differently augmented, in place of other images (default: 1, off)")
    # model
    a("--model", default="cifar_tiny", help=f"named shape: {', '.join(MODELS)} (default: cifar_tiny)")
    a("--image-size", type=int, help="input size in pixels (default: the model's, 32 for CIFAR shapes)")
    a("--patch-size", type=int, help="patch size P (default: the model's)")
    a("--dim", type=int, help="width D (default: the model's)")
    a("--depth", type=int, help="number of blocks (default: the model's)")
    a("--heads", type=int, help="attention heads; must divide --dim (default: the model's)")
    a("--mlp-ratio", type=float, help="MLP width as a multiple of D (default: the model's)")
    a("--pool", choices=["cls", "mean"], help="classify the class token (Eq. 4) or the mean of the "
      "patch tokens (default: the model's: mean for cifar_tiny, cls for the others)")
    a("--dropout", type=float, help="dropout rate (default: 0)")
    a("--drop-path", type=float, help="stochastic depth rate of the last block (default: 0)")
    a("--pos-init", choices=["random", "sincos"], default="sincos", help="first values of the learned "
      "position embeddings: 2-D sine-cosine codes of each patch's row and column, or random as in the "
      "paper (default: sincos, measured to learn faster)")
    a("--patch-init", choices=["random", "pca"], help="first values of the patch embedding: the "
      "whitened principal components of the training patches, or random as in the paper (default: "
      "pca for the plain ViT, measured to learn faster; random for --stem conv)")
    a("--attn-init", choices=["random", "mimetic"], help="first values of the attention weights: "
      "query times key near +identity and value times output near -identity, so tokens start out "
      "attending to tokens like themselves, and where content says little to their neighbours "
      "(Trockman & Kolter 2023), or random as in the paper (default: mimetic, measured 1.6 points "
      "better in the 10-epoch run)")
    a("--stem", choices=["patch", "conv"], help="patch: the plain ViT; conv: the paper's hybrid, "
      "patches cut from a small convolutional feature map (default: patch)")
    # optimisation
    a("--epochs", type=int, default=10, help="passes over the training set (default: 10)")
    a("--batch-size", type=int, default=128, help="images per step, over all processes (default: 128; on a "
      "CPU, 10 epochs at 32 ended a quarter of a point above 128 over three seeds, 128 taking a fifth to "
      "a quarter less time)")
    a("--optimizer", choices=["muon", "adamw", "sgd"], help="muon: Muon for the blocks' weight "
      "matrices, AdamW for the rest (from scratch); adamw for all, as the paper; sgd with momentum 0.9 "
      "(fine-tuning) (default: by mode)")
    a("--lr", type=float, help="peak learning rate (default from scratch: 3e-3 with Muon, 2e-3 with "
      "--optimizer adamw, both measured at batch 32 and scaled by sqrt(batch/32) at others: 6e-3 and "
      "4e-3 at the default 128. With --pool cls or --dim 96, 2e-3 did better at batch 32. "
      "Fine-tuning: 0.01)")
    a("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine (default: 1e-5)")
    a("--warmup-epochs", type=float, help="epochs of linear warmup (default: 1 from scratch, 0.2 "
      "fine-tuning)")
    a("--weight-decay", type=float, help="weight decay on matrices; norms, biases and embeddings get "
      "none (default: 0.1 from scratch, 0 fine-tuning)")
    a("--label-smoothing", type=float, help="weight moved from the true class to the others in the "
      "loss target (default: 0.1 from scratch, 0 fine-tuning)")
    a("--grad-accum", type=int, default=1, help="split each batch into this many smaller ones whose "
      "gradients add up: the same training in less memory (default: 1)")
    a("--grad-clip", type=float, default=1.0, help="clip the gradients' global norm to this; 0 turns "
      "it off (default: 1)")
    a("--ema", type=float, default=0.0, help="also keep an exponential moving average of the weights "
      "with this decay (e.g. 0.999) and evaluate and save that (default: 0, off)")
    # fine-tuning
    a("--pretrained", metavar="NAME|CKPT", help=f"fine-tune instead of training from scratch, from "
      f"torchvision's ImageNet weights ({', '.join(TORCHVISION_VITS)}) or from a checkpoint of ours; "
      f"inputs are resized to the model's --image-size (default: the weights')")
    a("--weights", default="DEFAULT", help="which of torchvision's weights for --pretrained, e.g. "
      "IMAGENET1K_V1, IMAGENET1K_SWAG_E2E_V1 (default: DEFAULT, torchvision's choice)")
    a("--head-only", action="store_true", help="train only the new head, the rest frozen (a linear probe)")
    # system
    a("--device", default="auto", help="cuda, mps, cpu or e.g. cuda:1 (default: auto, the first of "
      "cuda, mps, cpu that is there)")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
      help="auto: bf16 autocast on GPUs that support it, fp16 with loss scaling on older ones, fp32 "
      "on CPU and MPS")
    # --no-compile and --no-tta exist for --resume, whose saved settings would otherwise keep them
    # on: a run compiled on a GPU server can then go on on a laptop without a C++ compiler.
    a("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the "
      "model: faster steps after up to a minute of compiling (the used-by command ran 1.13x as fast "
      "on 2 CPU cores, the compile included); on a CPU it needs a C++ compiler (default: off)")
    a("--seed", type=int, default=0, help="random seed (default: 0)")
    a("--out", default="model.pt", help="checkpoint written every epoch (default: model.pt, or "
      "the --resume checkpoint); the metrics log goes next to it as <name>.metrics.jsonl. An "
      "earlier run's files there are kept once, as <name>_prev.*")
    a("--resume", metavar="CKPT", help="continue the run saved in this checkpoint, with its settings "
      "(flags you give override them; the model, the batch size, the training images and how the "
      "run started can't change)")
    a("--save-every", type=float, default=30, metavar="MINUTES", help="also save part-way into "
      "an epoch that takes longer than this, so that a crash or a power cut loses minutes, not the "
      "epoch (a fine-tune of ViT-B/16 on a CPU takes hours an epoch); 0 saves at the ends of "
      "epochs only (default: 30)")
    a("--patience", type=int, default=0, help="stop when the evaluation accuracy has not improved for "
      "this many epochs; 0 never stops early (default: 0)")
    a("--eval-only", action="store_true", help="evaluate --ckpt on the test set and exit")
    a("--benchmark", action="store_true", help="measure speed instead of training: training "
      "images/s, the data loader and the model alone, and FLOP/s against the device's peak")
    a("--ckpt", help="checkpoint to evaluate with --eval-only")
    a("--tta", action=argparse.BooleanOptionalAction, default=False, help="evaluate each image and "
      "its mirror image and average their class probabilities (test-time augmentation; twice the "
      "evaluation time; default: off)")
    return p


# --------------------------------------------------------------------------------------------------
# Checkpoints: one dict of plain data and tensors, so torch.load(weights_only=True) can read it
# without running any code from the file.


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit; printed as one sentence."""


def save_checkpoint(ckpt, path):
    # Write to a temporary file, then rename: a rename is atomic, so a crash or a full disk while
    # saving leaves the previous checkpoint intact instead of half a new one. The file is flushed
    # to the disk (fsync) before the rename; otherwise, after a power cut, the rename can be on the
    # disk before the data is, and an empty file stands where the old checkpoint was.
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:      # torch.save reports a full disk as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)                    # half a file, and the space it took
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]    # some errors have no text
        raise CheckpointError(f"could not save {path} ({reason}); the checkpoint saved before, if "
                              f"there is one, is intact") from None


def load_checkpoint(path):
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder; name the .pt file in it")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist (train one with python train.py)")
    if not zipfile.is_zipfile(path):          # torch.save writes a zip archive
        raise CheckpointError(f"{path} is not a checkpoint: torch.save writes a zip archive, and this "
                              f"file is not one (a metrics log? a copy or download cut short?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message here is a page of advice to load with weights_only=False
        raise CheckpointError(f"{path} holds Python objects besides tensors and plain data, which "
                              f"this project's checkpoints never do; it is not loaded, since loading "
                              f"them would run code from the file") from None
    except Exception as e:
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint; it may be truncated "
                              f"or not a checkpoint at all ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project: it holds no 'config' and "
                              f"'model' entries (a bare state_dict from elsewhere goes through "
                              f"vit.from_torchvision or load_weights)")
    return ckpt


def trained_to(ckpt):
    """How far the checkpoint's run got: "epoch 3", or, for one saved part-way into an epoch (Ctrl-C,
    --save-every), "step 1170, part-way into epoch 1"."""
    if "partial_epoch" in ckpt and "step" in ckpt:
        return f"step {ckpt['step']}, part-way into epoch {ckpt.get('epoch', 0) + 1}"
    return f"epoch {ckpt.get('epoch', '?')}"


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


def model_from_checkpoint(ckpt, raw=False, **overrides):
    """Rebuild the trained ViT from a checkpoint dict alone (overrides: fields without weights).

    A run with --ema was evaluated with the averaged weights, so those are what we rebuild, unless
    raw=True asks for the weights the optimizer was working on (to resume training).
    """
    try:
        cfg = ViTConfig(**{**ckpt["config"], **overrides})
    except TypeError as e:
        raise CheckpointError(f"the checkpoint's config does not fit this vit.py ({e})") from None
    model = ViT(cfg)
    load_weights(model, ckpt["model"] if raw or ckpt.get("ema") is None else ckpt["ema"])
    return model


def load_pretrained(name, weights_name, overrides):
    """(model, (mean, std)): torchvision's pretrained ViT `name`, or the model in our checkpoint `name`,
    with the normalisation it was trained with, which the new data must be given too."""
    if name not in TORCHVISION_VITS:
        if not os.path.isfile(name):
            raise ValueError(f"--pretrained {name} is neither one of torchvision's ViTs "
                             f"({', '.join(TORCHVISION_VITS)}) nor a checkpoint file")
        ckpt = load_checkpoint(name)
        return model_from_checkpoint(ckpt, **overrides), (ckpt["data"]["mean"], ckpt["data"]["std"])
    from torchvision.models import get_model_weights
    enum = get_model_weights(name)
    if weights_name not in enum.__members__:
        raise ValueError(f"--weights {weights_name} is not one of {name}'s: {', '.join(enum.__members__)}")
    weights = enum[weights_name]
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    had_file = os.path.isfile(cached)
    try:
        # torchvision's own download and cache ($TORCH_HOME/hub/checkpoints): fetched once, then reused.
        state = weights.get_state_dict(progress=True)
    except Exception as e:
        if had_file:
            raise DataError(f"{cached} is in the torch hub cache but could not be read ({e}); delete it "
                            f"and run again to download it anew") from None
        raise DataError(f"the {name} weights {weights.name} are not in the torch hub cache ({cached}) "
                        f"and could not be downloaded from {weights.url} ({type(e).__name__}); download "
                        f"that file on a machine with internet and copy it to {cached}") from None
    model = vit.from_torchvision_state_dict(state, MODELS[name]["heads"], **overrides)
    t = weights.transforms()            # the normalisation the weights were trained with
    return model, (tuple(t.mean), tuple(t.std))


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
            # CPU: bf16 autocast halved the training speed on our 2-core test machine, even with
            # AVX-512 bf16 (README, Speed). MPS: autocast support is recent and uneven across macOS
            # versions, so fp32 is the safe default there.
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def use_tf32(device, dtype):
    """On a CUDA GPU under autocast, let the matmuls left in float32 use TF32 tensor cores.

    Autocast runs the model's matmuls in bf16 already; what stays float32 is mainly Muon's
    orthogonalisation, five rounds of matmuls over every block matrix at each step, which the
    original Muon runs in bf16. TF32 keeps float32's range with a 10-bit mantissa, and an H100's
    data sheet gives it 495 TFLOP/s against float32's 67. --precision fp32 asks for float32
    arithmetic: left as it is. (Not yet measured here: no GPU run has been made.)
    """
    if device.type == "cuda" and dtype is not None:
        torch.backends.cuda.matmul.allow_tf32 = True
    return torch.backends.cuda.matmul.allow_tf32


def autocast_for(device, dtype):
    """A function that opens the mixed-precision context for one forward pass (or does nothing)."""
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext


def default_workers(device, augment, random_erasing):
    """Loader processes when --workers is not given.

    On a CPU, none: the model needs every core, and a worker took one from it (README, Speed). On a
    GPU, the CPU's cores are free for the loader. Without per-image policies it only gathers bytes
    (crop and flip run on the GPU), which 4 workers do faster than a small ViT trains. AutoAugment,
    RandAugment and TrivialAugment run per image: 8,700, 5,600 and 10,100 images/s on one thread of
    the 2-core Intel Xeon (7,000 for AutoAugment with random erasing; results/README.md, Speed),
    where a GPU should train cifar_small at tens of thousands (not yet measured; README, Presets).
    So those recipes get up to 8 of the cores this process may use (the machine's cores shared
    among the processes torchrun starts on it).
    """
    if device.type == "cpu":
        return 0
    if augment == "none" and random_erasing == 0:
        return 4
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(4, min(8, per_process))


def train_size_at(epoch, full, low, ramp_epochs, patch):
    """Progressive resizing (--low-res): the side, in pixels, of the training images in `epoch`.

    The side grows linearly from `low` at epoch 0 to `full` at epoch `ramp_epochs`, rounded down to
    whole patches. An image with s/P patches a side costs about (s/P)^2 tokens instead of (full/P)^2,
    so a 16-pixel epoch of a 32-pixel model costs about a quarter; the model learns the coarse shapes
    there and the details once the images are full size (as FFCV's ResNet recipes do). Evaluation is
    always at the full size. Off by default: in the 10-epoch CPU run (results/README.md) 16, 20 and
    24 pixels for the first three epochs ended 2.3 points lower, for three minutes less: in a shrunk
    image each 4x4 patch covers more of the object, so the patch filters learn a scale they must
    relearn later.
    """
    if not low or epoch >= ramp_epochs:
        return full
    side = low + (full - low) * epoch / ramp_epochs
    return max(patch, int(side) // patch * patch)


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


def make_optimizer(model, lr, weight_decay, device, name="muon"):
    """Muon for the blocks' weight matrices and AdamW for the rest; or AdamW or SGD for everything.

    Weight decay pulls a weight towards 0. That regularises matrices, but a LayerNorm gain pulled to 0
    or a position embedding shrunk towards 0 only loses information, so vectors (norms, biases) and
    the embeddings (class token, positions) are left alone, as in big_vision (the later code of the
    paper's authors, which decays only weight matrices) and DeiT.
    """
    hidden, qkv, decay, no_decay = [], [], [], []
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or pname in ("pos_embed", "cls_token"):
            no_decay.append(p)
        elif name == "muon" and pname.startswith("blocks.") and pname.endswith("attn.qkv.weight"):
            qkv.append(p)                     # q, k and v stacked: three matrices for Muon
        elif name == "muon" and pname.startswith("blocks.") and p.ndim == 2:
            hidden.append(p)                  # proj, fc1, fc2 of every block
        else:
            decay.append(p)                   # and the patch embedding and the head
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    # The fused kernel updates all parameters in a few launches instead of several per tensor.
    adamw = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=device.type in ("cuda", "cpu"))
    if name == "adamw" or not (hidden or qkv):   # (none when only the head trains, --head-only)
        return adamw
    matrices = [{"params": hidden}, {"params": qkv, "split": 3}]
    return Optimizers(Muon(matrices, lr=lr, weight_decay=weight_decay), adamw)


def orthogonalize(G, steps=5):
    """Push every singular value of each matrix in G (L, m, n) to about 1: U S V^T -> U V^T, roughly.

    No SVD, only matmuls: G is scaled so that its singular values are at most 1, then each step
    applies the odd polynomial p(x) = a x + b x^3 + c x^5 to them (X -> a X + b (X X^T) X + c (X X^T)^2 X
    acts on the singular values alone). Jordan et al. tuned a, b, c to lift small values steeply:
    after 5 steps every singular value above about 1/300 of G's norm lies between about 0.7 and 1.2
    (not exactly 1, which they found trains just as well); smaller ones grow some 500-fold.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    wide = G.size(-2) <= G.size(-1)
    X = G if wide else G.mT                   # (L, r, k) with r <= k, so that X X^T is the small one
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)   # Frobenius >= largest singular value
    for _ in range(steps):
        A = X @ X.mT                                              # (L, r, r)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)               # b A + c A A, in one call
        X = torch.baddbmm(X, B, X, beta=a)                        # a X + B X: (L, r, k)
    return X if wide else X.mT


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"): momentum, orthogonalised.

    SGD's momentum for a weight matrix is dominated by a few directions; Muon replaces it by the
    nearest matrix whose singular values are all 1 (`orthogonalize`), so every direction the
    gradients agree on moves at the same speed, rare ones included. Measured here, that is what a
    short run needs most: 10 epochs on the CPU went from 73.0% with AdamW to 79.3%
    (results/README.md).
    Only for the 2-D matrices inside the blocks; the embeddings, the head and all vectors stay with
    AdamW, as in Muon's own recipe. The step is scaled by 0.2 sqrt(max(m, n)), which makes its size
    match AdamW's (Liu et al. 2025, "Muon is scalable"), so the two share --lr and --weight-decay.
    A parameter group with split=S holds S matrices stacked along the rows of each tensor, such as
    q, k and v in one qkv weight: each is orthogonalised on its own, as the model uses them apart.
    """

    def __init__(self, params, lr=1e-3, weight_decay=0.0, momentum=0.95, split=1):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, split=split))

    @torch.no_grad()
    def step(self):
        # Matrices of one shape are orthogonalised together, in one batched matmul per step of the
        # iteration: a small ViT has dozens of small matrices, and on a CPU each call costs more than
        # its arithmetic. (A tall matrix is orthogonalised as its transpose anyway, so the MLP's
        # D x 2D and 2D x D matrices form one group, and q, k, v join the attention's output.)
        same_shape = {}
        for group in self.param_groups:
            settings = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                # The S matrices of a stacked weight, with their gradients and momenta: views, so
                # the in-place updates below change the tensors themselves.
                for w, g, m in zip(*(t.chunk(group["split"]) for t in (p, p.grad, buf))):
                    key = (*settings, min(w.shape), max(w.shape))
                    same_shape.setdefault(key, []).append((w, g, m))
        for (lr, wd, mu, r, k), parts in same_shape.items():
            params, grads, bufs = (list(t) for t in zip(*parts))
            flip = [p.size(0) > p.size(1) for p in params]        # tall: work on the transpose
            torch._foreach_mul_(bufs, mu)                         # the momentum of all of them,
            torch._foreach_add_(bufs, grads)                      # in two calls
            # Nesterov: step from where the momentum is about to take us, g + mu m.
            ahead = torch._foreach_add(grads, bufs, alpha=mu)
            stack = torch.stack([u.mT if f else u for u, f in zip(ahead, flip)])   # (L, r, k)
            update = orthogonalize(stack).unbind(0)
            update = [u.mT if f else u for u, f in zip(update, flip)]
            torch._foreach_mul_(params, 1 - lr * wd)              # decoupled weight decay, as AdamW
            torch._foreach_add_(params, update, alpha=-lr * 0.2 * k ** 0.5)


class Optimizers:
    """Several optimizers that act as one: the loop, the gradient scaler and checkpoints see a single
    object with all their parameter groups."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state):
        if len(state.get("optimizers", ())) != len(self.optimizers):
            raise ValueError("the saved optimizer state is not of Muon with AdamW")
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)


# --------------------------------------------------------------------------------------------------
# Progress on one line


class Progress:
    """Rewrites one terminal line with the epoch's progress; in a log file, writes a line now and then.

    With `after`, the steps of the epochs still to come, the line also says how long the whole run
    has to go at this pace (evaluations not counted): a preset made for a GPU, started on a laptop,
    says it will take hours in its first seconds, not after its first epoch.
    """

    def __init__(self, total, prefix, enabled=True, after=0):
        self.total, self.prefix, self.enabled, self.after = total, prefix, enabled, after
        self.tty = sys.stdout.isatty()
        self.start = self.last = time.time()

    def update(self, done, text_fn):
        now = time.time()
        if not self.enabled or done == self.total or now - self.last < (0.5 if self.tty else 60):
            return
        self.last = now
        per_batch = (now - self.start) / done
        eta = format_time(per_batch * (self.total - done))
        if self.after:
            eta += f", run {format_time(per_batch * (self.total - done + self.after))}"
        line = f"{self.prefix} [{done:>{len(str(self.total))}}/{self.total}] {text_fn()} eta {eta}"
        print(("\r" + line + "\033[K") if self.tty else line, end="" if self.tty else "\n", flush=True)

    def say(self, text):
        """A line of its own; the progress line comes back at the next update."""
        self.close()
        print(text, flush=True)

    def close(self):
        if self.enabled and self.tty:
            print("\r\033[K", end="", flush=True)


# --------------------------------------------------------------------------------------------------
# Stopping safely, and starting again part-way into an epoch


# Ctrl-C, what schedulers and `kill` send, and what a terminal sends as it closes (or an ssh
# connection as it drops; Windows has no SIGHUP).
STOP_SIGNALS = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])


def ignore_stop_signals(worker_id):
    """In each loader process: leave the stop signals to the training process. A terminal sends
    Ctrl-C to every process of the command, loaders too, and a loader started after StopRequest was
    installed would run its own copy of it; the training process stops the loaders itself."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class StopRequest:
    """Signal handler for Ctrl-C (SIGINT), SIGTERM and SIGHUP.

    The first signal only sets a flag: the loop finishes the step it is in, saves a checkpoint and
    exits, so no work is lost. A second Ctrl-C raises KeyboardInterrupt and quits at once.
    """

    def __init__(self, loud=True):
        self.signal, self.loud = None, loud     # loud: this process says what happens (the first)
        # Which of stdout and stderr are a terminal, asked now: once it has hung up, it can't say.
        self.terminal = [fd for fd in (1, 2) if os.isatty(fd)]

    def __call__(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        if signum == getattr(signal, "SIGHUP", None):
            # The terminal has gone: every write to it now fails (EIO), and the failure would stop
            # the run before it saved. So its outputs are pointed at /dev/null, where a write that
            # the signal interrupted is also retried; a log redirected to a file goes on.
            devnull = os.open(os.devnull, os.O_WRONLY)
            for fd in self.terminal:
                os.dup2(devnull, fd)
        if self.loud:
            print(f"\n{self.signal}: finishing this step, then saving a checkpoint (Ctrl-C again quits "
                  f"at once, losing the current epoch)", file=sys.stderr, flush=True)

    def install(self):
        """Returns the handlers it replaced, to put back with restore(). A signal that the run was
        started ignoring stays ignored: `nohup` ignores SIGHUP so that a run outlives its terminal."""
        return {s: signal.signal(s, self) for s in STOP_SIGNALS if signal.getsignal(s) != signal.SIG_IGN}

    @staticmethod
    def restore(previous):
        for s, handler in previous.items():
            signal.signal(s, handler)


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


class EMA:
    """An exponential moving average of the weights: after every step, ema = decay*ema + (1-decay)*w.

    It averages the last ~1/(1-decay) steps, smoothing out the noise of the final steps, and is often
    a little more accurate than the weights themselves (Polyak & Juditsky 1992; DeiT uses 0.99996).
    Not at the end of our cosine schedule, though, which shrinks the steps to nothing and so averages
    by itself: in the 10-epoch CPU run, 0.999 led the raw weights by 2 to 6 points mid-run and ended
    0.13 points behind (three seeds; results/README.md, "An average of the weights").
    """

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        for e, w in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(w, 1.0 - self.decay)
            else:
                e.copy_(w)                     # counters such as BatchNorm's batches seen


# --------------------------------------------------------------------------------------------------
# One epoch of training, and evaluation


def train_one_epoch(model, loader, optimizer, scaler, step, sched, ctx, sums=None):
    """Train for one pass over `loader`, or until a stop is requested.

    `sums` holds this process's running (loss sum, correct, images) of the epoch: zeros for a new
    epoch, the saved values when resuming one that was interrupted. Returns (step, sums, stopped).
    With --grad-accum K each optimizer step adds up the gradients of K smaller batches from the loader.
    """
    model.train()
    device, accum = ctx["device"], ctx["grad_accum"]
    # Summed on the device: a .item() per step would make the CPU wait for the GPU after every step.
    sums = torch.zeros(3, device=device) if sums is None else sums.to(device)
    progress = Progress(len(loader) // accum, ctx["prefix"], ctx["rank"] == 0, ctx["steps_after"])
    optimizer.zero_grad(set_to_none=True)
    end = len(loader) // accum * accum            # the batches of whole steps
    for i, (images, labels, index) in enumerate(loader):
        if i == end:
            break                                 # a few batches short of a whole step: skip them
        last = (i + 1) % accum == 0               # the last part of this optimizer step
        images = images.to(device, non_blocking=True)                     # (B, C, H, W) uint8
        labels = labels.to(device, non_blocking=True)                     # (B,)
        flip = datasets.flips_for(ctx["flip"], index, ctx["epoch"], ctx["first_flip"])
        images = datasets.crop_flip(images, ctx["crop_padding"], flip)    # at the stored size
        x = datasets.normalize(images, ctx["mean"], ctx["std"], ctx["train_size"])   # (B, C, H, W) float
        target = labels
        if ctx["mixer"] is not None:
            x, target = ctx["mixer"](x, labels)   # mixed images, soft targets (B, K)
        # DDP averages gradients over processes in backward(); between the parts of one step there
        # is nothing to average yet, so no_sync() skips that communication.
        sync = nullcontext() if last or ctx["world"] == 1 else model.no_sync()
        with sync:
            with ctx["autocast"]():
                logits = model(x)                                         # (B, K)
                loss = F.cross_entropy(logits.float(), target, label_smoothing=ctx["label_smoothing"])
            scaler.scale(loss / accum).backward()
        n = len(labels)
        sums[0] += loss.detach() * n
        sums[1] += (logits.argmax(1) == labels).sum()
        sums[2] += n
        if not last:
            continue
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, **sched)
        if ctx["grad_clip"] > 0:
            scaler.unscale_(optimizer)            # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), ctx["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ctx["ema"] is not None:
            ctx["ema"].update(ctx["raw_model"])
        step += 1
        done = (i + 1) // accum
        progress.update(done, lambda: f"loss {check_finite(sums[0].item(), step) / sums[2].item():.3f} "
                                      f"acc {100 * sums[1].item() / sums[2].item():5.1f}% "
                                      f"{(i + 1) * n * ctx['world'] / (time.time() - progress.start):5.0f} img/s")
        if stop_requested(ctx, step):
            break
        # A long epoch, saved part-way (--save-every); not after its last step, which the end of
        # the epoch saves with its evaluation (a part-way save there would resume past it).
        if ctx["save_part"] and i + 1 < end and time.time() - ctx["saved_at"] >= ctx["save_every"]:
            try:
                ctx["save_part"](step, sums)
            except CheckpointError as e:
                # Only a safety copy failed (a full disk, say): nothing is lost yet, so train on and
                # give the user until the epoch's end, whose save stops the run if it fails too.
                # Stopping here would also leave the other torchrun processes to fail in gloo.
                progress.say(f"warning: {e}; training goes on, and the end of this epoch saves "
                             f"again (the run stops there if that fails too)")
            ctx["saved_at"] = time.time()
    progress.close()
    return step, sums, ctx["stop"].signal is not None


def check_finite(loss, step):
    # Checked only where we read the loss anyway (progress line, end of epoch): reading it every step
    # would make a GPU wait for each step to finish before the next one is queued.
    if not math.isfinite(loss):
        raise Diverged(f"the loss became {loss} by step {step}; training stopped and the last good "
                       f"checkpoint was kept. Try a lower --lr, --grad-clip 1 or --precision fp32")
    return loss


def stop_requested(ctx, step):
    """Has Ctrl-C/SIGTERM arrived? With several processes all must agree, or DDP would hang waiting
    for a process that left; they compare notes every 10 steps."""
    flag = ctx["stop"].signal is not None
    if ctx["world"] == 1:
        return flag
    if step % 10:
        return False
    t = reduce_sum(torch.tensor(float(flag), device=ctx["device"]))
    if t.item() > 0 and ctx["stop"].signal is None:
        ctx["stop"].signal = "SIGTERM"
    return t.item() > 0


@torch.no_grad()
def evaluate(model, split, ctx, batch_size=None):
    """(mean loss, accuracy) on a whole Split; each process takes every world-th batch."""
    model.eval()
    device = ctx["device"]
    if batch_size is None:
        # A GPU wants big batches to be busy. A CPU does not: batches of 500 took 1.3x (cifar_tiny,
        # then 96 wide) to 1.8x (48 wide) as long as batches of 100 or 250, most likely because the
        # activations and the (B, h, N, N) attention scores of a big batch no longer fit in its caches.
        batch_size = 100 if device.type == "cpu" else 500
    sums = torch.zeros(3, device=device)       # loss sum, correct, count
    starts = range(ctx["rank"] * batch_size, len(split), ctx["world"] * batch_size)
    # Seconds for CIFAR, but a fine-tuned ViT-B/16 on a CPU takes minutes for 10,000 images.
    progress = Progress(len(starts), f"{ctx.get('prefix', '')} evaluating".strip(), ctx["rank"] == 0)
    for i, s in enumerate(starts):
        images = split.images[s:s + batch_size].to(device, non_blocking=True)
        labels = split.labels[s:s + batch_size].to(device, non_blocking=True)
        x = datasets.normalize(images, ctx["mean"], ctx["std"], ctx["input_size"])
        with ctx["autocast"]():
            logits = model(x).float()                                      # (B, K)
            if ctx.get("tta"):
                # Trained with flips (the default), the model has seen mirror images as the same
                # class, so the mirror is a second look at the image; averaging the two
                # probabilities is an ensemble of two views for the price of one model.
                # The log of the average stands in for the logits: its softmax is that average.
                flipped = model(x.flip(-1)).float()                         # (B, K)
                probs = (logits.softmax(1) + flipped.softmax(1)) / 2
                logits = probs.clamp_min(1e-30).log()   # an underflow to 0 must not give log 0
        # Plain cross-entropy, without label smoothing: the number people compare across papers.
        sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        sums[1] += (logits.argmax(1) == labels).sum()
        sums[2] += len(labels)
        progress.update(i + 1, lambda: f"acc {100 * sums[1].item() / sums[2].item():5.1f}%")
    progress.close()
    sums = reduce_sum(sums)
    return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()


def first_process_failed(problem, device):
    """Did the first process, the one that writes the files, fail with `problem` (an exception it
    caught, or None)? Asked of every process, so that all stop together: otherwise the others would
    train on into their next exchange with it, and fail there with a traceback from gloo or NCCL
    below its one sentence. The first process raises its problem here, once the others have heard."""
    failed = reduce_sum(torch.tensor(float(problem is not None), device=device)).item() > 0
    if problem is not None:
        raise problem
    return failed


def reduce_sum(t):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# --------------------------------------------------------------------------------------------------
# The run, top to bottom: the flags, the model and its starting point, the data, the optimizer
# (or all of these from a checkpoint), then the loop over epochs that evaluates and saves


def parse_args(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.preset:                 # the preset's values become the defaults; given flags still win
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    return args


def flags_given(argv=None):
    """The names of the flags on the command line. Comparing values with the defaults can't tell
    `--epochs 10`, typed to shorten a resumed 30-epoch run, from no --epochs at all."""
    parser, unset = get_parser(), object()       # every default made a marker that no flag parses to
    parser.set_defaults(**dict.fromkeys(vars(parser.parse_args([])), unset))
    return {name for name, value in vars(parser.parse_args(argv)).items() if value is not unset}


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args, flags_given(argv))
    except (ValueError, DataError, CheckpointError) as e:
        # Mistakes the user can fix end with one sentence, not a traceback. Bad flags are usage
        # errors (exit 2); a problem found while running (data, checkpoints) exits 1.
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as e:
        # Too large a batch for the device's memory is a setting to change, not a bug: say which.
        # (CUDA says "CUDA out of memory", MPS "MPS backend out of memory", the CPU "can't allocate
        # memory" or "not enough memory".)
        text = str(e)
        signs = ("out of memory", "allocate memory", "not enough memory")
        if not isinstance(e, MemoryError) and not any(s in text for s in signs):
            raise
        print(f"error: out of memory ({text.splitlines()[0][:240] if text else type(e).__name__}); "
              f"lower --batch-size, or keep it and split each step into parts with --grad-accum, e.g. "
              f"--grad-accum 4 (the same training, a quarter of the images at a time; a checkpoint "
              f"already saved goes on that way with --resume model.pt --grad-accum 4)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C before training began (decoding images, say), or a second one during it. Saves
        # are written aside and then renamed, so whatever checkpoint is there is whole.
        print("\nstopped by Ctrl-C; any checkpoint already written is intact", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        # NCCL (GPUs) wants its process group destroyed before the process ends, or it warns of
        # work that may be pending. Gloo (CPUs) needs no such call, the process's end frees it, and
        # under torch 2.4.1 the call hung now and then in the process that ended last (5 of 18 runs
        # of two CPU processes here; none of 24 without it).
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
            dist.destroy_process_group()


def build_model(args, resume):
    """The model, and the normalisation its weights expect (None: the data's own).

    On --resume the checkpoint's model; with --pretrained the pretrained weights; else a named shape
    (--model) with any field overridden by a flag. The head is sized for the data's classes later,
    once they are known.
    """
    shape = dict(image_size=args.image_size, patch_size=args.patch_size, dim=args.dim, depth=args.depth,
                 heads=args.heads, mlp_ratio=args.mlp_ratio, pool=args.pool, stem=args.stem)
    regularisation = {k: v for k, v in dict(dropout=args.dropout, drop_path=args.drop_path).items()
                      if v is not None}
    if resume:
        model = model_from_checkpoint(resume, raw=True)
        differ = [f"--{k.replace('_', '-')} {v} (checkpoint: {getattr(model.cfg, k)})"
                  for k, v in {**shape, **regularisation}.items() if v is not None and v != getattr(model.cfg, k)]
        if differ:
            raise CheckpointError(f"{args.resume} holds a different model than asked for: "
                                  f"{', '.join(differ)}; drop those flags to resume it")
        return model, (resume["data"]["mean"], resume["data"]["std"])
    if args.pretrained:
        fixed = [f"--{k.replace('_', '-')}" for k, v in shape.items() if v is not None and k != "image_size"]
        if fixed:
            raise ValueError(f"{', '.join(fixed)} can't be changed when fine-tuning: the shape comes "
                             f"with the pretrained weights (only --image-size can, by interpolating "
                             f"the position embeddings)")
        model, norm = load_pretrained(args.pretrained, args.weights, regularisation)
        if args.image_size and args.image_size != model.cfg.image_size:
            model.set_image_size(args.image_size)
        return model, norm
    return ViT(vit.model_config(args.model, **shape, **regularisation)), None


def start_from_scratch(model, args, data):
    """The optional starting points of a model trained from scratch (vit.py, end of the file), as
    --pos-init, --patch-init and --attn-init say; those left unset get their defaults here, which the
    checkpoint then records."""
    cfg = model.cfg
    if args.pos_init == "sincos":
        model.pos_embed.data.copy_(vit.sincos_pos_embed(cfg.grid, cfg.dim, cfg.pool == "cls"))
    if args.patch_init is None:
        args.patch_init = "pca" if cfg.stem == "patch" else "random"
    if args.patch_init == "pca":
        # 5000 random training images are plenty for CIFAR's 48 numbers a patch. Larger images take
        # fewer, about 200 MB of floats: 5000 at 224 pixels held 12 GB at the peak and took 25 s,
        # 332 (still 65,000 patches for 768 numbers) 0.8 GB and 0.8 s.
        count = min(5000, max(256, 50_000_000 // (3 * cfg.input_size[0] * cfg.input_size[1])))
        pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(args.seed))
        sample = datasets.normalize(data.train.images[pick[:count]], data.mean, data.std, cfg.input_size)
        vit.pca_patch_init(model, sample)
    if args.attn_init is None:
        args.attn_init = "mimetic"
    if args.attn_init == "mimetic":
        vit.mimetic_attention_init(model, generator=torch.Generator().manual_seed(args.seed))


def run(args, given):
    if args.eval_only:
        return run_eval_only(args, given)
    rank, world, local_rank = setup_distributed()
    device = pick_device(args.device, local_rank)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)

    resume = load_checkpoint(args.resume) if args.resume else None
    if resume:
        args = resumed_args(args, resume, say, given)
    mode = "finetune" if args.pretrained else "scratch"
    for k, v in MODE_DEFAULTS[mode].items():      # flags left unset take the mode's default
        if getattr(args, k) is None:
            v = v[args.optimizer] if isinstance(v, dict) else v      # lr: by optimizer
            if k == "lr" and mode == "scratch" and args.batch_size > 0:   # (check_args refuses <= 0)
                v *= math.sqrt(args.batch_size / 32)                 # measured at batch 32, see above
            setattr(args, k, v)
    if args.flip is None:
        args.flip = "random" if args.repeat_aug > 1 else "alternate"
    dataset = args.dataset or "cifar10"
    data_dir = args.data_dir or "./data"
    check_args(args, world, given)
    check_writable(args.out)
    if args.compile:
        check_compile(device)

    torch.manual_seed(args.seed)           # the same initial weights in every process
    model, norm = build_model(args, resume)
    cfg = model.cfg
    if args.crop_padding >= min(cfg.input_size):
        raise ValueError(f"--crop-padding {args.crop_padding} must be smaller than the image "
                         f"({cfg.image_size} pixels): the padding mirrors the image's own pixels")
    if args.low_res and not (cfg.patch_size <= args.low_res <= cfg.image_size and cfg.image_height == 0):
        raise ValueError(f"--low-res {args.low_res} must lie between the patch size ({cfg.patch_size}) "
                         f"and the image size ({cfg.image_size}), for square images")

    data = datasets.load_data(dataset, data_dir, cfg.image_size, args.val_split, args.seed)
    # The head, now that the data's classes are known: checked on --resume, a new one otherwise.
    if resume:
        check_classes(args.resume, resume, cfg.num_classes, data, data_dir)
    elif cfg.num_classes != len(data.classes) or args.pretrained:
        if args.pretrained:
            model.reset_head(len(data.classes))   # a new zero head, as the paper fine-tunes
        else:
            cfg.num_classes = len(data.classes)
            model = ViT(cfg)
    if not resume and not args.pretrained:
        start_from_scratch(model, args, data)
    if args.head_only:                       # a linear probe: only the new head learns
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("head.")
    model = model.to(device)
    mean, std = norm or (data.mean, data.std)
    torch.manual_seed(args.seed + 1000 * rank)   # but each process its own augmentation and dropout

    lr = args.lr                             # the peak of the schedule
    steps_per_epoch = len(data.train) // args.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"the training set has {len(data.train)} images, fewer than one batch of "
                        f"{args.batch_size}; lower --batch-size")
    if resume and resume.get("train_images", len(data.train)) != len(data.train):
        # Where the run stopped is a step count (of the saved batch, which resumed_args keeps), and
        # the epoch's order a shuffle of these images; with more or fewer of them it would point
        # into another epoch, and the schedule would no longer be the one the run began.
        raise CheckpointError(f"{args.resume} comes from a run on {resume['train_images']} training "
                              f"images, and these data have {len(data.train)}; resume on the same "
                              f"images, or start a new run from its weights with --pretrained {args.resume}")
    sched = dict(total_steps=args.epochs * steps_per_epoch, lr=lr, min_lr=min(args.min_lr, lr),
                 warmup_steps=round(args.warmup_epochs * steps_per_epoch))
    optimizer = make_optimizer(model, lr, args.weight_decay, device, args.optimizer)
    amp_dtype = pick_precision(args.precision, device)
    use_tf32(device, amp_dtype)
    # Loss scaling keeps small fp16 gradients from rounding to zero; bf16 has fp32's range, needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step, history = 0, []
    if resume:
        try:
            optimizer.load_state_dict(resume["optimizer"])
        except (ValueError, KeyError, IndexError):
            raise CheckpointError(f"the optimizer state in {args.resume} does not fit --optimizer "
                                  f"{args.optimizer}; resume with the run's own optimizer (drop "
                                  f"--optimizer); a checkpoint from an older train.py may hold "
                                  f"another layout of the optimizer state") from None
        scaler.load_state_dict(resume["scaler"])
        step, history = resume["step"], resume["metrics"]
        if step >= args.epochs * steps_per_epoch and not args.benchmark:   # (a benchmark saves nothing)
            say(f"{args.resume} has trained to the end of epoch {step // steps_per_epoch}, and --epochs "
                f"is {args.epochs}: nothing to do. To train longer, resume with a larger --epochs (the "
                f"learning rate then follows the longer run's schedule, so it rises again)")
            return 0
        torch.set_rng_state(resume["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in resume["rng"]:
            torch.cuda.set_rng_state(resume["rng"]["cuda"], device)
        say(f"resuming {args.resume} at step {step} (epoch {step // steps_per_epoch + 1}, batch "
            f"{step % steps_per_epoch + 1} of {steps_per_epoch})")
    start_epoch = step // steps_per_epoch

    # torch.compile and DDP wrap the model; `model` itself stays unwrapped, and is what we save.
    train_model = torch.compile(model) if args.compile else model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)

    workers = args.workers if args.workers is not None else default_workers(device, args.augment, args.random_erasing)
    transform = datasets.train_transform(args.augment, args.random_erasing)   # per image, if any
    train_set = datasets.ImageDataset(data.train, transform)
    sampler = datasets.EpochSampler(len(train_set), world, rank, args.seed, args.repeat_aug)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size // world // args.grad_accum, sampler=sampler, drop_last=True,
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        worker_init_fn=ignore_stop_signals,
        # Its own generator (for worker seeds), so that starting an epoch draws nothing from the global
        # random stream that augmentation and dropout use: a resumed run then replays it exactly.
        generator=torch.Generator().manual_seed(args.seed))

    eval_name, eval_split = ("val", data.val) if data.val is not None else ("test", data.test)
    # With --tta every epoch's evaluation averages each image with its mirror; the epoch lines
    # and the metrics log say so, or its accuracy would be read as the plain one.
    eval_label = f"{eval_name} (tta)" if args.tta else eval_name
    autocast = autocast_for(device, amp_dtype)
    ema = EMA(model, args.ema) if args.ema > 0 else None
    if ema is not None and resume:
        load_weights(ema.model, resume["ema"] if resume.get("ema") is not None else resume["model"])
    eval_model = ema.model if ema is not None else train_model
    ctx = dict(device=device, rank=rank, world=world, input_size=cfg.input_size, train_size=cfg.input_size,
               mean=torch.tensor(mean, device=device), std=torch.tensor(std, device=device),
               autocast=autocast, label_smoothing=args.label_smoothing, grad_clip=args.grad_clip,
               grad_accum=args.grad_accum, prefix="", steps_after=0, stop=StopRequest(loud=is_main), ema=ema,
               raw_model=model, crop_padding=args.crop_padding, flip=args.flip, epoch=0, tta=args.tta,
               save_part=None, save_every=60 * args.save_every, saved_at=time.time(),
               # Which images epoch 0 mirrors under --flip alternate: a random half, drawn from the
               # seed alone, so every process and a resumed run agree on it.
               first_flip=torch.rand(len(train_set), generator=torch.Generator().manual_seed(args.seed)) < 0.5,
               mixer=datasets.batch_mixer(cfg.num_classes, args.mixup, args.cutmix))

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    origin = args.model
    if args.pretrained:                      # torchvision's weights have a name; ours are the file
        weights = f" ({args.weights})" if args.pretrained in TORCHVISION_VITS else ""
        origin = f"{args.pretrained}{weights}, fine-tuned"
    say(f"model {origin}: {num_params(model) / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trained), "
        f"{asdict(cfg)}")
    if not resume and not args.pretrained:
        say(f"start: position embeddings {'2-D sine-cosine codes' if args.pos_init == 'sincos' else 'random'}, "
            f"patch embedding {'whitened PCA of training patches' if args.patch_init == 'pca' else 'random'}, "
            f"attention {'mimetic (qk ~ +I, vo ~ -I)' if args.attn_init == 'mimetic' else 'random'}")
    say(f"data {dataset}: {len(data.train)} train, {len(data.val) if data.val else 0} val, "
        f"{len(data.test)} test images, {len(data.classes)} classes; evaluating on {eval_name}"
        f"{' with mirror images (--tta)' if args.tta else ''}; crop padding {args.crop_padding}, "
        f"{args.flip} flips")
    for note in data.notes:          # where the test set came from; files left out
        say(note)
    say(f"device {device}, precision {amp_dtype or 'fp32'}, {world} process(es), global batch "
        f"{args.batch_size}{f' in {args.grad_accum} parts' if args.grad_accum > 1 else ''}, "
        f"{steps_per_epoch} steps/epoch, {args.optimizer} peak lr {lr:.2e}, "
        f"{workers} loader workers")
    if args.compile:   # nothing prints while it compiles: 20 s for cifar_tiny on 2 CPU cores
        say("--compile: the model is compiled at the first training step and again at the first "
            "evaluation, for seconds to minutes each (cached for later runs)")
    if sched["warmup_steps"] > sched["total_steps"]:
        # A preset's warmup with a short --epochs (cifar10-best's 10 epochs of warmup, run for 5):
        # the run would end half-way up the ramp, with no decay, which looks like a bad recipe.
        say(f"note: the warmup (--warmup-epochs {args.warmup_epochs:g}) is longer than the run "
            f"({args.epochs} epoch(s)), so the learning rate only rises and never reaches {lr:.2e}; "
            f"a tenth of the run is usual (--warmup-epochs {args.epochs / 10:g})")
    if args.low_res:
        sizes = [train_size_at(e, cfg.image_size, args.low_res, args.low_res_epochs, cfg.patch_size)
                 for e in range(args.epochs)]
        small = [s for s in sizes if s != cfg.image_size]
        say(f"progressive resizing: the first {len(small)} epoch(s) at {', '.join(map(str, small))} "
            f"pixels, then {cfg.image_size}; evaluation at {cfg.image_size}")

    if args.benchmark:
        return run_benchmark(train_model, model, loader, optimizer, scaler, sched, ctx, args)

    # The run's clock, which a resumed run winds on from where it was saved (part-way into an epoch
    # too, so that the time before a stop counts; older checkpoints kept it only per epoch).
    saved_clock = (resume or {}).get("elapsed_s", history[-1]["elapsed_s"] if history else 0.0)
    run_start = time.time() - saved_clock

    def checkpoint(step):
        rng = dict(cpu=torch.get_rng_state())
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        return dict(config=asdict(cfg), model=model.state_dict(), optimizer=optimizer.state_dict(),
                    ema=ema.model.state_dict() if ema is not None else None,
                    scaler=scaler.state_dict(), epoch=step // steps_per_epoch, step=step,
                    elapsed_s=round(time.time() - run_start, 1),
                    train_images=len(data.train),
                    metrics=history, rng=rng,
                    args=dict(vars(args), dataset=dataset, data_dir=data_dir),
                    data=dict(dataset=dataset, classes=data.classes, mean=mean, std=std))

    def save_part(step, sums):
        """Save part-way into an epoch, with this process's running sums of it, to resume from."""
        if is_main:
            save_checkpoint(dict(checkpoint(step), partial_epoch=sums.cpu()), args.out)

    if args.save_every > 0:
        ctx["save_part"] = save_part
    _, best_path, metrics_path = run_files(args.out)
    # Only the first process writes files. It claims --out and starts the log; the others hear
    # whether it could, so that if it can't (another run is writing there, say), all stop here
    # together instead of the others training on until their first exchange with it fails.
    lock, problem = None, None
    if is_main:
        try:
            lock = start_files(args.out, args.resume, history, say)
        except CheckpointError as e:
            problem = e
    if first_process_failed(problem, device):
        return 1                               # only the other processes get here: the first raised
    previous_handlers = ctx["stop"].install()
    try:
        best_acc = max((h["eval_acc"] for h in history), default=-1.0)
        best_epoch = max((h["epoch"] for h in history if h["eval_acc"] == best_acc), default=0)
        partial = resume.get("partial_epoch") if resume else None   # sums of an interrupted epoch
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch)
            ctx["epoch"] = epoch
            sampler.skip = (step - epoch * steps_per_epoch) * (args.batch_size // world)
            side = train_size_at(epoch, cfg.image_size, args.low_res, args.low_res_epochs, cfg.patch_size)
            ctx["train_size"] = (side, side)
            at = f" at {side}px" if side != cfg.image_size else ""      # said only while shrunk
            ctx["prefix"] = f"epoch {epoch + 1}/{args.epochs}{at}"
            ctx["steps_after"] = (args.epochs - epoch - 1) * steps_per_epoch    # for the progress line
            t0 = time.time()
            # Images of this epoch trained before a resume (every process starts from the saved sums),
            # which this part's time and speed must leave out.
            before = 0 if partial is None else int(partial[2]) * world
            step, sums, stopped = train_one_epoch(train_model, loader, optimizer, scaler, step, sched,
                                                  ctx, partial)
            partial = None
            if step < (epoch + 1) * steps_per_epoch:     # stopped part-way into the epoch
                save_part(step, sums)
                return stopped_by(ctx, step, args.out, say)
            train_time = time.time() - t0
            totals = reduce_sum(sums.clone())            # (loss sum, correct, images) over processes
            train_loss, train_acc, n = check_finite(totals[0].item(), step) / totals[2].item(), \
                totals[1].item() / totals[2].item(), int(totals[2].item())
            eval_loss, eval_acc = evaluate(eval_model, eval_split, ctx)
            # Rounded as the log and the checkpoint's history keep it, so that after a resume an
            # equal accuracy compares as equal (not as a float32's last digits), for the best
            # checkpoint and --patience alike.
            eval_acc = round(eval_acc, 4)
            record = dict(epoch=epoch + 1, step=step, train_loss=round(train_loss, 4),
                          train_acc=round(train_acc, 4), eval_split=eval_name, eval_tta=args.tta,
                          eval_loss=round(eval_loss, 4), eval_acc=eval_acc,
                          lr=lr_at(step - 1, **sched), images_per_s=round((n - before) / train_time, 1),
                          epoch_s=round(time.time() - t0, 1), elapsed_s=round(time.time() - run_start, 1),
                          train_size=side)
            history.append(record)
            pace = record["epoch_s"] * n / (n - before)          # seconds a whole epoch takes now
            epochs_left = args.epochs - epoch - 1
            left = f", {format_time(pace * epochs_left)} to go" if epochs_left else ""
            say(f"epoch {epoch + 1:>3}/{args.epochs}  train loss {train_loss:.3f} acc "
                f"{100 * train_acc:5.2f}%  {eval_label} loss {eval_loss:.3f} acc {100 * eval_acc:5.2f}%  "
                f"lr {record['lr']:.2e}  {record['images_per_s']:.0f} img/s{at}  "
                f"{format_time(record['elapsed_s'])}{left}")
            problem = None
            if is_main:
                try:
                    ckpt = checkpoint(step)
                    save_checkpoint(ckpt, args.out)
                    try:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                    except OSError as e:          # a disk that filled up after the checkpoint
                        raise CheckpointError(f"could not write {metrics_path} ({e.strerror}); "
                                              f"{args.out} was saved and resumes the run") from None
                    if eval_acc > best_acc:       # the best model so far is kept apart from the last
                        save_checkpoint(ckpt, best_path)
                except CheckpointError as e:
                    problem = e
            if first_process_failed(problem, device):   # (a full disk): all stop together; only
                return 1                                 # the others get here, the first raised
            ctx["saved_at"] = time.time()
            if stopped:                                  # the signal came with the epoch's last step
                return stopped_by(ctx, step, args.out, say)
            if eval_acc > best_acc:
                best_acc, best_epoch = eval_acc, epoch + 1
            elif args.patience and epoch + 1 - best_epoch >= args.patience:
                say(f"no better {eval_name} accuracy for {args.patience} epochs: stopping early")
                break
    finally:
        StopRequest.restore(previous_handlers)
        release_out(lock)

    if world > 1:
        say(check_same_weights(model, world))
    if data.val is not None:   # the test set, reported once at the end, never looked at before
        test_loss, test_acc = evaluate(eval_model, data.test, ctx)
        say(f"test loss {test_loss:.4f}  test accuracy {100 * test_acc:.2f}%")
    say(f"saved {args.out}, {best_path} (best {eval_name} accuracy {100 * best_acc:.2f}%, epoch "
        f"{best_epoch}) and {metrics_path} ({format_time(time.time() - run_start)} in all); to draw what it "
        f"learned: python visualize.py --ckpt {args.out}")
    return 0


# Dense bf16 matrix peaks from the vendors' data sheets (FLOP/s), for the MFU of --benchmark.
# The first key found in the device's name wins, so the PCIe H100 (a lower peak) comes before "H100".
GPU_PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_peak(device, dtype):
    """(FLOP/s, how it was found): a data-sheet figure for known GPUs, else a large matmul timed now."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_BF16.items():
            if key in name and dtype == torch.bfloat16:
                return flops, f"{name} bf16 data sheet"
    a = torch.randn(2048, 2048, device=device, dtype=dtype or torch.float32)
    a @ a
    sync(device)
    t = time.perf_counter()
    for _ in range(5):
        a @ a
    sync(device)
    return 5 * 2 * 2048 ** 3 / (time.perf_counter() - t), f"a 2048x2048 {a.dtype} matmul timed now"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def run_benchmark(train_model, model, loader, optimizer, scaler, sched, ctx, args, steps=200):
    """Speed of the loader alone, the model alone and both together, and the share of the device's
    peak the model achieves (MFU). Nothing is saved: the weights are trained on and thrown away."""
    device, per_step = ctx["device"], args.batch_size // ctx["world"]
    ctx["prefix"], ctx["stop"].signal = "benchmark", None

    def timed(fn, n):
        fn(min(n, 10))                         # warm up (and let torch.compile compile)
        sync(device)
        t = time.perf_counter()
        fn(n)
        sync(device)
        return n * per_step / (time.perf_counter() - t)

    def loader_only(n):
        it = iter(loader)
        for _ in range(n):
            try:
                images = next(it)[0]
            except StopIteration:
                it = iter(loader)
                images = next(it)[0]
            images.to(device, non_blocking=True)

    one = [next(iter(loader))] * 1000

    def model_only(n):                         # the same batch again and again: no loading at all
        train_one_epoch(train_model, one[:n], optimizer, scaler, 0, sched, ctx)

    def training(n):
        train_one_epoch(train_model, FirstBatches(loader, n), optimizer, scaler, 0, sched, ctx)

    n = min(steps, len(loader))
    loader_ips = timed(loader_only, n)
    model_ips = timed(model_only, n)
    train_ips = timed(training, n)
    flops = 3 * vit.forward_flops(model.cfg)   # forward + backward per image
    peak, source = device_peak(device, pick_precision(args.precision, device))
    print(f"benchmark on {device}, batch {args.batch_size}, {n} steps each:")
    print(f"  training (loader + model)  {train_ips:9.0f} images/s")
    print(f"  data loader alone          {loader_ips:9.0f} images/s")
    print(f"  model alone (one batch)    {model_ips:9.0f} images/s   {flops / 1e6:.1f} MFLOP per image "
          f"trained")
    print(f"  model FLOP/s               {model_ips * flops / 1e9:9.1f} GFLOP/s = {100 * model_ips * flops / peak:.1f}% "
          f"of {peak / 1e9:.0f} GFLOP/s ({source})")
    return 0


class FirstBatches:
    """The first n batches of a loader, loaded as they are used, like the loader itself."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n

    def __len__(self):
        return self.n

    def __iter__(self):
        return itertools.islice(self.loader, self.n)


def stopped_by(ctx, step, out, say):
    say(f"stopped by {ctx['stop'].signal} at step {step}; saved {out}. Continue with: "
        f"python train.py --resume {out}")
    return 128 + getattr(signal, ctx["stop"].signal)      # the shell's convention for "killed by"


def resumed_args(args, ckpt, say, given):
    """The saved run's settings, with the flags `given` on this command line on top."""
    if "out" not in given and args.resume.endswith(".best.pt"):
        # A resumed run goes on in the file it was resumed from, but not in a run's best
        # checkpoint, which its later epochs would overwrite with worse ones.
        ext = os.path.splitext(ckpt.get("args", {}).get("out") or "model.pt")[1]   # .pt, .pth or none
        run = args.resume[:-len(".best.pt")] + ext
        raise ValueError(f"{args.resume} is the best checkpoint of the run in {run}, and a resumed run "
                         f"writes where it was read: continue that run with --resume {run}, or go on "
                         f"from its best epoch into another file with --resume {args.resume} --out "
                         f"another.pt")
    saved = ckpt.get("args", {})
    defaults = vars(get_parser().parse_args([]))
    typed = {k: getattr(args, k) for k in given}
    changed = {k: v for k, v in typed.items() if k in saved and saved[k] != v
               and k not in ("resume", "out", "device", "workers")}
    # How a run started can't change once it has: these would be recorded, but change nothing
    # (the model and its weights come from the checkpoint), or break the optimizer's state.
    started = [f"--{k.replace('_', '-')}" for k in ("preset", "model", "pretrained", "weights", "head_only",
                                                    "pos_init", "patch_init", "attn_init") if k in changed]
    if started:
        raise ValueError(f"{', '.join(started)}: how {args.resume} started can't change on resume; drop "
                         f"{'it' if len(started) == 1 else 'them'}, or start a new run from its weights "
                         f"with --pretrained {args.resume}")
    if "batch_size" in changed:
        raise ValueError(f"--batch-size {args.batch_size}: {args.resume} was trained with batch "
                         f"{saved['batch_size']}, and a resumed run keeps it (where it stopped and its "
                         f"learning-rate schedule are counted in steps of that batch); drop --batch-size")
    if changed:
        say("changed on resume: " + ", ".join(f"{k}={v} (was {saved[k]})" for k, v in changed.items()))
    if "no_flip" in saved:           # a checkpoint from before --flip: it flipped at random, or not
        saved = dict(saved, flip="none" if saved["no_flip"] else "random")
    merged = {**defaults, **{k: v for k, v in saved.items() if k in defaults}, **typed}
    if "out" not in typed:            # a resumed run goes on in the file it was resumed from
        merged["out"] = args.resume
    return argparse.Namespace(**merged)


def check_same_weights(model, world):
    """DDP keeps the processes' weights equal by averaging gradients; check that it did."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if torch.equal(lo, hi):
        return f"weights identical in all {world} processes"
    return f"warning: weights differ between processes (by up to {(hi - lo).abs().max().item():.2e})"


def check_args(args, world, given):
    # argparse's float() accepts "nan" and "inf", which pass every comparison below unnoticed
    # (nan < 0 is False) and would quietly turn a flag off or fail deep inside.
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        # An empty path, typed (a script's unset variable, say), would read as no flag at all:
        # --resume "" started a new run, --data-dir "" read ./data.
        if name in given and value == "":
            raise ValueError(f"--{name.replace('_', '-')} is empty; give it a value, or leave it out")
    if args.batch_size <= 0 or args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be positive" + (
            f" and divisible by the {world} processes (it is the global batch)" if world > 1 else ""))
    if args.grad_accum <= 0 or (args.batch_size // world) % args.grad_accum:
        raise ValueError(f"--grad-accum {args.grad_accum} must be positive and divide the batch of "
                         f"each process ({args.batch_size // world})")
    # Each number's range, so that a value outside it is named in one sentence, not found as a
    # traceback deep inside (a negative --crop-padding) or as a quietly wrong run (a negative
    # --min-lr ends the cosine below zero, where the optimizer climbs the loss instead).
    ranges = {
        "epochs": (args.epochs >= 1, "at least 1"),
        "lr": (args.lr >= 0, "0 or more"),
        "min_lr": (args.min_lr >= 0, "0 or more"),
        "weight_decay": (args.weight_decay >= 0, "0 or more"),
        "warmup_epochs": (args.warmup_epochs >= 0, "0 or more"),
        "grad_clip": (args.grad_clip >= 0, "0 or more (0 turns clipping off)"),
        "patience": (args.patience >= 0, "0 or more (0 never stops early)"),
        "save_every": (args.save_every >= 0, "0 or more minutes (0 saves at the ends of epochs only)"),
        "workers": (args.workers is None or args.workers >= 0,
                    "0 or more (0 loads in the training process)"),
        "crop_padding": (args.crop_padding >= 0, "0 or more (0 turns the random crop off)"),
        "label_smoothing": (0 <= args.label_smoothing < 1, "in [0, 1)"),
        "ema": (0 <= args.ema < 1, "in [0, 1) (0 turns it off)"),
        "repeat_aug": (args.repeat_aug >= 1, "at least 1 (1 turns it off)"),
        "mixup": (args.mixup >= 0, "0 or more (0 turns it off)"),
        "cutmix": (args.cutmix >= 0, "0 or more (0 turns it off)"),
        "random_erasing": (0 <= args.random_erasing <= 1, "a probability, in [0, 1]"),
        # a negative fraction had been read as none at all: no validation set, without a word
        "val_split": (0 <= args.val_split < 1, "a fraction of the training set, in [0, 1) (0 "
                                               "evaluates on the test set)"),
    }
    for name, (ok, rule) in ranges.items():
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(args, name)}")
    # The schedule clamps --min-lr to --lr (so that a tiny --lr with the default --min-lr still
    # decays); a --min-lr typed above --lr would only have been clamped without a word.
    if "min_lr" in given and args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}: the learning rate would "
                         f"rise where it should decay; give a --min-lr below --lr")
    if args.pretrained and not args.resume and (args.patch_init or args.attn_init):
        raise ValueError("--patch-init and --attn-init choose where training from scratch starts; "
                         "with --pretrained every weight starts from the pretrained model")
    if args.low_res < 0 or args.low_res_epochs < 0 or bool(args.low_res) != bool(args.low_res_epochs):
        raise ValueError("--low-res SIZE and --low-res-epochs N go together, both positive (e.g. "
                         "--low-res 16 --low-res-epochs 3)")
    if args.flip == "alternate" and args.repeat_aug > 1:
        raise ValueError("--flip alternate decides per image and epoch, so the --repeat-aug copies of "
                         "an image would all be mirrored alike; use --flip random with --repeat-aug")
    if args.head_only and not args.pretrained and not args.resume:
        raise ValueError("--head-only trains only the head of a pretrained model: add --pretrained")
    # Flags that mean something only beside another would otherwise be ignored without a word.
    if "ckpt" in given:
        raise ValueError(f"--ckpt names the checkpoint for --eval-only; to go on training it, use "
                         f"--resume {args.ckpt}")
    if "weights" in given and not args.pretrained:
        raise ValueError("--weights picks the weights of a --pretrained model; give --pretrained too")
    if args.pretrained and not args.resume and "model" in given:
        raise ValueError(f"--model {args.model} and --pretrained {args.pretrained} both name the "
                         f"model; drop --model (the pretrained weights come with their shape)")
    if args.pretrained and not args.resume and "weights" in given and args.pretrained not in TORCHVISION_VITS:
        raise ValueError(f"--weights picks one of torchvision's sets of weights, and --pretrained "
                         f"{args.pretrained} is a checkpoint of ours; drop --weights")


def run_eval_only(args, given):
    if not args.ckpt:
        raise ValueError("--eval-only needs --ckpt PATH, the checkpoint to evaluate")
    # Training flags given with --eval-only change nothing; saying so beats leaving it unsaid.
    ignored = sorted(given - {"eval_only", "ckpt", "device", "image_size", "dataset", "data_dir",
                              "precision", "tta"})
    if ignored:
        print(f"--eval-only ignores {', '.join('--' + k.replace('_', '-') for k in ignored)} "
              f"(training flags)")
    ckpt = load_checkpoint(args.ckpt)
    device = pick_device(args.device)
    model = model_from_checkpoint(ckpt)
    if args.image_size and args.image_size != model.cfg.image_size:
        model.set_image_size(args.image_size)    # evaluate at another resolution (Sec. 3.2)
    model = model.to(device)
    cfg = model.cfg
    info = ckpt.get("data", {})
    dataset = args.dataset or info.get("dataset", "cifar10")
    data = checkpoint_data(args, ckpt, dataset, cfg)
    amp_dtype = pick_precision(args.precision, device)
    ctx = dict(device=device, rank=0, world=1, input_size=cfg.input_size,
               mean=info.get("mean", data.mean), std=info.get("std", data.std),
               autocast=autocast_for(device, amp_dtype), tta=args.tta)
    loss, acc = evaluate(model, data.test, ctx)
    print(f"{args.ckpt}: {num_params(model) / 1e6:.2f}M parameters, trained to {trained_to(ckpt)} "
          f"on {info.get('dataset', '?')}; evaluated on {len(data.test)} {dataset} test images "
          f"at {cfg.image_size}x{cfg.image_size}{', each with its mirror image (--tta)' if args.tta else ''}")
    print(f"test loss {loss:.4f}  test accuracy {100 * acc:.2f}%")
    return 0


def check_writable(path):
    """Fail now, not after an hour of training, if the checkpoint can't be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.basename(path):      # runs, or runs/ not made yet
        raise ValueError(f"--out {path} is a folder; give a file name, e.g. {os.path.join(path, 'model.pt')}")
    if not os.path.isdir(folder):            # --out runs/vit.pt: the folder is made, as visualize's is
        try:
            os.makedirs(folder, exist_ok=True)   # (exist_ok: torchrun's processes all get here)
        except OSError as e:
            raise ValueError(f"--out {path}: can't make the folder {folder} "
                             f"({e.strerror or type(e).__name__})") from None
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"--out {path} can't be written (no permission); choose another --out")
    # Permission bits alone don't tell (root passes every check, and some folders refuse files
    # whatever their bits say), so write a file where the checkpoint will go, and remove it; the
    # process id keeps the files of several processes (torchrun) apart.
    probe = f"{path}.{os.getpid()}.tmp"
    try:
        open(probe, "wb").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out {path} can't be written ({e.strerror or type(e).__name__}); "
                         f"choose another --out") from None


def run_files(out):
    """The files of a run written to `out`: model.pt, model.best.pt and model.metrics.jsonl."""
    base = os.path.splitext(out)[0]
    return out, base + ".best.pt", base + ".metrics.jsonl"


def claim_out(out):
    """Lock `<out>.lock` while this run writes its files; if another run holds it, say so and stop.

    Two runs given the same --out (a second terminal, the same command with another flag) would
    otherwise rename each other's files to _prev, save over each other's checkpoint in turn and mix
    their epochs in one log. The operating system lets go of the lock when the process ends, however
    it ends, so a run that crashed or was killed leaves no stale lock behind (at most the
    small file, with its process id, which the next run takes over).
    """
    lock = open(out + ".lock", "a+")
    try:
        import fcntl
    except ImportError:                     # Windows has no flock: runs there go unguarded
        return lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if not isinstance(e, BlockingIOError):  # a file system without locks (some network ones):
            return lock                         # unguarded, rather than refused for no reason
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        raise CheckpointError(f"another run{f' (process {holder})' if holder else ''} is writing {out} "
                              f"now; let it finish, or give this one another --out") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))            # for the message above, in the run that finds it held
    lock.flush()
    return lock


def release_out(lock):
    """Let go of claim_out's lock, and remove its file."""
    if lock is not None:
        lock.close()
        try:
            os.remove(lock.name)
        except OSError:
            pass


def start_files(out, resumed_from, history, say):
    """Claim `out` for this run (claim_out) and start its metrics log; returns the lock."""
    lock = claim_out(out)
    try:
        if not (resumed_from and os.path.abspath(resumed_from) == os.path.abspath(out)):
            # A new run (or one resumed into another --out) starts its own checkpoint, best
            # checkpoint and log. Those of an earlier run at this --out are kept once, as
            # <name>_prev.*, so that a quick trial with the default --out can't wipe out the hours
            # of training saved there.
            keep_earlier_run(out, say)
        # The log starts as the checkpoint's history (empty for a new run), so that it always
        # matches the checkpoint, whichever one the run was resumed from.
        with open(run_files(out)[2], "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in history)
    except OSError as e:
        release_out(lock)
        raise CheckpointError(f"could not write {e.filename} ({e.strerror}); choose another --out") from None
    return lock


def keep_earlier_run(out, say):
    """Rename the files of an earlier run at `out` to <name>_prev.*, replacing an older such set."""
    base, ext = os.path.splitext(out)
    files, prev = run_files(out), run_files(base + "_prev" + ext)   # model_prev.pt, model_prev.best.pt, ...
    kept = [(f, p) for f, p in zip(files, prev) if os.path.isfile(f) and os.path.getsize(f) > 0]
    if not kept:
        return
    for p in prev:                           # one earlier run's files, never two runs' mixed
        if os.path.exists(p):
            os.remove(p)
    for f, p in kept:
        os.replace(f, p)
    say(f"{out} held an earlier run; kept it as {', '.join(p for f, p in kept)} (--resume "
        f"{prev[0]} continues it)")


def checkpoint_data(args, ckpt, dataset, cfg):
    """The data to evaluate or draw a checkpoint on: from --data-dir, or from where it trained."""
    data_dir = args.data_dir or ckpt.get("args", {}).get("data_dir", "./data")
    try:
        data = datasets.load_data(dataset, data_dir, cfg.image_size)
    except DataError as e:
        if args.data_dir:
            raise
        # The saved folder is as training was given it, often relative to where training ran.
        raise DataError(f"{e} ({data_dir} is where {args.ckpt} was trained from; say where the "
                        f"data is now with --data-dir)") from None
    check_classes(args.ckpt, ckpt, cfg.num_classes, data, data_dir)
    return data


def check_classes(path, ckpt, num_classes, data, data_dir):
    """Refuse images of other classes than the model learned, to evaluate, draw or resume on: with
    labels numbered by another list of classes, every accuracy and picture would be wrong, and
    nothing would show it."""
    saved = ckpt.get("data", {}).get("classes")
    if len(data.classes) != num_classes or (saved and list(saved) != list(data.classes)):
        names = lambda c: ", ".join(c[:3]) + (", ..." if len(c) > 3 else "")
        learned = f" ({names(saved)})" if saved else ""
        raise CheckpointError(f"{path} was trained on {num_classes} classes{learned}, but the images "
                              f"in {data_dir} are of {len(data.classes)} ({names(data.classes)}); "
                              f"give it images of the classes it learned")


def check_compile(device):
    """Fail now, in one sentence, if torch.compile can't work here.

    PyTorch compiles lazily, at the first step, and a machine without the tools it builds kernels
    with (a C++ compiler for the CPU, Triton for a GPU) would stop there with a long traceback. A
    one-line function compiled now finds that out in seconds, most of which the real compile would
    spend anyway.
    """
    if device.type == "cpu":
        # A CUDA build of torch compiling for the CPU warns "No CUDA runtime is found" while it looks
        # for its C++ tools: true, harmless, and confusing in a training log.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(2, device=device))
    except Exception as e:
        # The message starts with "backend='inductor' raised:"; the line after it says what failed.
        reason = next((line for line in str(e).splitlines() if line.strip() and
                       not line.endswith("raised:")), type(e).__name__)
        raise ValueError(f"--compile: torch.compile does not work on this machine ({reason}); "
                         f"train without --compile (--no-compile when resuming), or install what it "
                         f"needs (a C++ compiler such as g++ or clang for the CPU, Triton for a "
                         f"GPU)") from None


def format_time(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


if __name__ == "__main__":
    code = main() or 0
    if "RANK" in os.environ:
        # Under torchrun with gloo (the CPU backend), PyTorch 2.14 sometimes aborts a process while
        # Python shuts down after a DDP run ("terminate called without an active exception": gloo's
        # threads still hold tensors when the interpreter is torn down), and torchrun then reports
        # the whole run as failed although everything was saved. Leaving without that teardown
        # avoids it; every file is closed by now, and only the printed output needs flushing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
