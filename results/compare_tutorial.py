"""Ours against a tutorial's ViT: the script behind the tutorial comparisons in README's Speed section.

The yardstick is the ViT of a typical educational codebase: 48 wide, 4 blocks of 4 heads, MLP 4x,
patches of 4 (0.12M parameters, the same as ours at that shape), written as tutorials write it:
one qkv Linear, softmax(Q K^T / sqrt(d)) V spelled out, GELU by its tanh formula. Its pipeline
decodes and augments each image with PIL in 2 loader workers.

    python results/compare_tutorial.py steps        # training steps: ours, the tutorial's, torchvision's
    python results/compare_tutorial.py steps --pool mean    # ours classifying the mean token instead
    python results/compare_tutorial.py epoch --data-dir data/cifar10-jpeg    # the tutorial pipeline

`steps` times training steps on one random batch of 32, the models taking turns in one process, and
prints the median of the rounds, so that the machine's drift hits all of them alike. Ours classifies
a class token there, as the tutorial's does; `--pool mean` times it as cifar_tiny is by default,
with the mean of 64 patch tokens and no 65th token. `epoch` runs the tutorial's whole pipeline
(start, one epoch, a test evaluation); time ours beside it with
    time python train.py --dataset folder --data-dir data/cifar10-jpeg --epochs 1 --batch-size 32 \
        --dim 48 --depth 4 --heads 4 --mlp-ratio 4 --pool cls

Letters in shape comments: B batch, N tokens (1 + 64), D width 48, H heads, d = D / H.
"""

import argparse
import math
import os
import statistics
import sys
import time

STARTED = time.time()                              # before torch's import, which takes a second

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)                           # vit.py and train.py live one folder up
import train  # noqa: E402
import vit  # noqa: E402

# The shape of the comparison, ours as flags. The tutorial classifies a class token, so ours does too
# here (cifar_tiny's own default is the mean token): the same 65 tokens, the same parameters.
SHAPE = dict(dim=48, depth=4, heads=4, mlp_ratio=4.0, pool="cls")


# --------------------------------------------------------------------------------------------------
# The tutorial's model, as such codebases write it (and not as we would: that is the point)


class TutorialAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                                   # (B, N, D)
        B, N, D = x.shape
        d = D // self.heads
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, d).permute(2, 0, 3, 1, 4)   # 3 x (B, H, N, d)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)       # (B, H, N, N)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, D))              # (B, N, D)


