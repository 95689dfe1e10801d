"""The Vision Transformer of "An Image is Worth 16x16 Words" (Dosovitskiy et al., ICLR 2021).

Read this file top to bottom; it is the whole model. Section 3.1 of the paper, in four equations:

    Eq. 1   z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos      patches -> tokens (+ position)
    Eq. 2   z'_l = MSA(LN(z_{l-1})) + z_{l-1}                  attention block, pre-norm, residual
    Eq. 3   z_l  = MLP(LN(z'_l)) + z'_l                        MLP block, pre-norm, residual
    Eq. 4   y    = LN(z_L^0)                                   the class token after the last layer

and a linear head on y gives the class scores. `from_torchvision` at the bottom copies the weights of
torchvision's VisionTransformer into this model; test_vit.py checks that both then give the same logits,
which is our proof that this file is the paper's ViT and not something like it.

Letters in shape comments:
    B batch, C image channels, H/W image height/width, P patch size, G_h/G_w patch grid (H/P, W/P),
    N tokens (G_h*G_w patches, +1 with a class token), D width, h heads, d per-head width (D/h),
    M MLP hidden width, K classes
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ViTConfig:
    # Every field of a model's shape. The defaults here are only a fallback for a config built by
    # hand; train.py builds models by name from MODELS below (cifar_tiny unless --model says
    # otherwise), and each name sets its own width, depth, heads, MLP ratio and pooling.
    image_size: int = 32          # input is image_size x image_size (non-square patch grids: see grid)
    patch_size: int = 4           # P: 32/4 gives an 8x8 grid, 64 patch tokens
    in_channels: int = 3
    num_classes: int = 10
    dim: int = 96                 # D, the width the paper calls "Hidden size"
    depth: int = 6                # L, number of blocks ("Layers")
    heads: int = 3                # h, attention heads; D must be a multiple of h
    mlp_ratio: float = 2.0        # M = D * mlp_ratio ("MLP size"; the paper uses 4)
    dropout: float = 0.0          # after the embeddings, inside the MLP and after attention
    attn_dropout: float = 0.0     # on the attention weights
    drop_path: float = 0.0        # stochastic depth, the rate of the last block (earlier ones less)
    qkv_bias: bool = True
    pool: str = "cls"             # "cls": class token (Eq. 4); "mean": average of patch tokens
    representation_size: int = 0  # >0: the pre-logits layer (Linear+tanh) used in pre-training
    image_height: int = 0         # 0 means square; set for non-square inputs, e.g. 32x48
    stem: str = "patch"           # "patch": Eq. 1 on pixels; "conv": the hybrid of Sec. 3.1

    def __post_init__(self):
        for name in ("image_size", "patch_size", "in_channels", "num_classes", "dim", "depth", "heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.image_height < 0:
            raise ValueError(f"image_height must be 0 (square) or positive, got {self.image_height}")
        for side in (self.image_size, self.image_height or self.image_size):
            if side % self.patch_size:
                raise ValueError(f"image size {side} is not divisible by patch size {self.patch_size}: "
                                 f"pick a patch size that divides it (e.g. 4 for 32x32 images)")
        if self.dim % self.heads:
            raise ValueError(f"width {self.dim} is not divisible by {self.heads} heads: each head gets "
                             f"an equal slice of the width (try --heads {math.gcd(self.dim, 12)})")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        for name in ("dropout", "attn_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {self.stem!r}")

    @property
    def grid(self):
        """(G_h, G_w): how many patches fit down and across the image."""
        return (self.image_height or self.image_size) // self.patch_size, self.image_size // self.patch_size

    @property
    def input_size(self):
        """(height, width) of the images the model takes."""
        return self.image_height or self.image_size, self.image_size

    @property
    def mlp_dim(self):
        return round(self.dim * self.mlp_ratio)

    @property
    def stem_channels(self):
        """Channels of the map the patches are cut from: the image's, or the hybrid stem's output."""
        return max(self.dim // 2, 16) if self.stem == "conv" else self.in_channels


# Named shapes. The CIFAR ones take 32x32 inputs with 4x4 patches (an 8x8 grid): 16x16 patches would
# leave only 4 tokens. The last five are Table 1 of the paper at 224x224, named like torchvision's
# builders so that the fine-tuning code can find their weights by the same name.
MODELS = {
    # the CPU default, sized so that the 10-epoch CPU run takes no longer than a tutorial's ViT on
    # the same two cores (results/README.md, "A faster model for the same time"): 64 wide, 2 heads
    # of 32, 0.26M parameters. 96 wide and 3 heads (then with the class token) ended 2.2 points
    # higher but took 1.59x the time, 1.54x the tutorial's on a machine without AVX-512. Its MLP
    # is 3x the width, not the 2x of the other CIFAR shapes: at 96 wide, 3x ended 0.40 points
    # higher on average over three seeds ("Tries on top of Muon"). It classifies the mean of the
    # patch tokens instead of a class token, the alternative the paper's Appendix D.3 finds as
    # good (Figure 9): in the 10-epoch CPU run it ended 0.67 points higher on average over three
    # seeds, ahead at each ("The mean token instead of the class token"), 1.14 points with the
    # higher learning rate it prefers (train.MODE_DEFAULTS). --pool cls --lr 2e-3 gives the class
    # token back, at the rate that suited it.
    "cifar_tiny": dict(dim=64, depth=6, heads=2, mlp_ratio=3.0, pool="mean"),
    # the plain-ViT baseline of Lee et al. 2021 ("ViT for Small-Size Datasets"), about 2.7M parameters
    "cifar_small": dict(dim=192, depth=9, heads=12, mlp_ratio=2.0),
    # wider and deeper, for a GPU and a long schedule, about 9.5M parameters
    "cifar_base": dict(dim=384, depth=8, heads=8, mlp_ratio=2.0),
    "vit_b_16": dict(image_size=224, patch_size=16, dim=768, depth=12, heads=12, mlp_ratio=4.0),
    "vit_b_32": dict(image_size=224, patch_size=32, dim=768, depth=12, heads=12, mlp_ratio=4.0),
    "vit_l_16": dict(image_size=224, patch_size=16, dim=1024, depth=24, heads=16, mlp_ratio=4.0),
    "vit_l_32": dict(image_size=224, patch_size=32, dim=1024, depth=24, heads=16, mlp_ratio=4.0),
    "vit_h_14": dict(image_size=224, patch_size=14, dim=1280, depth=32, heads=16, mlp_ratio=4.0),
}


class Attention(nn.Module):
    """Multi-head self-attention, MSA in Eq. 2 (and Eq. 5-8 of the paper's Appendix A)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.attn_dropout = cfg.attn_dropout
        # One Linear makes q, k and v for all heads at once: three (D, D) projections stacked into one
        # (3D, D) matrix is one big matmul instead of 3*h small ones. torchvision stores the same matrix
        # (as in_proj_weight), which is why its weights copy over unchanged.
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.proj_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, return_attention=False):
        B, N, D = x.shape
        d = D // self.heads
        # Head i owns features [i*d, (i+1)*d) of q, k and v. The often-seen
        # qkv.permute(2, 0, 3, 1, 4).unbind(0) gives the same three views, but its backward pass
        # stacks their gradients and then copies the stack into qkv's layout; splitting q, k and v
        # first, then moving the heads forward, stacks the gradients straight into that layout.
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, d)      # (B, N, 3, h, d)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))   # 3 x (B, h, N, d)
        drop = self.attn_dropout if self.training else 0.0
        if return_attention:
            # The explicit path: softmax(q k^T / sqrt(d)) v, keeping the (N, N) weights to look at.
            # Dividing by sqrt(d) keeps the logits' variance near 1 whatever d is, so the softmax does
            # not saturate into one-hot rows at initialisation (Vaswani et al. 2017, Sec. 3.2.1).
            attn = (q @ k.transpose(-2, -1)) / math.sqrt(d)     # (B, h, N, N)
            attn = attn.softmax(dim=-1)                         # each row sums to 1
            out = F.dropout(attn, drop, self.training) @ v      # (B, h, N, d)
        else:
            # The fast path computes the same thing in one fused kernel (FlashAttention or a
            # memory-efficient kernel on GPUs) and never writes the (N, N) matrix to memory.
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # (B, h, N, d)
            attn = None
        out = out.transpose(1, 2).reshape(B, N, D)              # (B, N, h*d): heads side by side again
        return self.proj_drop(self.proj(out)), attn


