"""Pictures of what a trained ViT does: attention maps, rollout, the paper's Figure 7, curves and more.

    python visualize.py --ckpt model.pt                      # every picture, into model_vis/
    python visualize.py --ckpt model.pt --images a.jpg b.png --only attention,rollout

The model is rebuilt from the checkpoint alone, and attention comes from `model(x, return_attention=True)`
(vit.py), so this works the same for a model fine-tuned from torchvision's weights. Drawing uses PIL and
torchvision.utils only.

What each picture shows, and the paper's section it comes from:
    attention        the class token's attention to every patch, per head (Sec. 4.5, Fig. 6); a
                     model that pools the mean token (cifar_tiny) has none, so: the mean attention
                     each patch receives
    rollout          attention rolled out through all layers (Abnar & Zuidema 2020; the paper's Fig. 6)
    figure7_*        Fig. 7: patch-embedding filters, position-embedding similarity, attention distance
    curves           loss and accuracy per epoch, from the checkpoint's metrics history
    predictions      test images with predicted and true labels; confusion: the confusion matrix
    cls_embeddings   the class token's (or mean token's) final state for many images, projected
                     to 2-D (PCA)
    token_norms      how large each patch token is before and after chosen blocks; attention_layers.gif
                     steps through the layers of the class-token attention for one image
    augmentation     training images as the model saw them, beside the originals

Letters in shape comments: B images, h heads, N tokens, G_h/G_w patch grid, D width, L layers, K classes.
"""

import argparse
import math
import os
import signal
import sys

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms import v2
from torchvision.utils import make_grid

import data as datasets
from data import DataError
from train import (CheckpointError, checkpoint_data, load_checkpoint, model_from_checkpoint, pick_device,
                   trained_to)

PICTURES = ("attention", "rollout", "figure7", "curves", "predictions", "cls_embeddings", "blocks",
            "augmentation")
TILE = 96           # pixels per image tile: 32x32 CIFAR images are too small to see attention on
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


# --------------------------------------------------------------------------------------------------
# The maths: what each picture computes. These are tested in test_vit.py.


def cls_attention(attn, grid):
    """(B, h, N, N) attention of one layer -> (B, h, G_h, G_w): how much the class token looks at each
    patch. Models without a class token (pool="mean") get the mean attention each patch receives."""
    B, h, N, _ = attn.shape
    n_patches = grid[0] * grid[1]
    if N == n_patches + 1:
        a = attn[:, :, 0, 1:]                  # (B, h, G): row of the class token, its own column dropped
    else:
        a = attn.mean(dim=2)                   # (B, h, G): column means, attention received
    return a.reshape(B, h, *grid)


def rollout(maps, head_fusion="mean", discard_ratio=0.0):
    """Attention rollout (Abnar & Zuidema, 2020): how much each token's final state draws on each input.

    A block's output is its input (the residual path) plus attention, so layer l mixes tokens by
    A_l = fused attention + I, rows renormalised to sum to 1. Following the mixing through all layers
    multiplies these: R = A_L ... A_2 A_1. Rows of R sum to 1 too.
    maps: list of (B, h, N, N) -> (B, N, N)
    """
    fuse = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}[head_fusion]
    result = None
    for attn in maps:
        a = fuse(attn)                                          # (B, N, N)
        if discard_ratio > 0:
            # Drop the weakest links of each row, which are mostly noise, to make the paths clearer.
            k = int(a.shape[-1] * discard_ratio)
            if k > 0:
                weakest = a.topk(k, dim=-1, largest=False).indices
                a = a.scatter(-1, weakest, 0.0)
        a = a + torch.eye(a.shape[-1], device=a.device)          # the residual connection
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result            # (B, N, N)
    return result


def mean_attention_distance(attn, grid, patch_size):
    """(B, h, N, N) -> (h,): for each head, the mean image-space distance (pixels) between a patch and
    the patches it attends to, weighted by attention (the paper's Fig. 7, right; its "receptive field
    size"). Attention to the class token is left out and the rest renormalised, so every row is a
    proper weighted average over patches."""
    G_h, G_w = grid
    n = G_h * G_w
    a = attn[..., -n:, -n:]                                     # (B, h, G, G): patches to patches
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
    rows = torch.arange(G_h, device=a.device).repeat_interleave(G_w)
    cols = torch.arange(G_w, device=a.device).repeat(G_h)
    pos = torch.stack([rows, cols], 1).float() * patch_size     # (G, 2): pixel position of each patch
    dist = torch.cdist(pos, pos)                                # (G, G)
    return (a * dist).sum(-1).mean(dim=(0, 2))                  # (h,)


def position_similarity(pos_embed, grid):
    """Cosine similarity of every patch's position embedding with every other: (G_h, G_w, G_h, G_w).
    [i, j] is the map for the patch at row i, column j (the paper's Fig. 7, centre)."""
    p = pos_embed[0, -grid[0] * grid[1]:]                       # (G, D): drop the class token's
    p = F.normalize(p, dim=-1)
    return (p @ p.T).reshape(*grid, *grid)