class TanhGELU(nn.Module):
    """GELU by the tanh approximation of the BERT and GPT code, as many tutorials copy it."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class TutorialBlock(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = TutorialAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), TanhGELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TutorialViT(nn.Module):
    def __init__(self, dim=48, depth=4, heads=4, mlp_ratio=4, patch=4, image=32, classes=10):
        super().__init__()
        n = (image // patch) ** 2
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(TutorialBlock(dim, heads, int(dim * mlp_ratio)) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images):                                              # (B, 3, 32, 32)
        x = self.patch(images).flatten(2).transpose(1, 2)                   # (B, N - 1, D)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos   # (B, N, D)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])                                # (B, classes)


# --------------------------------------------------------------------------------------------------
# Training steps, side by side


def step_rates(rounds=7, steps=40, batch=32, shapes=(), pool="cls"):
    """Median training images/s of each model over `rounds`, each round `steps` steps of each in turn.

    Every model gets the same step as train.py's default recipe would give it: label smoothing 0.1,
    gradient clipping at 1, then its optimizer. AdamW is the fused one for all; "ours" also runs
    with Muon, our default, whose orthogonalisation is extra work per step. `shapes` adds our model,
    with Muon, at other shapes, each (dim, depth, heads, mlp_ratio). `pool` is how "ours" classifies
    at the tutorial's shape: "cls", a class token as the tutorial's (65 tokens), or "mean", the
    mean token that cifar_tiny classifies by default (64 tokens).
    """
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)                                       # (B, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    cpu = torch.device("cpu")
    ours = dict(SHAPE, pool=pool)
    models = {
        "ours, AdamW": vit.build_model("cifar_tiny", **ours),
        "ours, Muon (default)": vit.build_model("cifar_tiny", **ours),
        "tutorial, AdamW": TutorialViT(),
        "torchvision, AdamW": VisionTransformer(32, 4, num_layers=4, num_heads=4, hidden_dim=48,
                                                mlp_dim=192, num_classes=10),
    }
    for dim, depth, heads, mlp in shapes:
        models[f"ours {dim}/{depth}/{heads}/{mlp:g}, Muon"] = vit.build_model(
            "cifar_tiny", dim=dim, depth=depth, heads=heads, mlp_ratio=mlp)

    def stepper(name, model):
        optimizer = train.make_optimizer(model, 1e-4, 0.05, cpu, "muon" if "Muon" in name else "adamw")

        def run(n):
            for _ in range(n):
                F.cross_entropy(model(x), y, label_smoothing=0.1).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return run

    runs = {name: stepper(name, m) for name, m in models.items()}
    for run in runs.values():
        run(min(steps, 10))                        # warm up: first calls allocate and pick kernels
    rates = {name: [] for name in runs}
    for r in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run(steps)
            rates[name].append(batch * steps / (time.perf_counter() - start))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.0f}" for n, v in rates.items()),
              flush=True)
    params = {name: vit.num_params(m) for name, m in models.items()}
    return {name: statistics.median(v) for name, v in rates.items()}, params


# --------------------------------------------------------------------------------------------------
# The tutorial's pipeline, end to end


def tutorial_epochs(data_dir, epochs=1, workers=2):
    """Train TutorialViT as its codebase would: ImageFolder, PIL crop (padding 4) and flip, a
    constant AdamW 1e-3, a test evaluation after each epoch. Returns the last test accuracy."""
    from torchvision import datasets, transforms as T

    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(data_dir, split)):
            sys.exit(f"error: no {split}/ folder in {data_dir} (expected {data_dir}/{split}/<class>/*.jpg)")
    # CIFAR-10's usual channel statistics, as tutorials hard-code them.
    norm = T.Normalize((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
    augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    train_set = datasets.ImageFolder(os.path.join(data_dir, "train"), augment)
    test_set = datasets.ImageFolder(os.path.join(data_dir, "test"), T.Compose([T.ToTensor(), norm]))
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=32, shuffle=True, num_workers=workers)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=32, num_workers=workers)
    model = TutorialViT(classes=len(train_set.classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    for epoch in range(epochs):
        model.train()
        for images, labels in train_loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in test_loader:
                correct += (model(images).argmax(1) == labels).sum().item()
        accuracy = correct / len(test_set)
        print(f"tutorial pipeline, epoch {epoch + 1}/{epochs}: test accuracy {100 * accuracy:.2f}%, "
              f"{time.time() - STARTED:.1f} s since the script started", flush=True)
    return accuracy


def shape(text):
    """ "64/6/2/3" -> (64, 6, 2, 3.0): width, depth, heads, MLP ratio, checked like train.py's flags."""
    try:
        dim, depth, heads, mlp = text.split("/")
        value = int(dim), int(depth), int(heads), float(mlp)
        vit.ViTConfig(dim=value[0], depth=value[1], heads=value[2], mlp_ratio=value[3])
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTH/DEPTH/HEADS/MLP_RATIO such as 64/6/2/3 "
                                         f"({e})") from None
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("steps", "epoch"), help="time training steps, or run the "
                        "tutorial's pipeline end to end")
    parser.add_argument("--rounds", type=int, default=7, help="steps: rounds of the models in turn (default: 7)")
    parser.add_argument("--steps", type=int, default=40, help="steps: steps per model per round (default: 40)")
    parser.add_argument("--shapes", nargs="*", type=shape, default=[], metavar="D/L/H/M", help="steps: also time "
                        "our model with Muon at these shapes, width/depth/heads/MLP ratio (e.g. 64/6/2/3)")
    parser.add_argument("--pool", choices=("cls", "mean"), default="cls", help="steps: ours classifies "
                        "a class token, as the tutorial's does (cls, 65 tokens, the default), or the mean "
                        "token, as cifar_tiny does by default (mean, 64 tokens)")
    parser.add_argument("--data-dir", default="data/cifar10-jpeg", help="epoch: an image folder with "
                        "train/ and test/ (default: data/cifar10-jpeg)")
    parser.add_argument("--epochs", type=int, default=1, help="epoch: how many (default: 1)")
    parser.add_argument("--workers", type=int, default=2, help="epoch: loader processes (default: 2)")
    args = parser.parse_args(argv)
    if min(args.rounds, args.steps, args.epochs) < 1 or args.workers < 0:
        parser.error("--rounds, --steps and --epochs must be at least 1, --workers at least 0")
    if args.what == "steps":
        rates, params = step_rates(args.rounds, args.steps, shapes=args.shapes, pool=args.pool)
        base = rates["tutorial, AdamW"]
        print(f"median of {args.rounds} rounds, batch 32, {torch.get_num_threads()} threads:")
        for name, rate in rates.items():
            print(f"  {name:28s} {params[name] / 1e6:.3f}M parameters  {rate:6.0f} img/s  "
                  f"{rate / base:.2f}x the tutorial's")
    else:
        tutorial_epochs(args.data_dir, args.epochs, args.workers)


if __name__ == "__main__":
    main()