class MLP(nn.Module):
    """The MLP of Eq. 3: two layers with a GELU between, applied to every token separately."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)   # (B, N, D) -> (B, N, M)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)   # (B, N, M) -> (B, N, D)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        # The exact GELU, x * Phi(x) with Phi from erf, as torchvision and timm compute it, so that
        # from_torchvision reproduces torchvision's outputs digit for digit. The paper's Flax code
        # calls nn.gelu, whose default is the tanh approximation: at most 4.7e-4 away, and no faster
        # here (a trained model scored the same with either; results/README.md, "Speed").
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


def drop_path(x, rate, training):
    """Stochastic depth (Huang et al. 2016): skip a block's residual branch for random samples.

    Each sample of the batch keeps the branch with probability 1-rate, and kept branches are scaled by
    1/(1-rate) so that the expected output is unchanged; at test time every branch is used.
    """
    if rate == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= rate   # (B, 1, 1): one coin per sample
    return x * keep.to(x.dtype) / (1.0 - rate)


class Block(nn.Module):
    """One Transformer encoder layer: Eq. 2 then Eq. 3.

    Pre-norm (LayerNorm *before* attention and MLP, inside the residual branch) is what the paper uses.
    It leaves the residual path an identity from input to output, so gradients reach the first layers
    undamped and a ViT trains without the careful warmup that post-norm Transformers need.
    """

    def __init__(self, cfg: ViTConfig, drop_path_rate=0.0):
        super().__init__()
        # eps=1e-6 as in the paper's Flax code (flax's default) and torchvision; PyTorch's default is 1e-5.
        self.norm1 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.mlp = MLP(cfg)
        self.drop_path = drop_path_rate

    def forward(self, x, return_attention=False):                 # x: (B, N, D)
        a, attn = self.attn(self.norm1(x), return_attention)
        x = x + drop_path(a, self.drop_path, self.training)        # Eq. 2
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)  # Eq. 3
        return x, attn


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        G_h, G_w = cfg.grid
        # The hybrid model (Sec. 3.1, "Hybrid Architecture"): the patches are cut from a CNN's feature
        # map instead of from raw pixels, so each token starts from local edge and texture features,
        # the convolutional prior that a plain ViT must learn from data. The paper uses ResNet stages;
        # two 3x3 convolutions at full resolution are the smallest such map. In the 10-epoch CPU run
        # it ended 3.3 points higher over the same three seeds (82.75% against 79.44%) at 1.15x-1.3x
        # the time ("The hybrid stem on today's defaults" in results/README.md). It is not the
        # default: the plain ViT is what this project teaches.
        self.stem = nn.Identity()
        if cfg.stem == "conv":
            c = cfg.stem_channels
            self.stem = nn.Sequential(                 # (B, C, H, W) -> (B, c, H, W)
                nn.Conv2d(cfg.in_channels, c // 2, 3, padding=1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(),
                nn.Conv2d(c // 2, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        # Eq. 1's "x_p E": flattening each PxP patch and multiplying by E (P*P*C, D) is exactly a
        # convolution whose kernel and stride are both P. The conv does it without copying patches out.
        self.patch_embed = nn.Conv2d(cfg.stem_channels, cfg.dim, kernel_size=cfg.patch_size,
                                     stride=cfg.patch_size)
        # The class token is a learned extra token (as in BERT) whose final state summarises the image
        # for the head (Eq. 4). With pool="mean" there is none and the head sees the mean patch token,
        # as a CNN's global average pooling does; the paper's Appendix D.3 finds both work as well,
        # each at its own learning rate (Figure 9). cifar_tiny uses the mean (MODELS above).
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.pool == "cls" else None
        n_tokens = G_h * G_w + (cfg.pool == "cls")
        # Learned 1-D position embeddings: one vector per token index. The paper (Appendix D.4) found
        # 2-D-aware variants no better; the model learns the grid itself (visualize.py shows it).
        # (train.py starts them from 2-D sine-cosine codes by default, sincos_pos_embed below: they
        # stay learned, but a short run no longer spends its first epochs discovering the grid.)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, cfg.dim))
        self.pos_drop = nn.Dropout(cfg.dropout)
        # Stochastic depth rises linearly with depth (the DeiT recipe): early blocks are rarely dropped.
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)                 # the LN of Eq. 4
        # Pre-training used a hidden layer before the head (the "representation"); fine-tuning drops it.
        self.pre_logits = (nn.Sequential(nn.Linear(cfg.dim, cfg.representation_size), nn.Tanh())
                           if cfg.representation_size else nn.Identity())
        self.head = nn.Linear(cfg.representation_size or cfg.dim, cfg.num_classes)
        self.init_weights()

    def init_weights(self):
        """Every initial value of the model (train.py may then start some weights elsewhere:
        sincos_pos_embed, pca_patch_init, mimetic_attention_init below). The paper's Flax code is
        followed for the patch embedding, the position embeddings, the class token and the head; the
        blocks' Linear layers start from Xavier uniform there, from timm's and DeiT's truncated
        normal here."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                # Truncated normal, std 0.02: BERT's choice, kept by timm and DeiT for ViTs trained from
                # scratch, and the one every figure in results/ was measured with.
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # The patch embedding is a Linear on flattened patches (see above): LeCun normal on its fan-in,
        # as torchvision does, so a patch's embedding starts with unit-scale variance.
        fan_in = self.patch_embed.in_channels * self.patch_embed.kernel_size[0] ** 2
        nn.init.trunc_normal_(self.patch_embed.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)           # timm; torchvision: plain normal, 0.02
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)                        # as in torchvision
        # A zero head starts every class at equal odds (loss = ln K); the paper zero-initialises the
        # head for fine-tuning too (Sec. 3.2).
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def set_image_size(self, image_size):
        """Run at another resolution (Sec. 3.2): same patches, a bigger or smaller grid of them, the
        learned position embeddings interpolated to the new grid."""
        old_grid = self.cfg.grid
        self.cfg.image_size, self.cfg.image_height = image_size, 0
        self.cfg.__post_init__()
        resized = resize_pos_embed(self.pos_embed.data, old_grid, self.cfg.grid, self.cls_token is not None)
        self.pos_embed = nn.Parameter(resized)

    def reset_head(self, num_classes):
        """A new, zero-initialised head for num_classes (Sec. 3.2: "we remove the pre-trained prediction
        head and attach a zero-initialized D x K feedforward layer"); the pre-logits layer goes too."""
        self.cfg.num_classes, self.cfg.representation_size = num_classes, 0
        self.pre_logits = nn.Identity()
        self.head = nn.Linear(self.cfg.dim, num_classes).to(self.pos_embed.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def embed(self, images):
        """Eq. 1: images (B, C, H, W) -> tokens (B, N, D) with position embeddings added."""
        x = self.patch_embed(self.stem(images))          # (B, D, G_h, G_w)
        pos = self.pos_embed                             # (1, N, D)
        if tuple(x.shape[-2:]) != self.cfg.grid:
            # Images of another size than the model was built for (train.py --low-res trains the
            # first epochs on smaller ones): the same learned embeddings, resized to this grid as
            # Sec. 3.2 does for fine-tuning. The resize is differentiable, so they keep learning.
            pos = resize_pos_embed(pos, self.cfg.grid, x.shape[-2:], self.cls_token is not None)
        # The transpose only relabels the conv output's axes; .contiguous() copies the tokens into
        # (B, N, D) order once, here. Without it (and without a class token, whose concatenation
        # copies anyway), the sums that follow would keep that transposed layout all the way up the
        # residual stream, and every LayerNorm, forward and backward, would copy its input into order
        # again: 26 copies a training step at the default model's depth.
        x = x.flatten(2).transpose(1, 2).contiguous()    # (B, G_h*G_w, D): row by row, left to right
        if self.cls_token is not None:
            cls = self.cls_token.expand(x.shape[0], -1, -1)   # (B, 1, D)
            x = torch.cat([cls, x], dim=1)               # (B, N, D), class token at index 0
        return self.pos_drop(x + pos)                    # pos (1, N, D) broadcasts over B

    def pool(self, x):
        """(B, N, D) -> (B, D): the image's summary that the head classifies (Eq. 4)."""
        x = self.norm(x)
        return x[:, 0] if self.cls_token is not None else x.mean(dim=1)

    def forward(self, images, return_attention=False):
        """images (B, C, H, W) -> logits (B, K).

        With return_attention=True every block takes the explicit attention path and the result is
        (logits, maps), maps being a list with one (B, h, N, N) tensor per block, row i holding how
        much token i attends to each token.
        """
        x = self.embed(images)                           # (B, N, D)
        maps = []
        for block in self.blocks:
            x, attn = block(x, return_attention)         # (B, N, D)
            maps.append(attn)
        logits = self.head(self.pre_logits(self.pool(x)))   # (B, K)
        return (logits, maps) if return_attention else logits


def model_config(name="cifar_tiny", **overrides):
    """The ViTConfig of a named shape in MODELS, with any field overridden (None means keep)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return ViTConfig(**{**MODELS[name], **{k: v for k, v in overrides.items() if v is not None}})


def build_model(name="cifar_tiny", **overrides):
    """A ViT of a named shape, any field overridden."""
    return ViT(model_config(name, **overrides))


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def forward_flops(cfg):
    """Floating-point operations of one image's forward pass (a multiply-add counts as 2).

    Where the compute goes: per block, the four D x D projections (q, k, v and the output) and the
    MLP's two D x M layers are linear in the number of tokens N; only q k^T and (attention) v grow
    with N^2. Training costs about 3x this: the backward pass is twice the forward.
    """
    D, M = cfg.dim, cfg.mlp_dim
    G = cfg.grid[0] * cfg.grid[1]                                 # patches
    N = G + (cfg.pool == "cls")                                   # tokens
    H, W = cfg.input_size
    c = cfg.stem_channels
    macs = H * W * 9 * (cfg.in_channels * (c // 2) + (c // 2) * c) if cfg.stem == "conv" else 0  # 3x3 convs
    macs += G * D * c * cfg.patch_size ** 2                       # patch embedding (Eq. 1)
    macs += cfg.depth * (4 * N * D * D + 2 * N * N * D + 2 * N * D * M)   # Eq. 2 and 3, per block
    macs += D * cfg.num_classes                                   # head
    return 2 * macs


def from_torchvision(tv_model, **overrides):
    """Build our ViT from a torchvision.models.VisionTransformer of any shape, weights included."""
    heads = tv_model.encoder.layers[0].self_attention.num_heads
    fields = dict(dropout=tv_model.dropout, attn_dropout=tv_model.attention_dropout, **overrides)
    return from_torchvision_state_dict(tv_model.state_dict(), heads, **fields)


def from_torchvision_state_dict(tv, heads, **overrides):
    """Build our ViT from the state dict of a torchvision VisionTransformer (a model's, or a weights
    file torchvision downloaded). The shape is read off the weights; only the head count is not in
    them. `overrides` set config fields that hold no weights (dropouts, drop_path).

    Only names differ, so this is a dictionary of renames: torchvision's nn.MultiheadAttention keeps
    q, k, v stacked in one in_proj matrix exactly like our qkv Linear, and its MLP is Linear, GELU,
    Dropout, Linear, Dropout, so "mlp.0" (in older files "mlp.linear_1") is our fc1.
    """
    dim, channels, patch, _ = tv["conv_proj.weight"].shape          # (D, C, P, P)
    depth = sum(k.endswith(".ln_1.weight") for k in tv)
    n_patches = tv["encoder.pos_embedding"].shape[1] - 1
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"torchvision ViTs are square, but these weights have {n_patches} patches")
    prefix0 = "encoder.layers.encoder_layer_0."
    mlp_dim = tv.get(prefix0 + "mlp.0.weight", tv.get(prefix0 + "mlp.linear_1.weight")).shape[0]
    cfg = ViTConfig(
        image_size=side * patch, patch_size=patch, in_channels=channels,
        num_classes=tv["heads.head.weight"].shape[0], dim=dim, depth=depth, heads=heads,
        mlp_ratio=mlp_dim / dim, qkv_bias=prefix0 + "self_attention.in_proj_bias" in tv,
        representation_size=tv["heads.pre_logits.weight"].shape[0] if "heads.pre_logits.weight" in tv else 0,
        **overrides)
    model = ViT(cfg)

    ours = {
        "patch_embed.weight": tv["conv_proj.weight"], "patch_embed.bias": tv["conv_proj.bias"],
        "cls_token": tv["class_token"], "pos_embed": tv["encoder.pos_embedding"],
        "norm.weight": tv["encoder.ln.weight"], "norm.bias": tv["encoder.ln.bias"],
        "head.weight": tv["heads.head.weight"], "head.bias": tv["heads.head.bias"],
    }
    if cfg.representation_size:
        ours["pre_logits.0.weight"] = tv["heads.pre_logits.weight"]
        ours["pre_logits.0.bias"] = tv["heads.pre_logits.bias"]
    renames = {"ln_1": "norm1", "ln_2": "norm2", "self_attention.in_proj_": "attn.qkv.",
               "self_attention.out_proj": "attn.proj", "mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2",
               "mlp.linear_1": "mlp.fc1", "mlp.linear_2": "mlp.fc2"}
    for i in range(depth):
        prefix = f"encoder.layers.encoder_layer_{i}."
        for key, value in tv.items():
            if key.startswith(prefix):
                name = key[len(prefix):]
                for old, new in renames.items():
                    name = name.replace(old, new)
                ours[f"blocks.{i}.{name}"] = value
    model.load_state_dict(ours)   # strict: a key we failed to map is an error, not a silent skip
    return model


def resize_pos_embed(pos_embed, old_grid, new_grid, has_cls=True):
    """Resize learned position embeddings to a new patch grid (the paper's Sec. 3.2).

    A model trained on an old_grid of patches meets a different grid when the image size changes. The
    patches' position embeddings are a 2-D map in disguise, so we lay them out on the old grid, resize
    that map bicubically, and flatten again; the class token's embedding belongs to no position and is
    kept.
    pos_embed: (1, N_old, D) -> (1, N_new, D)
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    cls, patches = (pos_embed[:, :1], pos_embed[:, 1:]) if has_cls else (pos_embed[:, :0], pos_embed)
    D = patches.shape[-1]
    grid = patches.reshape(1, *old_grid, D).permute(0, 3, 1, 2)            # (1, D, G_h, G_w)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos_embed.dtype)  # (1, G_h'*G_w', D)
    return torch.cat([cls, patches], dim=1)                                  # (1, N_new, D)


# --------------------------------------------------------------------------------------------------
# Optional starting points for training from scratch. None changes the architecture: they only
# pick the first values of weights the model learns anyway (train.py --pos-init / --patch-init /
# --attn-init).


@torch.no_grad()
def sincos_pos_embed(grid, dim, has_cls=True):
    """2-D sine-cosine position codes, (1, N, D): a start for the learned position embeddings.

    The Transformer's sinusoids (Vaswani et al. 2017), once for the patch's column and once for its
    row, each over D/4 frequencies: neighbouring patches start with similar codes, which the learned
    embeddings otherwise have to discover (Figure 7, centre). The class token's row is zero, and so
    are the last D mod 4 channels.
    """
    G_h, G_w = grid
    k = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(k) / max(k, 1))                           # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(G_h), torch.arange(G_w), indexing="ij")
    rows = rows.flatten()[:, None] * freq                                         # (G_h*G_w, D/4)
    cols = cols.flatten()[:, None] * freq
    codes = torch.cat([cols.sin(), cols.cos(), rows.sin(), rows.cos()], dim=1)    # (G_h*G_w, 4*(D/4))
    codes = F.pad(codes, (0, dim - 4 * k))                                        # (G_h*G_w, D)
    if has_cls:
        codes = torch.cat([torch.zeros(1, dim), codes])                           # (N, D)
    return codes[None]


@torch.no_grad()
def pca_patch_init(model, images, eps=1e-2):
    """Start the patch embedding E (Eq. 1) as a whitening of the patches in `images` (B, C, H, W).

    Figure 7 (left): the principal components of trained embedding filters look like plausible
    basis functions for the fine structure of a patch, much as the principal components of image
    patches themselves do. We start there: each filter is one principal direction of the training patches,
    scaled by 1/sqrt(its variance) so every component starts at unit variance, whether it is the
    patch's mean colour or a faint texture. A patch has only C*P*P = 48 numbers and the model is
    usually wider (64 for cifar_tiny), so the remaining filters start as the negatives of the first
    ones, at the same scale; training then moves all of them apart. Measured on the CIFAR-10 JPEG
    copy (results/README.md): 2.3 and 3.5 points more than two runs of the random start after 2
    epochs.
    (Whitened first layers make CNNs learn faster on CIFAR too, e.g. Keller Jordan's airbench, which
    also uses +/- pairs.)
    """
    if model.cfg.stem != "patch":
        raise ValueError("--patch-init pca needs the plain patch stem (--stem patch)")
    P, D = model.cfg.patch_size, model.cfg.dim
    patches = F.unfold(images.float(), P, stride=P)             # (B, C*P*P, L): one column per patch
    patches = patches.transpose(1, 2).flatten(0, 1)            # (B*L, C*P*P)
    mean = patches.mean(0)
    cov = torch.cov((patches - mean).T)                          # (C*P*P, C*P*P)
    var, vecs = torch.linalg.eigh(cov)                           # ascending variance
    var, vecs = var.flip(0), vecs.flip(1)                        # strongest direction first
    white = vecs.T / (var.clamp(min=0) + eps).sqrt()[:, None]    # (C*P*P, C*P*P), one filter per row
    filters = torch.cat([white, -white]).repeat(D // (2 * len(white)) + 1, 1)[:D]   # (D, C*P*P)
    model.patch_embed.weight.copy_(filters.view_as(model.patch_embed.weight))
    model.patch_embed.bias.copy_(-(filters @ mean))              # centred: a mean patch embeds to 0


@torch.no_grad()
def mimetic_attention_init(model, qk=(0.7, 0.7), vo=(0.4, 0.4), generator=None):
    """Start every attention layer where trained ones end up (Trockman & Kolter 2023, "Mimetic
    Initialization of Self-Attention Layers").

    In trained ViTs the query and key weights of a head multiply to roughly +identity, W_q^T W_k ~ I,
    and the value and output weights of a layer to roughly -identity, W_o W_v ~ -I. With W_q^T W_k = I
    the attention logit of tokens i and j is (x_i . x_j)/sqrt(d): each token attends to the tokens
    most like itself. Where the patches' content says little (a blank image, in the test), that is
    decided by the position embeddings (2-D codes, see above), so a token attends to its spatial
    neighbours: the locality that a CNN is built with and that a ViT otherwise has to learn from
    data. On real images, similar content competes with nearness.

    qk = (alpha, beta): each head's W_q^T W_k is the best rank-d fit of alpha*Z + beta*I, with Z a
    random (D, D) matrix of variance 1/D, found with an SVD and split between W_q and W_k. vo: the
    same for the whole layer's W_o W_v, full rank, with -beta*I. The biases stay zero. The defaults,
    0.7 and 0.4, are the values the method is usually run with. Measured here (results/README.md):
    behind the random start after 2 epochs, but ahead from the third epoch of the 10-epoch run on and
    1.6 points ahead at its end (73.7% vs 72.1% on the CIFAR-10 JPEG copy), so train.py starts from
    it by default.
    """
    D, h = model.cfg.dim, model.cfg.heads
    d = D // h

    def factors(target, rank):
        # target ~ A @ B with A (D, rank) and B (rank, D): the SVD's best rank-`rank` fit, its
        # singular values shared evenly between the two factors.
        U, S, Vh = torch.linalg.svd(target)
        root = S[:rank].sqrt()
        return U[:, :rank] * root, root[:, None] * Vh[:rank]      # (D, rank), (rank, D)

    def noisy_identity(alpha, beta, sign):
        Z = torch.randn(D, D, generator=generator) / math.sqrt(D)  # entries of variance 1/D
        return alpha * Z + sign * beta * torch.eye(D)              # (D, D)

    for block in model.blocks:
        attn = block.attn
        W_q, W_k, W_v = attn.qkv.weight.view(3, D, D)   # each (D_out, D_in); head i owns rows i*d:(i+1)*d
        for i in range(h):
            A, B = factors(noisy_identity(*qk, +1), d)  # W_q_i^T W_k_i = A @ B
            W_q[i * d:(i + 1) * d] = A.T                # (d, D)
            W_k[i * d:(i + 1) * d] = B                  # (d, D)
        A, B = factors(noisy_identity(*vo, -1), D)      # W_o W_v = A @ B
        attn.proj.weight.copy_(A)                       # (D, D)
        W_v.copy_(B)                                    # (D, D)
        if attn.qkv.bias is not None:
            attn.qkv.bias.zero_()
        attn.proj.bias.zero_()
