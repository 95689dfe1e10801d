"""Tests: that the model is the paper's ViT, that it learns, and that the scripts work end to end.

    python -m unittest -v

CPU only and offline (synthetic data in temporary folders). A CUDA test runs too where a GPU is.
"""

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import unittest

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import data as datasets
import train
import vit
from vit import ViT, ViTConfig

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(image_size=16, patch_size=4, dim=32, depth=2, heads=4, mlp_ratio=2.0)


def run_train(*argv):
    """train.main in this process; returns (exit code, stdout + stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = train.main([str(a) for a in argv])
    return code, out.getvalue()


class TestModel(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)

    def test_shapes_of_every_module(self):
        cfg = ViTConfig(**TINY, num_classes=7)
        model = ViT(cfg).eval()
        x = torch.randn(2, 3, 16, 16)                          # (B, C, H, W)
        self.assertEqual(model.patch_embed(x).shape, (2, 32, 4, 4))      # (B, D, G_h, G_w)
        tokens = model.embed(x)
        self.assertEqual(tokens.shape, (2, 17, 32))            # (B, 1 + 16 patches, D)
        out, attn = model.blocks[0].attn(tokens, return_attention=True)
        self.assertEqual(out.shape, (2, 17, 32))
        self.assertEqual(attn.shape, (2, 4, 17, 17))           # (B, h, N, N)
        self.assertEqual(model.blocks[0].mlp(tokens).shape, (2, 17, 32))
        self.assertEqual(model.blocks[0](tokens)[0].shape, (2, 17, 32))
        self.assertEqual(model.pool(tokens).shape, (2, 32))
        logits, maps = model(x, return_attention=True)
        self.assertEqual(logits.shape, (2, 7))
        self.assertEqual([m.shape for m in maps], [(2, 4, 17, 17)] * 2)
        self.assertEqual(model(x).shape, (2, 7))

    def test_mean_pooling_and_non_square_inputs(self):
        model = ViT(ViTConfig(**TINY, pool="mean", image_height=8)).eval()
        self.assertIsNone(model.cls_token)
        logits, maps = model(torch.randn(2, 3, 8, 16), return_attention=True)
        self.assertEqual(logits.shape, (2, 10))
        self.assertEqual(maps[0].shape, (2, 4, 8, 8))          # 2x4 grid, no class token

    def test_attention_rows_sum_to_one(self):
        model = ViT(ViTConfig(**TINY)).eval()
        _, maps = model(torch.randn(3, 3, 16, 16), return_attention=True)
        for m in maps:
            torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]))
            self.assertTrue((m >= 0).all())

    def test_fused_and_explicit_attention_agree(self):
        model = ViT(ViTConfig(**TINY)).eval()
        for p in model.parameters():              # non-zero head and larger weights: a real test
            torch.nn.init.normal_(p, std=0.3)
        x = torch.randn(4, 3, 16, 16)
        fast = model(x)
        explicit, _ = model(x, return_attention=True)
        self.assertGreater(fast.abs().max().item(), 0.1)
        torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)

    def test_same_logits_as_torchvision(self):
        # Our model is the paper's ViT: built from torchvision's with its (random) weights, it gives
        # the same logits on the fast and on the explicit attention path.
        shapes = [dict(image_size=32, patch_size=4, num_layers=3, num_heads=4, hidden_dim=48, mlp_dim=96),
                  dict(image_size=24, patch_size=8, num_layers=2, num_heads=2, hidden_dim=20, mlp_dim=52,
                       representation_size=12)]
        for kw in shapes:
            with self.subTest(**kw):
                tv = torchvision.models.VisionTransformer(**kw, num_classes=5).eval()
                for p in tv.parameters():     # torchvision zero-inits the head: randomise everything
                    torch.nn.init.normal_(p, std=0.2)
                ours = vit.from_torchvision(tv).eval()
                x = torch.randn(3, 3, kw["image_size"], kw["image_size"])
                with torch.no_grad():
                    expected = tv(x)
                    self.assertGreater(expected.abs().max().item(), 0.1)
                    self.assertLessEqual((ours(x) - expected).abs().max().item(), 1e-5)
                    logits, _ = ours(x, return_attention=True)
                    self.assertLessEqual((logits - expected).abs().max().item(), 1e-5)

    def test_paper_shapes_match_torchvision_parameter_counts(self):
        # Table 1 of the paper; torchvision's builders have the same shapes (86.6M for ViT-B/16).
        # Meta-device models hold no memory, so even ViT-H/14 is free to count.
        with torch.device("meta"):
            for name in ("vit_b_16", "vit_l_16", "vit_h_14"):
                tv = getattr(torchvision.models, name)(num_classes=1000)
                ours = vit.build_model(name, num_classes=1000)
                self.assertEqual(vit.num_params(ours), vit.num_params(tv), name)

    def test_config_errors_say_what_is_wrong(self):
        for bad, words in [(dict(dim=100, heads=3), "not divisible by 3 heads"),
                           (dict(image_size=30, patch_size=4), "not divisible by patch size"),
                           (dict(depth=0), "depth must be positive"),
                           (dict(pool="max"), "pool must be"),
                           (dict(dropout=1.5), "dropout must be")]:
            with self.subTest(**bad), self.assertRaisesRegex(ValueError, words):
                ViTConfig(**bad)
        with self.assertRaisesRegex(ValueError, "unknown model"):
            vit.build_model("vit_z_1")

    def test_resize_pos_embed(self):
        pos = torch.randn(1, 1 + 16, 8)
        self.assertIs(vit.resize_pos_embed(pos, (4, 4), (4, 4)), pos)     # same grid: identity
        big = vit.resize_pos_embed(pos, (4, 4), (6, 6))
        self.assertEqual(big.shape, (1, 37, 8))
        torch.testing.assert_close(big[:, 0], pos[:, 0])                  # class token kept apart
        self.assertTrue(torch.isfinite(big).all())

    def test_drop_path_keeps_the_expectation(self):
        x = torch.ones(20000, 1, 1)
        y = vit.drop_path(x, 0.25, training=True)
        self.assertAlmostEqual(y.mean().item(), 1.0, delta=0.03)
        self.assertAlmostEqual((y == 0).float().mean().item(), 0.25, delta=0.02)
        self.assertIs(vit.drop_path(x, 0.25, training=False), x)

    def _overfit_one_batch(self, device):
        torch.manual_seed(0)
        model = ViT(ViTConfig(**TINY)).to(device)
        x, y = torch.randn(16, 3, 16, 16, device=device), torch.arange(16, device=device) % 10
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(150):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.assertLess(loss.item(), 0.05)   # from ln(10) = 2.30 to almost 0: it can learn

    def test_one_batch_overfits_on_cpu(self):
        self._overfit_one_batch("cpu")

    @unittest.skipUnless(torch.cuda.is_available(), "no CUDA GPU")
    def test_one_batch_overfits_on_cuda(self):
        self._overfit_one_batch("cuda")


class TestData(unittest.TestCase):
    def test_fake_dataset_and_val_split(self):
        d = datasets.load_data("fake", image_size=16, val_split=0.2, fake_size=(100, 30))
        self.assertEqual(d.train.images.shape, (80, 3, 16, 16))
        self.assertEqual(d.train.images.dtype, torch.uint8)
        self.assertEqual((len(d.val), len(d.test)), (20, 30))
        self.assertEqual(len(d.classes), 10)
        # held-out images are not in the training set
        train_rows = {bytes(t.numpy()) for t in d.train.images.flatten(1)}
        self.assertFalse(any(bytes(t.numpy()) in train_rows for t in d.val.images.flatten(1)))

    def test_image_folder(self):
        with tempfile.TemporaryDirectory() as root:
            for split, n in (("train", 3), ("test", 2)):
                for c, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
                    os.makedirs(f"{root}/{split}/{c}")
                    for i in range(n):
                        Image.new("RGB", (20, 24), colour).save(f"{root}/{split}/{c}/{i}.jpg")
            Image.new("L", (16, 16), 90).save(f"{root}/train/dog/gray.png")   # other mode and size
            d = datasets.load_data("folder", root, image_size=16)
            self.assertEqual(d.classes, ["cat", "dog"])
            self.assertEqual(d.train.images.shape, (7, 3, 16, 16))
            self.assertEqual(d.train.labels.tolist(), [0, 0, 0, 1, 1, 1, 1])
            self.assertEqual(d.test.images.shape, (4, 3, 16, 16))
            self.assertGreater(d.train.images[0, 0].float().mean(), 150)       # red stays red
            self.assertEqual(len(d.mean), 3)

    def test_folder_errors_are_sentences(self):
        with tempfile.TemporaryDirectory() as root:
            with self.assertRaisesRegex(datasets.DataError, "must hold train/ and test/"):
                datasets.load_data("folder", root)
            os.makedirs(f"{root}/train/a")
            os.makedirs(f"{root}/test/a")
            with self.assertRaisesRegex(datasets.DataError, "no images found"):
                datasets.load_data("folder", root)
        with self.assertRaisesRegex(datasets.DataError, "does not exist"):
            datasets.load_data("folder", "/no/such/folder")

    def test_offline_cifar_download_is_one_sentence(self):
        def no_network(*a, **k):
            raise OSError("Name or service not known")
        real = torchvision.datasets.CIFAR10.download
        torchvision.datasets.CIFAR10.download = no_network
        try:
            with tempfile.TemporaryDirectory() as root:
                code, out = run_train("--data-dir", root, "--epochs", "1", "--out", f"{root}/m.pt")
        finally:
            torchvision.datasets.CIFAR10.download = real
        self.assertEqual(code, 1)
        self.assertIn("could not download CIFAR10", out)
        self.assertIn("--dataset folder --data-dir", out)
        self.assertNotIn("Traceback", out)

    def test_augmentation_changes_images_but_not_labels(self):
        split = datasets.fake_split(64, 16, 10, seed=0)
        ds = datasets.ImageDataset(split, datasets.train_transform(16))
        torch.manual_seed(0)
        x0, y0 = ds[0]
        self.assertEqual(x0.shape, (3, 16, 16))
        self.assertEqual(y0, split.labels[0])
        changed = sum(not torch.equal(ds[i][0], split.images[i]) for i in range(64))
        self.assertGreater(changed, 40)
        self.assertIsNone(datasets.train_transform(16, crop_padding=0, flip=False))

    def test_normalize(self):
        images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
        mean, std = datasets.channel_stats(images)
        x = datasets.normalize(images, mean, std)
        self.assertEqual(x.dtype, torch.float32)
        self.assertAlmostEqual(x.mean().item(), 0.0, delta=0.01)
        self.assertEqual(datasets.normalize(images, mean, std, size=12).shape, (4, 3, 12, 12))


class TestTraining(unittest.TestCase):
    def test_lr_schedule(self):
        s = dict(total_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
        self.assertAlmostEqual(train.lr_at(0, **s), 0.1)
        self.assertAlmostEqual(train.lr_at(9, **s), 1.0)
        self.assertAlmostEqual(train.lr_at(55, **s), 0.55)         # half-way down the cosine
        self.assertAlmostEqual(train.lr_at(100, **s), 0.1)
        lrs = [train.lr_at(i, **s) for i in range(10, 100)]
        self.assertTrue(all(a >= b for a, b in zip(lrs, lrs[1:])))

    def test_weight_decay_skips_norms_biases_and_embeddings(self):
        model = ViT(ViTConfig(**TINY))
        opt = train.make_optimizer(model, 1e-3, 0.05, torch.device("cpu"))
        decayed = {id(p) for p in opt.param_groups[0]["params"]}
        names = {n for n, p in model.named_parameters() if id(p) in decayed}
        self.assertIn("blocks.0.attn.qkv.weight", names)
        for n in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"):
            self.assertNotIn(n, names)

    def test_train_then_eval_only(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "m.pt")
            code, log = run_train("--dataset", "fake", "--epochs", 2, "--batch-size", 50, "--dim", 32,
                                  "--depth", 2, "--heads", 2, "--out", out, "--lr", "3e-3")
            self.assertEqual(code, 0, log)
            self.assertIn("epoch   2/2", log)
            ckpt = torch.load(out, weights_only=True)       # plain data: no code runs on load
            self.assertEqual(ckpt["epoch"], 2)
            self.assertEqual(ckpt["config"]["dim"], 32)
            self.assertEqual(len(ckpt["metrics"]), 2)
            self.assertTrue(all(not k.startswith("_orig_mod") for k in ckpt["model"]))
            with open(os.path.join(tmp, "m.metrics.jsonl")) as f:
                lines = [json.loads(line) for line in f]
            self.assertEqual([line["epoch"] for line in lines], [1, 2])
            self.assertGreater(lines[-1]["eval_acc"], 0.2)   # above chance (0.1): it learns
            code, log = run_train("--eval-only", "--ckpt", out)
            self.assertEqual(code, 0, log)
            last = log.strip().splitlines()[-1]
            self.assertIn("test accuracy", last)
            self.assertIn(f"{100 * lines[-1]['eval_acc']:.2f}%", last)   # the same model, read back

    def test_bad_input_is_one_sentence(self):
        with tempfile.TemporaryDirectory() as tmp:
            junk = os.path.join(tmp, "junk.pt")
            with open(junk, "wb") as f:
                f.write(b"not a checkpoint")
            cases = [(("--dim", 100, "--heads", 3), 2, "not divisible by 3 heads"),
                     (("--model", "nope"), 2, "unknown model"),
                     (("--dataset", "imagenet22k"), 1, "unknown dataset"),
                     (("--eval-only",), 2, "needs --ckpt"),
                     (("--eval-only", "--ckpt", os.path.join(tmp, "none.pt")), 1, "does not exist"),
                     (("--eval-only", "--ckpt", junk), 1, "could not be read"),
                     (("--out", "/no/such/dir/m.pt"), 2, "does not exist")]
            for argv, want_code, words in cases:
                with self.subTest(argv=argv):
                    code, out = run_train("--dataset", "fake", "--epochs", 1, *argv)
                    self.assertEqual(code, want_code, out)
                    self.assertIn(words, out)
                    self.assertNotIn("Traceback", out)

    def test_help_explains_every_flag(self):
        out = subprocess.run([sys.executable, "train.py", "-h"], cwd=HERE, capture_output=True, text=True)
        self.assertEqual(out.returncode, 0)
        for flag in ("--dataset", "--data-dir", "--model", "--epochs", "--batch-size", "--lr",
                     "--weight-decay", "--warmup-epochs", "--label-smoothing", "--device", "--workers",
                     "--seed", "--out", "--image-size", "--patch-size", "--dim", "--depth", "--heads",
                     "--mlp-ratio", "--val-split", "--eval-only", "--ckpt", "--compile"):
            self.assertIn(flag, out.stdout)


if __name__ == "__main__":
    unittest.main()