def filter_components(patch_weight, k=28):
    """The first k principal components of the patch-embedding filters (the paper's Fig. 7, left).
    (D, C, P, P) -> (k, C, P, P), each scaled to [0, 1] for display."""
    D = patch_weight.shape[0]
    w = patch_weight.flatten(1).float()                         # (D, C*P*P): one row per filter
    w = w - w.mean(0, keepdim=True)
    _, _, V = torch.linalg.svd(w, full_matrices=False)          # rows of V: principal directions
    comps = V[:min(k, V.shape[0], D)].reshape(-1, *patch_weight.shape[1:])
    lo = comps.flatten(1).amin(1).view(-1, 1, 1, 1)
    hi = comps.flatten(1).amax(1).view(-1, 1, 1, 1)
    return (comps - lo) / (hi - lo).clamp_min(1e-12)


# --------------------------------------------------------------------------------------------------
# Drawing helpers (PIL)


def font(size=12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:                  # Pillow before 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def colormap(x):
    """Values in [0, 1], (H, W) -> (3, H, W) in [0, 1]: dark blue, through red, to yellow."""
    stops = torch.tensor([[0.05, 0.03, 0.25], [0.45, 0.05, 0.55], [0.85, 0.25, 0.25],
                          [0.98, 0.65, 0.05], [1.0, 1.0, 0.6]])
    pos = x.clamp(0, 1) * (len(stops) - 1)
    i = pos.floor().long().clamp(max=len(stops) - 2)
    t = (pos - i).unsqueeze(-1)
    return ((1 - t) * stops[i] + t * stops[i + 1]).permute(2, 0, 1)


def heat_tile(values, image=None, size=None, mode="bilinear"):
    """A (G_h, G_w) map scaled to its own [min, max], upsampled, coloured, laid over an image."""
    size = size or TILE
    v = values.float()
    v = (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12)
    h, w = size_of(values.shape, size)
    v = F.interpolate(v[None, None], size=(h, w), mode=mode)[0, 0]
    heat = colormap(v)                                         # (3, h, w)
    if image is None:
        return heat
    return 0.45 * image_tile(image, size) + 0.55 * heat


def image_tile(image, size=None):
    """uint8 (3, H, W) -> float (3, h, w) in [0, 1], enlarged for display."""
    size = size or TILE
    h, w = size_of(image.shape[-2:], size)
    return F.interpolate(image[None].float() / 255, size=(h, w), mode="bicubic",
                         align_corners=False)[0].clamp(0, 1)


def size_of(shape, size):
    """Keep the aspect ratio of a (height, width) shape, with the width equal to `size`."""
    return max(1, round(size * shape[0] / shape[1])), size


def image_files(paths):
    """--images as given, a folder standing for the images in it (sorted by name)."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += [os.path.join(p, f) for f in sorted(os.listdir(p))
                      if datasets.is_image_name(f)]
        elif os.path.exists(p):
            files.append(p)
        else:
            raise DataError(f"--images: {p} does not exist")
    return files


def to_pil(t):
    return Image.fromarray((t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def grid_picture(rows, row_labels=None, col_labels=None, title=None, label_colors=None):
    """rows: list of lists of (3, h, w) tiles -> PIL image with labels around the grid."""
    ncol = len(rows[0])
    tiles = [t for row in rows for t in row]
    g = to_pil(make_grid(torch.stack(tiles), nrow=ncol, padding=2, pad_value=1.0))
    th, tw = tiles[0].shape[1:]
    # The label column as wide as its longest line, from 150 to 300 pixels; longer lines are cut.
    lines = [line for text in row_labels or [] for line in text.split("\n")]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max((measure.textlength(line, font=font(12)) for line in lines), default=0)
    left = min(300, max(150, int(widest) + 10)) if row_labels else 0
    top = (22 if title else 0) + (18 if col_labels else 0)
    canvas = Image.new("RGB", (g.width + left, g.height + top), "white")
    canvas.paste(g, (left, top))
    d = ImageDraw.Draw(canvas)
    if title:
        d.text((4, 3), title, fill="black", font=font(14))
    for j, text in enumerate(col_labels or []):
        d.text((left + 2 + j * (tw + 2), top - 16), text, fill="black", font=font(11))
    for i, text in enumerate(row_labels or []):
        color = (label_colors or {}).get(i, "black")
        for k, line in enumerate(text.split("\n")):
            d.text((4, top + 4 + i * (th + 2) + 14 * k), fit_text(d, line, left - 10, font(12)),
                   fill=color, font=font(12))
    return canvas


def fit_text(draw, text, width, f):
    """`text`, cut short with an ellipsis where it is wider than `width` pixels in font `f`."""
    if draw.textlength(text, font=f) <= width:
        return text
    while text and draw.textlength(text + "…", font=f) > width:
        text = text[:-1]
    return text + "…"


def round_ticks(lo, hi, count=5):
    """About `count` tick values inside [lo, hi], spaced 1, 2, 2.5 or 5 times a power of ten, as a person
    labels an axis (0.4, 0.5, 0.6 rather than 0.346, 0.441, 0.537)."""
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 2.5, 5, 10)), key=lambda s: abs(math.log(s / raw)))
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


class Plot:
    """A minimal x-y chart drawn with PIL: axes, ticks, labelled series, a legend."""

    def __init__(self, xs, ys, title, xlabel, ylabel, size=(520, 360), y_from_zero=False):
        self.img = Image.new("RGB", size, "white")
        self.d = ImageDraw.Draw(self.img)
        self.x0, self.y0, self.x1, self.y1 = 60, 30, size[0] - 20, size[1] - 45
        self.xlim = self._limits(xs)
        self.ylim = self._limits(list(ys) + ([0.0] if y_from_zero else []))
        if y_from_zero:
            self.ylim = (0.0, self.ylim[1])
        integer_x = all(float(x).is_integer() for x in xs)
        self.legend = []
        d, f = self.d, font(11)
        d.text((self.x0, 6), title, fill="black", font=font(14))
        d.rectangle([self.x0, self.y0, self.x1, self.y1], outline="black")
        x_ticks = range(int(min(xs)), int(max(xs)) + 1, max(1, round((max(xs) - min(xs)) / 8))) \
            if integer_x else round_ticks(*self.xlim)
        y_ticks = round_ticks(*self.ylim)
        for axis, ticks in (("x", x_ticks), ("y", y_ticks)):
            for v in ticks:
                label = f"{v:.3g}"
                if axis == "x":
                    x = self.px(v, self.ylim[0])[0]
                    d.line([x, self.y1, x, self.y1 + 4], fill="black")
                    d.text((x - 8, self.y1 + 6), label, fill="black", font=f)
                else:
                    y = self.px(self.xlim[0], v)[1]
                    d.line([self.x0 - 4, y, self.x0, y], fill="black")
                    d.line([self.x0 + 1, y, self.x1 - 1, y], fill=(230, 230, 230))
                    d.text((4, y - 6), label, fill="black", font=f)
        d.text(((self.x0 + self.x1) // 2 - 20, size[1] - 18), xlabel, fill="black", font=f)
        d.text((4, 8), ylabel, fill="black", font=f)

    @staticmethod
    def _limits(values):
        lo, hi = min(values), max(values)
        pad = (hi - lo) * 0.05 or abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad

    def px(self, x, y):
        fx = (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0])
        fy = (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
        return self.x0 + fx * (self.x1 - self.x0), self.y1 - fy * (self.y1 - self.y0)

    def line(self, xs, ys, color, label):
        points = [self.px(x, y) for x, y in zip(xs, ys)]
        if len(points) > 1:
            self.d.line(points, fill=color, width=2)
        self.points(xs, ys, color, label, r=2)

    def points(self, xs, ys, color, label=None, r=3):
        for x, y in zip(xs, ys):
            px, py = self.px(x, y)
            self.d.ellipse([px - r, py - r, px + r, py + r], fill=color)
        if label and label not in [l for l, _ in self.legend]:
            self.legend.append((label, color))

    def finish(self, legend_at="top"):
        """The image, with the legend in the top or bottom right corner (wherever the data is not)."""
        top = self.y0 + 3 if legend_at == "top" else self.y1 - 9 - 14 * len(self.legend)
        # As wide as its longest label, up to 40% of the chart; a longer label is cut short.
        widest = max((self.d.textlength(label, font=font(11)) for label, _ in self.legend), default=0)
        text_w = min(int(0.4 * (self.x1 - self.x0)), int(widest))
        x = self.x1 - 22 - text_w                        # the legend's left edge
        if self.legend:
            self.d.rectangle([x - 4, top, self.x1 - 4, top + 6 + 14 * len(self.legend)],
                             fill="white", outline=(200, 200, 200))
        for i, (label, color) in enumerate(self.legend):
            y = top + 3 + 14 * i
            self.d.rectangle([x + 2, y + 2, x + 10, y + 10], fill=color)
            self.d.text((x + 14, y), fit_text(self.d, label, text_w, font(11)), fill="black", font=font(11))
        return self.img


# --------------------------------------------------------------------------------------------------
# The pictures


class Visualizer:
    def __init__(self, model, ckpt, images, labels, classes, mean, std, out_dir, args, many=None):
        self.model, self.ckpt, self.images, self.labels = model, ckpt, images, labels
        self.many = images if many is None else many    # (M, C, H, W): for averages over many images
        self.classes, self.mean, self.std, self.out, self.args = classes, mean, std, out_dir, args
        self.cfg = model.cfg
        self.device = next(model.parameters()).device
        self.has_cls = self.cfg.pool == "cls"

    @torch.no_grad()
    def forward(self, images):
        x = datasets.normalize(images.to(self.device), self.mean, self.std, self.cfg.input_size)
        logits, maps = self.model(x, return_attention=True)
        return logits.cpu(), [m.float().cpu() for m in maps]

    def save(self, picture, name, how_to_read):
        path = os.path.join(self.out, name)
        if isinstance(picture, list):   # frames of an animation
            picture[0].save(path, save_all=True, append_images=picture[1:], duration=600, loop=0)
        else:
            picture.save(path)
        print(f"{path}\n    {how_to_read}")

    def label_text(self, i, pred):
        p = self.classes[pred] if pred < len(self.classes) else str(pred)
        if self.labels is None:
            return f"pred: {p}"
        return f"pred: {p}\ntrue: {self.classes[self.labels[i]]}"

    def attention(self):
        logits, maps = self.forward(self.images)
        L = len(maps)
        layers = sorted({L - 1, self.args.layer % L})
        rows, cols = [], ["image"]
        for l in layers:
            cols += [f"L{l + 1} mean"] + [f"L{l + 1} h{k + 1}" for k in range(self.cfg.heads)]
        for i, img in enumerate(self.images):
            row = [image_tile(img)]
            for l in layers:
                a = cls_attention(maps[l][i:i + 1], self.cfg.grid)[0]     # (h, G_h, G_w)
                row += [heat_tile(a.mean(0), img)] + [heat_tile(a[k], img) for k in range(len(a))]
            rows.append(row)
        what = "class-token attention" if self.has_cls else "mean attention received (no class token)"
        picture = grid_picture(rows, [self.label_text(i, p) for i, p in enumerate(logits.argmax(1))],
                               cols, title=f"{what}, layers {', '.join(str(l + 1) for l in layers)}")
        self.save(picture, "attention.png", f"{what}: bright patches are where the model looks; one "
                  f"column per head, 'mean' averages them (layer {layers[-1] + 1} is the last)")

    def rollout(self):
        logits, maps = self.forward(self.images)
        r = rollout(maps, self.args.head_fusion, self.args.discard_ratio)       # (B, N, N)
        rows = []
        for i, img in enumerate(self.images):
            m = cls_attention(r[i:i + 1, None], self.cfg.grid)[0, 0]            # (G_h, G_w)
            rows.append([image_tile(img), heat_tile(m, img), heat_tile(m)])
        picture = grid_picture(rows, [self.label_text(i, p) for i, p in enumerate(logits.argmax(1))],
                               ["image", "rollout", "rollout map"],
                               title=f"attention rollout ({self.args.head_fusion} over heads, "
                                     f"discard {self.args.discard_ratio})")
        # Without a class token the head sees the mean of the final tokens, so the mean of the
        # rollout's rows (cls_attention's column mean) is what that mean token draws on.
        self.save(picture, "rollout.png", "attention rolled out through all layers (residuals "
                  f"included): which input patches the final {'class' if self.has_cls else 'mean'} "
                  "token draws on")

    def figure7(self):
        m = self.model
        comps = filter_components(m.patch_embed.weight.detach().cpu())         # (k, C, P, P)
        if comps.shape[1] != 3:
            comps = comps[:, :1].expand(-1, 3, -1, -1)
        tiles = F.interpolate(comps, scale_factor=max(1, 48 // comps.shape[-1]), mode="nearest")
        g = to_pil(make_grid(tiles, nrow=7, padding=2, pad_value=1.0))
        self.save(g, "figure7_filters.png", "first principal components of the patch-embedding "
                  "filters (the paper's Fig. 7, left): the basis the model sees each patch in")

        G_h, G_w = self.cfg.grid
        sim = position_similarity(m.pos_embed.detach().cpu(), (G_h, G_w))       # (G_h, G_w, G_h, G_w)
        small = max(8, min(48, 480 // max(G_h, G_w)))
        # Nearest-neighbour: one flat square per patch, as in the paper, so that a tile's brightest
        # square can be matched to its own position.
        tiles = [heat_tile(sim[i, j], size=small, mode="nearest") for i in range(G_h) for j in range(G_w)]
        g = to_pil(make_grid(torch.stack(tiles), nrow=G_w, padding=1, pad_value=1.0))
        self.save(g, "figure7_position_similarity.png", "tile (i, j): cosine similarity of the "
                  "position embedding of the patch at row i, column j with all others (Fig. 7, "
                  "centre); a learned 2-D grid shows as row and column stripes")

        # The mean over many images (up to 256 test images, or the user's own): with only the few
        # shown elsewhere, a head's distance depends on which images were drawn. In chunks, so that
        # a large model's maps (B, h, N, N) for every layer never have to fit in memory at once.
        sums = 0
        for chunk in datasets.with_progress(self.many.split(32), "attention distances", len(self.many),
                                            size=32):
            _, maps = self.forward(chunk)
            sums = sums + torch.stack([mean_attention_distance(a, self.cfg.grid, self.cfg.patch_size)
                                       for a in maps]) * len(chunk)             # (depth, h)
        dists = sums / len(self.many)                                             # (depth, h)
        xs = [l + 1 for l, d in enumerate(dists) for _ in d]
        ys = [v for d in dists for v in d.tolist()]
        n = self.cfg.grid[0] * self.cfg.grid[1]
        uniform = mean_attention_distance(torch.full((1, 1, n, n), 1.0 / n), self.cfg.grid,
                                          self.cfg.patch_size).item()
        # The axis must reach the even spread too: heads usually look nearer, and the grey line
        # would otherwise be drawn above the chart.
        p = Plot(xs, ys + [uniform], "mean attention distance per head", "network depth (layer)",
                 "pixels", y_from_zero=True)
        p.line([1, len(dists)], [uniform, uniform], (170, 170, 170), "uniform attention")
        p.points(xs, ys, PALETTE[0], "one head")
        p.line(range(1, len(dists) + 1), [d.mean().item() for d in dists], PALETTE[3], "mean of heads")
        self.save(p.finish("bottom"), "figure7_attention_distance.png", "how far each head looks, in pixels, "
                  f"against depth, averaged over {len(self.many)} images (Fig. 7, right); grey: attention "
                  "spread evenly over all patches. In a well-trained ViT some early heads look near, "
                  "and late ones far. Mean of the heads, layer by layer: "
                  + ", ".join(f"{d:.1f}" for d in dists.mean(1).tolist())
                  + f" (even spread: {uniform:.1f})")

    def curves(self):
        hist = self.ckpt.get("metrics", [])
        if not hist:
            print("curves: the checkpoint has no metrics history; skipped")
            return
        ep = [h["epoch"] for h in hist]
        split = hist[-1].get("eval_split", "eval")
        pictures = []
        for key, name in (("loss", "loss"), ("acc", "accuracy")):
            tr, ev = [h[f"train_{key}"] for h in hist], [h[f"eval_{key}"] for h in hist]
            p = Plot(ep, tr + ev, name, "epoch", name)
            p.line(ep, tr, PALETTE[0], "train")
            p.line(ep, ev, PALETTE[1], split)
            pictures.append(p.finish("top" if key == "loss" else "bottom"))
        canvas = Image.new("RGB", (sum(p.width for p in pictures), pictures[0].height), "white")
        for k, p in enumerate(pictures):
            canvas.paste(p, (k * p.width, 0))
        self.save(canvas, "curves.png", f"loss and accuracy per epoch, on the training batches "
                  f"(augmented, label-smoothed) and on {split}")

    @torch.no_grad()
    def print_classes(self, paths, images):
        """Your own images (--images), any number: each file's three likeliest classes, printed."""
        summaries = self.summaries(images, "classifying your images")            # (B, D)
        probs = self.scores(summaries).float().softmax(1).cpu()                  # (B, K)
        for path, p in zip(paths, probs):
            top = p.topk(min(3, len(p)))
            print(f"{path}: " + ", ".join(f"{self.classes[k] if k < len(self.classes) else k} "
                                          f"{100 * v:.1f}%" for v, k in zip(*top)))

    def predictions(self):
        logits, _ = self.forward(self.images)
        pred = logits.argmax(1)
        rows, colors = [[image_tile(img)] for img in self.images], {}
        for i, p in enumerate(pred.tolist()):
            if self.labels is not None and p != self.labels[i]:
                colors[i] = (200, 0, 0)
        picture = grid_picture(rows, [self.label_text(i, p) for i, p in enumerate(pred.tolist())],
                               title="predictions (wrong in red)", label_colors=colors)
        self.save(picture, "predictions.png", "each of your images with the model's prediction"
                  if self.labels is None else "each image with the model's prediction and the true "
                  "label; wrong predictions are in red")

    @torch.no_grad()
    def summaries(self, images, what="classifying the test sample"):
        """(B, D) what the head classifies (the pooled token after the last LN, Eq. 4) for many
        images, 100 at a time by the fused attention path. forward() keeps every layer's attention
        maps, which for 500 images of 224 pixels in ViT-B/16 would be (500, 12, 197, 197) floats,
        0.93 GB, in each of its 12 layers. The confusion matrix and the embeddings share one pass."""
        out = []
        for chunk in datasets.with_progress(images.split(100), what, len(images), size=100):
            x = datasets.normalize(chunk.to(self.device), self.mean, self.std, self.cfg.input_size)
            t = self.model.embed(x)                                       # (B, N, D)
            for block in self.model.blocks:
                t, _ = block(t)
            out.append(self.model.pool(t).float().cpu())                  # (B, D)
        return torch.cat(out)

    @torch.no_grad()
    def scores(self, summaries):
        """(B, K) class scores of summaries() (B, D): the rest of the model's forward pass."""
        return self.model.head(self.model.pre_logits(summaries.to(self.device)))

    @torch.no_grad()
    def confusion(self, summaries, labels):
        K = self.cfg.num_classes
        preds = self.scores(summaries).argmax(1).cpu()                              # (B,)
        cm = torch.zeros(K, K, dtype=torch.long)
        cm.index_put_((labels, preds), torch.ones_like(labels), accumulate=True)   # [true, predicted]
        labelled = K <= 40                   # room for a name beside each row and column
        cell = max(12, min(44, 600 // K))
        left = top = 110 if labelled else 10
        img = Image.new("RGB", (left + K * cell + 10, top + K * cell + 46), "white")
        d = ImageDraw.Draw(img)
        frac = cm.float() / cm.sum(1, keepdim=True).clamp_min(1)
        for t in range(K):
            for p in range(K):
                c = tuple(int(255 * v) for v in colormap(frac[t, p].view(1, 1))[:, 0, 0])
                box = [left + p * cell, top + t * cell, left + (p + 1) * cell - 1, top + (t + 1) * cell - 1]
                d.rectangle(box, fill=c)
                if K <= 20:
                    d.text((box[0] + 3, box[1] + cell // 3), str(cm[t, p].item()),
                           fill="black" if frac[t, p] > 0.5 else "white", font=font(10))
        full = [self.classes[k] if k < len(self.classes) else str(k) for k in range(K)]
        names = [n[:14] for n in full]
        if labelled:
            for k, n in enumerate(names):
                d.text((4, top + k * cell + cell // 3), n, fill="black", font=font(11))
                txt = Image.new("RGB", (left - 8, 14), "white")
                ImageDraw.Draw(txt).text((0, 0), n, fill="black", font=font(11))
                img.paste(txt.rotate(90, expand=True), (left + k * cell + cell // 3, 4))
        acc = cm.diag().sum().item() / max(1, cm.sum().item())
        d.text((left, top + K * cell + 8), f"rows: true class, columns: predicted; {len(labels)} "
               f"images, accuracy {100 * acc:.1f}%", fill="black", font=font(11))
        # The largest cells off the diagonal, in words: with many classes the only way to name them.
        wrong = cm.clone().fill_diagonal_(0).flatten()                    # (K*K,)
        counts, cells = wrong.topk(min(3, K * K))
        worst = ", ".join(f"{full[c // K]} as {full[c % K]} {n}"
                          for n, c in zip(counts.tolist(), cells.tolist()) if n > 0) or "none"
        d.text((left, top + K * cell + 24), fit_text(d, f"most confused: {worst}", img.width - left - 4,
                                                     font(11)), fill="black", font=font(11))
        self.save(img, "confusion.png", "confusion matrix: row = true class, column = prediction; "
                  "a bright diagonal is a good model, bright cells off it are the classes it confuses "
                  f"(most confused, true as predicted: {worst})")

    @torch.no_grad()
    def cls_embeddings(self, summaries, labels):
        f = summaries - summaries.mean(0)                               # (B, D), centred
        # The two main directions are the first two right singular vectors of the centred
        # features: an exact SVD of a (2000, D) matrix takes a moment, and gives the same picture
        # every time (torch.pca_lowrank is randomised).
        _, _, Vh = torch.linalg.svd(f, full_matrices=False)              # Vh: (D, D)
        xy = f @ Vh[:2].T                                                # (B, 2)
        what = "class token" if self.has_cls else "mean token"
        p = Plot(xy[:, 0].tolist(), xy[:, 1].tolist(), f"{what} embeddings (PCA)", "PC 1", "PC 2",
                 size=(560, 460))
        # Ten colours tell ten classes apart; with more, the first ten get them and the rest are
        # drawn in grey, underneath, rather than in colours that repeat.
        K = self.cfg.num_classes
        if K > len(PALETTE):
            rest = labels >= len(PALETTE)
            p.points(xy[rest, 0].tolist(), xy[rest, 1].tolist(), (205, 205, 205),
                     f"{K - len(PALETTE)} other classes", r=2)
        for k in range(min(K, len(PALETTE))):
            sel = labels == k
            name = self.classes[k] if k < len(self.classes) else str(k)
            p.points(xy[sel, 0].tolist(), xy[sel, 1].tolist(), PALETTE[k], name, r=2)
        self.save(p.finish(), "cls_embeddings.png", f"the final {what} of {len(f)} test images "
                  f"projected on its two main directions; classes the model separates form clusters")

    @torch.no_grad()
    def blocks(self):
        L = self.cfg.depth
        layers = sorted({0, L // 2, L - 1})
        img = self.images[:1]
        x = self.model.embed(datasets.normalize(img.to(self.device), self.mean, self.std,
                                                self.cfg.input_size))
        n = self.cfg.grid[0] * self.cfg.grid[1]
        norms = []
        for block in self.model.blocks:
            y, _ = block(x)
            norms.append((x[0, -n:].norm(dim=-1).cpu(), y[0, -n:].norm(dim=-1).cpu()))  # (G,) each
            x = y
        rows = [[image_tile(img[0])] + [heat_tile(norms[l][k].reshape(self.cfg.grid)) for k in (0, 1)]
                for l in layers]
        picture = grid_picture(rows, [f"block {l + 1}" for l in layers], ["image", "norm in", "norm out"],
                               title="patch-token norms before and after a block")
        self.save(picture, "token_norms.png", "the size of each patch token going into and coming "
                  "out of a block (each map scaled to its own range): where the block writes most")

        _, maps = self.forward(img)
        frames = []
        for l, a in enumerate(maps):
            m = cls_attention(a, self.cfg.grid)[0].mean(0)                 # (G_h, G_w)
            tile = grid_picture([[image_tile(img[0], 192), heat_tile(m, img[0], 192)]],
                                title=f"layer {l + 1}/{L}")
            frames.append(tile)
        what = "class-token attention" if self.has_cls else "attention each patch receives"
        self.save(frames, "attention_layers.gif", f"an animation through the layers of the {what}, "
                  "averaged over the heads, for the first image")

    def augmentation(self, train_images):
        a = self.ckpt.get("args", {})
        tf = datasets.train_transform(a.get("augment", "none"), a.get("random_erasing", 0.0))
        originals = train_images[:8]                                        # (8, C, H, W) uint8
        flip = a.get("flip", "none" if a.get("no_flip") else "random")    # (older checkpoints: no_flip)
        first = torch.rand(8) < 0.5                                         # epoch 0's mirrored ones
        rows = [[image_tile(x) for x in originals]]
        for epoch in range(3):             # the training pipeline: per image, then the batch's crop+flip
            seen = torch.stack([tf(x) for x in originals]) if tf else originals
            mirror = datasets.flips_for(flip, torch.arange(8), epoch, first)
            seen = datasets.crop_flip(seen, a.get("crop_padding", 4), mirror)
            rows.append([image_tile(x) for x in seen])
        picture = grid_picture(rows, ["original", "epoch 1", "epoch 2", "epoch 3"],
                               title="training images as the model saw them")
        self.save(picture, "augmentation.png", "top row: training images; below: each image as three "
                  "epochs of training augmented it (check that the label is still obvious)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Draw what a trained ViT does, from a checkpoint.")
    p.add_argument("--ckpt", default="model.pt", help="checkpoint written by train.py (default: model.pt)")
    p.add_argument("--images", nargs="+", help="your own image files or folders of them, up to 64, "
                   "instead of test images (any format PIL reads; converted to RGB and resized to the "
                   "model's input); the model's three likeliest classes for each are printed too. With "
                   "--only predictions, any number: all are classified, the first 64 drawn")
    p.add_argument("--out", help="folder for the pictures (default: <ckpt name>_vis next to the checkpoint)")
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(PICTURES)}")
    p.add_argument("--layer", type=int, default=0, help="a layer to show beside the last in "
                   "attention.png, counted from 1 (default: the middle layer; negative counts from the end)")
    p.add_argument("--head-fusion", choices=["mean", "max", "min"], default="mean",
                   help="how rollout combines heads (default: mean)")
    p.add_argument("--discard-ratio", type=float, default=0.0, help="rollout: fraction of the "
                   "weakest attention links dropped in each layer (default: 0)")
    p.add_argument("--num-images", type=int, default=8, help="test images to show, up to 64 (default: 8)")
    p.add_argument("--tile", type=int, default=TILE, help=f"pixels per image in the grids, 16 to 512 "
                   f"(default: {TILE})")
    p.add_argument("--data-dir", help="where the checkpoint's dataset is (default: where it was trained from)")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="picks the test images (default: 0)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    except KeyboardInterrupt:
        print("\nstopped by Ctrl-C", file=sys.stderr)        # the pictures written so far stay
        return 128 + signal.SIGINT


def run(args):
    only = PICTURES if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    if not only:                        # --only "" (a script's unset variable) had meant everything
        raise ValueError(f"--only names no picture; choose from {', '.join(PICTURES)}, or leave it out")
    unknown = [s for s in only if s not in PICTURES]
    if unknown:
        raise ValueError(f"--only: unknown picture {', '.join(unknown)}; choose from {', '.join(PICTURES)}")
    # Each image is a row of attention.png and rollout.png: 64 rows of 96-pixel tiles is already a
    # picture 6,000 pixels high, and --num-images 10000 once drew one of 437 million pixels.
    for flag, value, low, high in (("--tile", args.tile, 16, 512), ("--num-images", args.num_images, 1, 64)):
        if not low <= value <= high:
            raise ValueError(f"{flag} must be from {low} to {high}, got {value}")
    global TILE
    TILE = args.tile                    # the default size of every tile drawn below
    if not 0 <= args.discard_ratio < 1:
        raise ValueError(f"--discard-ratio must be in [0, 1), got {args.discard_ratio}")
    if args.images:
        given, args.images = args.images, image_files(args.images)
        if not args.images:
            # A dataset's folder (cifar10-jpeg/test) holds its images one level down, in class folders.
            inside = [os.path.join(p, d) for p in given if os.path.isdir(p) for d in sorted(os.listdir(p))]
            inside = [d for d in inside if os.path.isdir(d) and image_files([d])]
            hint = f" (but in its folders: --images {' '.join(inside[:3])}{' ...' if len(inside) > 3 else ''})"
            raise ValueError(f"--images {' '.join(given)}: no images there{hint if inside else ''}")
        # Each image is a row of the attention pictures, as with --num-images. Only their classes,
        # printed, have room for more: --only predictions classifies any number (and draws 64).
        if len(args.images) > 64 and only != ["predictions"]:
            raise ValueError(f"--images {' '.join(given)}: {len(args.images)} images; give 1 to 64 "
                             f"(each is a row of the attention pictures), or add --only predictions "
                             f"to have the classes of all of them printed")
    ckpt = load_checkpoint(args.ckpt)
    device = pick_device(args.device)
    model = model_from_checkpoint(ckpt).to(device).eval()
    cfg = model.cfg
    info = ckpt.get("data", {})
    classes = info.get("classes") or [str(k) for k in range(cfg.num_classes)]
    out = args.out or os.path.splitext(args.ckpt)[0] + "_vis"
    if not -cfg.depth <= args.layer <= cfg.depth:
        raise ValueError(f"--layer {args.layer}: the model has {cfg.depth} layers (1 to {cfg.depth}, "
                         f"or -1 to -{cfg.depth} from the end)")
    args.layer = (args.layer - 1) if args.layer > 0 else (args.layer if args.layer < 0 else cfg.depth // 2)

    data = None
    of_the_data = [p for p in only if p in ("cls_embeddings", "augmentation")]
    if not args.images or of_the_data or "predictions" in only:
        try:
            data = checkpoint_data(args, ckpt, info.get("dataset", "cifar10"), cfg)
        except DataError as e:
            if not args.images or (args.only and of_the_data):
                raise
            # Your own images need no dataset, so a checkpoint alone can draw them; only the
            # pictures of the dataset (the confusion matrix, the embeddings, augmentation) can't.
            print(f"drawing your images only, without the pictures of the dataset: {e}")
            only = [p for p in only if p not in of_the_data]
    if data is not None:
        # The test images in a random order, from which every picture takes its images: an image
        # folder lists them class by class, so the 2,000 that the confusion matrix and the
        # embeddings use must be a random sample, not the first 2,000 (two classes of CIFAR-10).
        pick = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(args.seed))
        sample = pick[:2000]
    mean, std = info.get("mean") or data.mean, info.get("std") or data.std   # older checkpoints: data's

    if args.images:
        # Any size and mode in; RGB at the model's input size out (the model could take no other).
        reads = datasets.with_progress(args.images, "reading your images", len(args.images))
        read, kept, bad = [], [], []
        for p in reads:
            try:
                read.append(v2.functional.resize(datasets.read_image(p), list(cfg.input_size), antialias=True))
                kept.append(p)
            except DataError as e:
                if p in given:             # a file you named: an error
                    raise
                bad.append(p)              # a broken one in a folder you named: left out, as train.py does
                error = e
        if not read:
            raise error                    # none could be read
        if bad:
            print(datasets.left_out_note("", bad))
        args.images = kept                 # the paths of the images read, for the printed classes
        every = torch.stack(read)                                        # (N, C, H, W)
        images, labels = every[:64], None                                # the ones drawn
    else:
        shown = pick[:args.num_images]
        images, labels = data.test.images[shown], data.test.labels[shown].tolist()
        many = data.test.images[pick[:max(256, args.num_images)]]   # for Figure 7's distances
    try:
        os.makedirs(out, exist_ok=True)    # only now: a wrong data folder leaves no empty one behind
    except OSError as e:
        raise ValueError(f"--out {out}: can't make that folder ({e.strerror})") from None
    v = Visualizer(model, ckpt, images, labels, classes, mean, std, out, args,
                   many=None if args.images else many)
    print(f"{args.ckpt}: {cfg.depth} layers, {cfg.heads} heads, {cfg.grid[0]}x{cfg.grid[1]} patches, "
          f"trained to {trained_to(ckpt)} on {info.get('dataset', '?')}; pictures in {out}/")
    if not v.has_cls:
        print("this model pools the mean token and has no class token: attention pictures show the "
              "mean attention each patch receives instead")
    summaries = None
    for name in only:
        if name in ("predictions", "cls_embeddings") and data is not None and summaries is None:
            summaries = v.summaries(data.test.images[sample])   # one pass for both pictures
        if name == "predictions":
            if args.images:
                v.print_classes(args.images, every)
            v.predictions()
            if data is not None:
                v.confusion(summaries, data.test.labels[sample])
        elif name == "cls_embeddings":
            v.cls_embeddings(summaries, data.test.labels[sample])
        elif name == "augmentation":
            v.augmentation(data.train.images)
        else:
            getattr(v, name)()
    return 0


if __name__ == "__main__":
    sys.exit(main())
