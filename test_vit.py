"""Tests: that the model is the paper's ViT, that it learns, and that the scripts work end to end.

    python -m unittest -v

CPU only and offline (synthetic data in temporary folders). A CUDA test runs too where a GPU is.
"""

import contextlib
import io
import itertools
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest
import unittest.mock

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, JpegImagePlugin

import data as datasets
import train
import visualize
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


def fake_images(n):
    """`--dataset fake` with n training images (and n / 5 test images) instead of 1000 and 200. A
    test that asks only whether a flag changes the weights, or whether a command runs, needs 4
    steps of 50 images, not 20: a run of the small test model took 0.10 s instead of 0.45 s."""
    load = datasets.load_data
    return unittest.mock.patch.object(datasets, "load_data",
                                      lambda *a, **k: load(*a, **k, fake_size=(n, n // 5)))


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
        # The tokens in (B, N, D) order in memory, which the residual stream's sums keep: in the
        # conv's transposed layout each LayerNorm would copy them again (vit.py, ViT.embed).
        self.assertTrue(model.embed(torch.randn(2, 3, 8, 16)).is_contiguous())

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
        for pool in ("cls", "mean"):              # the class token (Eq. 4), and cifar_tiny's mean token
            torch.manual_seed(0)
            model = ViT(ViTConfig(**TINY, pool=pool)).to(device)
            x, y = torch.randn(16, 3, 16, 16, device=device), torch.arange(16, device=device) % 10
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
            for _ in range(150):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            self.assertLess(loss.item(), 0.05, pool)   # from ln(10) = 2.30 to almost 0: it can learn

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
        # In training: each epoch is judged on the held-out images, the test set once at the end.
        with tempfile.TemporaryDirectory() as tmp:
            code, out = run_train("--dataset", "fake", "--batch-size", 50, "--dim", 32, "--depth", 2,
                                  "--heads", 2, "--epochs", 1, "--val-split", 0.1, "--out", f"{tmp}/m.pt")
            self.assertEqual(code, 0, out)
            self.assertRegex(out, r"epoch +1/1 .* val loss [\d.]+ acc")
            self.assertRegex(out, r"\ntest loss [\d.]+  test accuracy [\d.]+%")
            with open(f"{tmp}/m.metrics.jsonl") as f:
                self.assertEqual(json.loads(f.readline())["eval_split"], "val")

    def test_image_folder(self):
        with tempfile.TemporaryDirectory() as root:
            for split, n in (("train", 3), ("test", 2)):
                for c, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
                    os.makedirs(f"{root}/{split}/{c}")
                    for i in range(n):
                        Image.new("RGB", (20, 24), colour).save(f"{root}/{split}/{c}/{i}.jpg")
            Image.new("L", (16, 16), 90).save(f"{root}/train/dog/gray.png")   # other mode and size
            os.makedirs(f"{root}/train/.ipynb_checkpoints")      # hidden folders are no classes
            os.makedirs(f"{root}/test/.ipynb_checkpoints")
            with open(f"{root}/train/cat/._0.jpg", "wb") as f:   # macOS metadata beside an image
                f.write(b"\x00\x05\x16\x07 not a JPEG")
            for name in ("cat/1.jpg", "dog/0.jpg", "dog/1.jpg"):      # broken test files
                with open(f"{root}/test/{name}", "wb") as f:
                    f.write(b"\xff\xd8\xff cut short")
            d = datasets.load_data("folder", root, image_size=16)
            self.assertEqual(d.classes, ["cat", "dog"])
            self.assertEqual(d.train.images.shape, (7, 3, 16, 16))
            self.assertEqual(d.train.labels.tolist(), [0, 0, 0, 1, 1, 1, 1])
            # left out and named, rather than stopping the run at the first, after the decoding;
            # the same from the decoded copy kept beside them
            self.assertEqual(d.test.labels.tolist(), [0])
            note = (f"left out 3 file(s) in {root}/test that no decoder could read (cat/1.jpg, "
                    f"dog/0.jpg, dog/1.jpg); replace or delete them, and this line goes")
            self.assertEqual(d.notes, [note])
            self.assertEqual(datasets.load_data("folder", root, image_size=16).notes, [note])
            os.remove(f"{root}/test/cat/0.jpg")                      # none readable: that is the error
            with self.assertRaisesRegex(datasets.DataError, "cat/1.jpg is not an image PIL can read"):
                datasets.load_data("folder", root, image_size=16)
            for name, colour in (("cat/0.jpg", (200, 30, 30)), ("cat/1.jpg", (200, 30, 30)),
                                 ("dog/0.jpg", (30, 30, 200)), ("dog/1.jpg", (30, 30, 200))):
                Image.new("RGB", (20, 24), colour).save(f"{root}/test/{name}")      # mended
            d = datasets.load_data("folder", root, image_size=16)
            self.assertEqual(d.test.images.shape, (4, 3, 16, 16))
            self.assertGreater(d.train.images[0, 0].float().mean(), 150)       # red stays red
            self.assertEqual(len(d.mean), 3)

    def test_class_folders_without_a_test_folder(self):
        # Most photo collections come as <class>/<image>, with no train/ and test/: about a tenth
        # of each class is held out, chosen by a hash of each image's name.
        def add(c, label, numbers):
            os.makedirs(f"{root}/{c}", exist_ok=True)
            for i in numbers:
                Image.new("RGB", (8, 8), (label * 100, i * 6, 0)).save(f"{root}/{c}/{i}.png")
        with tempfile.TemporaryDirectory() as root:
            add("ant", 0, range(20))
            add("bee", 1, range(30))
            add("cow", 2, range(9))
            os.makedirs(f"{root}/__MACOSX/ant")       # left by a zip made on a Mac: no class
            with open(f"{root}/ant/00.png", "wb") as f:   # a download cut short
                f.write(b"\x89PNG\r\n")
            d = datasets.load_data("folder", root, image_size=8)
            self.assertEqual(d.classes, ["ant", "bee", "cow"])
            # the names whose hash falls in the first tenth: ant/16 and 17, bee/0, 7 and 8, cow/0, 4 and 7
            self.assertEqual(d.test.labels.tolist(), [0, 0, 1, 1, 1, 2, 2, 2])
            self.assertEqual(d.test.images[:, 1, 0, 0].tolist(), [96, 102, 0, 42, 48, 0, 24, 42])
            self.assertEqual(len(d.train), 51)
            self.assertIn("about 10% of each class held out to test on", d.notes[0])
            # the broken file, second in the order: the others keep their labels and test images
            self.assertEqual(d.notes[1], f"left out 1 file(s) in {root} that no decoder could read "
                                         f"(ant/00.png); replace or delete them, and this line goes")
            pixels = lambda s: {tuple(x[:, 0, 0].tolist()) for x in s.images}
            self.assertFalse(pixels(d.train) & pixels(d.test))               # no image in both
            # Ten more bees (none of their names in the first tenth): the test set stays as it was,
            # whatever --seed and --val-split say, and no image moves from training to test.
            add("bee", 1, range(30, 40))
            again = datasets.load_data("folder", root, image_size=8, val_split=0.1, seed=5)
            self.assertTrue(torch.equal(again.test.images, d.test.images))
            self.assertEqual(len(again.train) + len(again.val), 61)
            # A class whose only image hashes into the test set keeps it to learn from.
            shutil.rmtree(f"{root}/cow")
            for i in list(range(16)) + [17, 18, 19]:
                os.remove(f"{root}/ant/{i}.png")          # ant/16.png is left
            alone = datasets.load_data("folder", root, image_size=8)
            self.assertEqual(alone.train.labels.tolist().count(0), 1)
            self.assertEqual(alone.test.labels.tolist(), [1, 1, 1])
            for f in os.listdir(f"{root}/bee"):
                if f != "1.png":                          # bee/1.png is not in the first tenth
                    os.remove(f"{root}/bee/{f}")
            with self.assertRaisesRegex(datasets.DataError, "too few images to hold out about 10%"):
                datasets.load_data("folder", root, image_size=8)
            # One class alone: every answer right, 100% from the first step, nothing learned.
            shutil.rmtree(f"{root}/bee")
            with self.assertRaisesRegex(datasets.DataError, "has one class folder \\(ant\\), and a "
                                                            "classifier learns to tell classes apart"):
                datasets.load_data("folder", root, image_size=8)

    def test_large_images_are_shrunk_as_they_are_read(self):
        # A folder of photos must never be held at full size: each is read small (a JPEG decoded
        # at a fraction of its size by PIL's draft mode, then resized), in threads, in file order.
        shapes, drafts, real = [], [], datasets.read_image

        def spy(path, size=None):
            x = real(path, size)
            shapes.append(tuple(x.shape))
            return x
        real_draft = JpegImagePlugin.JpegImageFile.draft

        def draft(im, mode, size):
            drafts.append(size)
            return real_draft(im, mode, size)
        clock = itertools.count(step=6)    # each look at the clock 6 s later: a slow folder
        with tempfile.TemporaryDirectory() as tmp:
            files = [f"{tmp}/{i}.jpg" for i in range(3)]
            noise = torch.Generator().manual_seed(0)
            for i, f in enumerate(files):      # noise, so that each file is as big as a photo's
                x = torch.randint(0, 40, (480, 640, 3), generator=noise, dtype=torch.uint8) + 80 * i
                Image.fromarray(x.numpy()).save(f, quality=95)
            self.assertGreater(min(os.path.getsize(f) for f in files), 100_000)
            with unittest.mock.patch.object(datasets, "read_image", spy), \
                    unittest.mock.patch.object(JpegImagePlugin.JpegImageFile, "draft", draft), \
                    unittest.mock.patch.object(datasets.time, "monotonic", lambda: next(clock)), \
                    contextlib.redirect_stdout(io.StringIO()) as out:
                split, left_out = datasets._decode_files(files, [0, 1, 0], 16, "photos/train")
            # Photos too many for the machine's memory at that size: said before decoding a byte
            # (the 3 reads above are all there were). Three at 30,000 pixels a side, twice over:
            with unittest.mock.patch.object(datasets, "_memory_bytes", lambda: 8e9), \
                    unittest.mock.patch.object(datasets, "read_image", spy), \
                    self.assertRaisesRegex(datasets.DataError, "photos/train: 3 images at 30000x30000 "
                                           "pixels need about 16.2 GB of memory, and this machine has 8.0 GB"):
                datasets._decode_files(files, [0, 1, 0], 30000, "photos/train")
        self.assertEqual(shapes, [(3, 16, 16)] * 3)          # no full-size image ever left a read
        self.assertEqual(drafts, [(16, 16)] * 3)
        self.assertEqual((split.images.shape, left_out), ((3, 3, 16, 16), []))
        red = split.images[:, 0].float().mean(dim=(1, 2))          # (3,): about 20, 100, 180
        self.assertEqual([round((v - 20) / 80) for v in red.tolist()], [0, 1, 2])
        self.assertIn("decoding photos/train: 1/3 images, about 24 s to go", out.getvalue())

    def test_photos_are_read_upright_as_their_exif_says(self):
        # A phone stores a portrait photo on its side, with EXIF orientation 6: "turn it 90 degrees
        # clockwise to view". Stored here 60 wide and 40 high, left half red: upright it is 40 wide
        # and 60 high with the red half on top, whichever decoder reads it and at any size.
        with tempfile.TemporaryDirectory() as tmp:
            im = Image.new("RGB", (60, 40), (0, 0, 200))
            im.paste((200, 0, 0), (0, 0, 30, 40))
            exif = Image.Exif()
            exif[0x0112] = 6
            for ext in ("jpg", "png"):
                path = f"{tmp}/side.{ext}"
                im.save(path, exif=exif)
                for size, shape in ((None, (3, 60, 40)), (20, (3, 20, 20))):
                    with self.subTest(ext=ext, size=size):
                        x = datasets.read_image(path, size)
                        self.assertEqual(tuple(x.shape), shape)
                        h = x.shape[1]
                        self.assertGreater(x[0, :h // 2 - 2].float().mean(), 150)    # red on top
                        self.assertLess(x[0, h // 2 + 2:].float().mean(), 50)       # blue below

    def test_image_folder_cache(self):
        with tempfile.TemporaryDirectory() as root:
            for split in ("train", "test"):
                for c, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
                    os.makedirs(f"{root}/{split}/{c}")
                    for i in range(2):
                        Image.new("RGB", (8, 8), colour).save(f"{root}/{split}/{c}/{i}.jpg")
            first = datasets.load_data("folder", root, image_size=8)
            self.assertTrue(os.path.isfile(f"{root}/train/.decoded-8px.pt"))
            with unittest.mock.patch.object(datasets, "read_image", side_effect=AssertionError("decoded")):
                again = datasets.load_data("folder", root, image_size=8)      # from the cache
            torch.testing.assert_close(again.train.images, first.train.images, rtol=0, atol=0)
            torch.testing.assert_close(again.test.labels, first.test.labels)
            # A changed file is decoded again: the cat turns green.
            Image.new("RGB", (8, 8), (30, 200, 30)).save(f"{root}/train/cat/0.jpg")
            os.utime(f"{root}/train/cat/0.jpg", ns=(1, 1))    # a new mtime even on a coarse clock
            changed = datasets.load_data("folder", root, image_size=8)
            self.assertGreater(changed.train.images[0, 1].float().mean(), 150)
            self.assertLess(changed.train.images[1, 1].float().mean(), 100)    # the other cat stays red
            # A folder the cache can't be written to still loads.
            with unittest.mock.patch.object(torch, "save", side_effect=OSError("read-only")):
                datasets.load_data("folder", root, image_size=4)
            self.assertFalse(any(".tmp" in f or "4px" in f for f in os.listdir(f"{root}/train")))

    def test_folder_errors_are_sentences(self):
        with tempfile.TemporaryDirectory() as outer:
            root = os.path.join(outer, "images")
            os.makedirs(root)
            with self.assertRaisesRegex(datasets.DataError, "must hold train/ and test/"):
                datasets.load_data("folder", root)
            os.makedirs(f"{root}/train/a")
            os.makedirs(f"{root}/test/a")
            with self.assertRaisesRegex(datasets.DataError, "train has one class folder \\(a\\)"):
                datasets.load_data("folder", root)    # nothing to tell apart
            os.makedirs(f"{root}/train/c")
            Image.new("RGB", (8, 8)).save(f"{root}/train/c/0.png")
            with self.assertRaisesRegex(datasets.DataError, "train/a holds no images"):
                datasets.load_data("folder", root)    # a class with nothing to learn from
            os.makedirs(f"{root}/test/b")           # a test class that training never sees
            with self.assertRaisesRegex(datasets.DataError, "test has class folders that .* lacks: b"):
                datasets.load_data("folder", root)
            # --data-dir one level off, below or above the dataset: the message names the right one
            meant = re.escape(f"did you mean --data-dir {root}?")
            with self.assertRaisesRegex(datasets.DataError, meant):
                datasets.load_data("folder", f"{root}/train")
            with self.assertRaisesRegex(datasets.DataError, meant):
                datasets.load_data("folder", outer)
            # The folder given without --dataset folder: not CIFAR downloaded into it
            with self.assertRaisesRegex(datasets.DataError, "looks like an image folder, .* add --dataset folder"):
                datasets.load_data("cifar10", root)
        with self.assertRaisesRegex(datasets.DataError, "does not exist"):
            datasets.load_data("folder", "/no/such/folder")
        with self.assertRaisesRegex(datasets.DataError, "test_vit.py is a file, not a folder"):
            datasets.load_data("folder", os.path.join(HERE, "test_vit.py"))

    def test_cifar_as_torchvision_stores_it(self):
        # The used-by command's own data: torchvision's CIFAR files (pickled rows of 3072 bytes,
        # 1024 red, then green, then blue, row by row), written small here; the checksums are
        # skipped, as these are not the real files.
        rows = torch.zeros(5, 3, 32, 32, dtype=torch.uint8)
        rows[:, 0, 1, 2] = torch.arange(5) + 10             # red of the pixel at row 1, column 2
        rows[:, 2, 31, 0] = 200                              # blue of the pixel at row 31, column 0
        tv = torchvision.datasets
        for name, cls, labels_key, mean in (("cifar10", tv.CIFAR10, "labels", datasets.CIFAR10_MEAN),
                                            ("cifar100", tv.CIFAR100, "fine_labels", datasets.CIFAR100_MEAN)):
            with self.subTest(name), tempfile.TemporaryDirectory() as root:
                folder = os.path.join(root, cls.base_folder)
                os.makedirs(folder)
                for file, _ in cls.train_list + cls.test_list:
                    with open(os.path.join(folder, file), "wb") as f:
                        pickle.dump({"data": rows.flatten(1).numpy(), labels_key: [0, 1, 2, 3, 9]}, f)
                with open(os.path.join(folder, cls.meta["filename"]), "wb") as f:
                    pickle.dump({cls.meta["key"]: [f"name{i}" for i in range(10)]}, f)
                with unittest.mock.patch("torchvision.datasets.cifar.check_integrity", return_value=True):
                    d = datasets.load_data(name, root)
                self.assertEqual(d.train.images.shape, (5 * len(cls.train_list), 3, 32, 32))
                torch.testing.assert_close(d.test.images, rows, rtol=0, atol=0)   # (N, C, H, W)
                self.assertEqual(d.train.labels[:5].tolist(), [0, 1, 2, 3, 9])
                self.assertEqual(d.classes[9], "name9")
                self.assertEqual(d.mean, mean)

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

    def test_crop_flip_is_per_image_crop_of_mirror_padded_image_then_flip(self):
        # The batch version must do exactly what RandomCrop(padding, "reflect") + a flip do per image.
        for p, H, W in [(4, 32, 32), (2, 6, 9), (0, 5, 5)]:
            x = torch.randint(0, 256, (16, 3, H, W), dtype=torch.uint8)
            torch.manual_seed(1)
            out = datasets.crop_flip(x, p, True)
            torch.manual_seed(1)                       # replay crop_flip's draws
            dy, dx = torch.randint(0, 2 * p + 1, (16, 1)), torch.randint(0, 2 * p + 1, (16, 1))
            flip = torch.rand(16, 1) < 0.5
            padded = F.pad(x.float(), (p, p, p, p), mode="reflect") if p else x.float()
            for b in range(16):
                want = padded[b, :, dy[b, 0]:dy[b, 0] + H, dx[b, 0]:dx[b, 0] + W]
                want = want.flip(-1) if flip[b, 0] else want
                self.assertTrue(torch.equal(out[b], want.to(torch.uint8)), (p, H, W, b))
        self.assertGreater(flip.sum().item(), 2)        # both branches were taken
        self.assertIs(datasets.crop_flip(x, 0, False), x)
        which = torch.rand(16) < 0.5                    # or the images to mirror, given
        self.assertTrue(torch.equal(datasets.crop_flip(x, 0, which), torch.where(which[:, None, None, None], x.flip(-1), x)))
        self.assertIsNone(datasets.train_transform())  # nothing left to do per image by default

    def test_normalize(self):
        images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
        mean, std = datasets.channel_stats(images)
        # Counting byte values must give what the float computation gives, to the 4 digits we keep.
        flat = images.float().div(255).transpose(0, 1).flatten(1)     # (C, N*H*W)
        for got, want in zip(mean + std, flat.mean(1).tolist() + flat.std(1).tolist()):
            self.assertAlmostEqual(got, want, delta=6e-5)
        x = datasets.normalize(images, mean, std)
        self.assertEqual(x.dtype, torch.float32)
        self.assertAlmostEqual(x.mean().item(), 0.0, delta=0.01)
        self.assertEqual(datasets.normalize(images, mean, std, size=(12, 12)).shape, (4, 3, 12, 12))
        # A channel that never changes: std 0 made every pixel NaN (0 / 0), and the run stopped at
        # its first step with "the loss became nan".
        images[:, 1] = 30
        mean, std = datasets.channel_stats(images)
        self.assertEqual((mean[1], std[1]), (round(30 / 255, 4), round(1 / 255, 4)))
        self.assertTrue(datasets.normalize(images, mean, std).isfinite().all())


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
        for name in ("muon", "adamw", "sgd"):
            opt = train.make_optimizer(model, 1e-3, 0.05, torch.device("cpu"), name)
            decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
            names = {n for n, p in model.named_parameters() if id(p) in decayed}
            self.assertIn("blocks.0.attn.qkv.weight", names)
            self.assertIn("patch_embed.weight", names)
            for n in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"):
                self.assertNotIn(n, names)
            self.assertEqual(sum(len(g["params"]) for g in opt.param_groups), len(list(model.parameters())))

    def test_orthogonalize_sets_singular_values_near_one(self):
        torch.manual_seed(0)
        for shape in ((4, 24, 72), (3, 48, 16), (2, 32, 32)):          # wide, tall, square
            # G = U S V^T with its singular values spread 30-fold
            k = min(shape[1:])
            U = torch.linalg.qr(torch.randn(shape[0], shape[1], k)).Q
            V = torch.linalg.qr(torch.randn(shape[0], shape[2], k)).Q
            G = U @ torch.diag(torch.logspace(0, -1.5, k)) @ V.mT
            O = train.orthogonalize(G)
            self.assertEqual(O.shape, G.shape)
            s = torch.linalg.svdvals(O)
            self.assertGreater(s.min().item(), 0.6, shape)
            self.assertLess(s.max().item(), 1.25, shape)

    def test_muon_steps_the_blocks_matrices_and_adamw_the_rest(self):
        # One step from zero momentum: a block matrix moves by lr * 0.2 sqrt(max(m, n)) times an
        # orthogonalised gradient, so all singular values of its change are about equal; AdamW's first
        # step moves every entry by about lr (its update is m / sqrt(v) = the gradient's sign).
        torch.manual_seed(0)
        model = ViT(ViTConfig(**TINY))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = train.make_optimizer(model, 1e-2, 0.0, torch.device("cpu"), "muon")
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        after = dict(model.named_parameters())
        w = "blocks.0.mlp.fc1.weight"
        m, n = before[w].shape
        s = torch.linalg.svdvals((before[w] - after[w].detach()) / (1e-2 * 0.2 * max(m, n) ** 0.5))
        self.assertGreater(s.min().item(), 0.6)
        self.assertLess(s.max().item(), 1.25)
        for name in ("patch_embed.weight", "head.weight", "pos_embed", "blocks.0.attn.qkv.bias"):
            step = (before[name] - after[name].detach()).abs()
            self.assertAlmostEqual(step.mean().item(), 1e-2, delta=1e-4, msg=name)
        state = opt.state_dict()                                          # and it checkpoints
        opt2 = train.make_optimizer(model, 1e-2, 0.0, torch.device("cpu"), "muon")
        opt2.load_state_dict(state)
        self.assertTrue(torch.equal(opt2.optimizers[0].state[after[w]]["momentum"],
                                    opt.optimizers[0].state[after[w]]["momentum"]))

    def test_muon_orthogonalises_q_k_and_v_apart(self):
        # If the stacked qkv weight were one matrix, a large gradient for q would take the whole
        # orthogonalised step and leave k and v almost still. Split, each of the three moves by an
        # orthogonal matrix of its own: the singular values of each one's change are about 1 (but
        # the smallest, as a random square gradient has some near 0 that 5 steps lift only partly).
        torch.manual_seed(0)
        model = ViT(ViTConfig(**TINY))
        D = TINY["dim"]
        qkv = model.blocks[0].attn.qkv.weight                          # (3D, D): q, k, v rows
        before = qkv.detach().clone()
        opt = train.make_optimizer(model, 1e-2, 0.0, torch.device("cpu"), "muon")
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        qkv.grad[:D] *= 1000                                            # q's rows
        opt.step()
        for part in ((before - qkv.detach()) / (1e-2 * 0.2 * D ** 0.5)).chunk(3):   # q, k, v: (D, D)
            s = torch.linalg.svdvals(part)
            self.assertGreater(s.median().item(), 0.6)
            self.assertLess(s.max().item(), 1.25)

    @unittest.skipUnless(hasattr(torch.optim, "Muon"), "torch.optim.Muon came in PyTorch 2.9")
    def test_muon_matches_pytorchs(self):
        torch.manual_seed(0)
        a = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in ((48, 16), (16, 48), (48, 16))]
        b = [torch.nn.Parameter(p.detach().clone()) for p in a]
        start = [p.detach().clone() for p in a]
        ours = train.Muon(a, lr=1e-2, weight_decay=0.05)
        theirs = torch.optim.Muon(b, lr=1e-2, weight_decay=0.05, adjust_lr_fn="match_rms_adamw")
        for _ in range(3):
            g = [torch.randn_like(p) for p in a]
            for p, q, gi in zip(a, b, g):
                p.grad, q.grad = gi.clone(), gi.clone()
            ours.step()
            theirs.step()
        for p, q, p0 in zip(a, b, start):   # theirs orthogonalises in bfloat16, ours in float32
            self.assertGreater((p - p0).abs().max().item(), 0.01)      # they moved, and alike
            torch.testing.assert_close(p, q, atol=5e-4, rtol=0)

    def test_train_then_eval_only(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "runs", "m.pt")       # a folder that --out makes
            # The class token: the fake images' class is a square's place and colour, which this
            # 2-block model finds in 2 epochs through a class token (35% here) but not yet through
            # the mean token (12.5%; 27% after 4 epochs).
            code, log = run_train("--dataset", "fake", "--epochs", 2, "--batch-size", 50, "--dim", 32,
                                  "--depth", 2, "--heads", 2, "--pool", "cls", "--out", out, "--lr", "3e-3")
            self.assertEqual(code, 0, log)
            self.assertIn("epoch   2/2", log)
            # the time left after each epoch but the last, and what to run next
            self.assertRegex(log, r"epoch   1/2 .* 0:\d\d, 0:\d\d to go\n")
            self.assertRegex(log, r"epoch   2/2 .* 0:\d\d\n")
            self.assertIn(f"to draw what it learned: python visualize.py --ckpt {out}", log)
            ckpt = torch.load(out, weights_only=True)       # plain data: no code runs on load
            self.assertEqual(ckpt["epoch"], 2)
            self.assertEqual(ckpt["config"]["dim"], 32)
            self.assertEqual(len(ckpt["metrics"]), 2)
            self.assertTrue(all(not k.startswith("_orig_mod") for k in ckpt["model"]))
            with open(os.path.join(tmp, "runs", "m.metrics.jsonl")) as f:
                lines = [json.loads(line) for line in f]
            self.assertEqual([line["epoch"] for line in lines], [1, 2])
            self.assertGreater(lines[-1]["eval_acc"], 0.2)   # above chance (0.1): it learns
            self.assertFalse(lines[-1]["eval_tta"])
            code, log = run_train("--eval-only", "--ckpt", out)
            self.assertEqual(code, 0, log)
            last = log.strip().splitlines()[-1]
            self.assertIn("test accuracy", last)
            self.assertIn(f"{100 * lines[-1]['eval_acc']:.2f}%", last)   # the same model, read back
            code, log = run_train("--eval-only", "--ckpt", out, "--tta", "--epochs", 3, "--lr", 1)
            self.assertEqual(code, 0, log)
            self.assertIn("each with its mirror image (--tta)", log)
            self.assertIn("--eval-only ignores --epochs, --lr (training flags)", log)   # not silently
            # --tta in a training run evaluates every epoch that way; its log must say so, or its
            # accuracy would be read as the plain one.
            tta_out = os.path.join(tmp, "tta.pt")
            code, log = run_train("--dataset", "fake", "--epochs", 1, "--batch-size", 50, "--dim", 32,
                                  "--depth", 2, "--heads", 2, "--out", tta_out, "--tta")
            self.assertEqual(code, 0, log)
            self.assertIn("test (tta) loss", log)
            with open(os.path.join(tmp, "tta.metrics.jsonl")) as f:
                self.assertTrue(json.loads(f.readline())["eval_tta"])

    def test_other_classes_than_the_model_learned_are_refused(self):
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = os.path.join(tmp, "m.pt")
            code, log = run_train("--dataset", "fake", "--epochs", 1, "--batch-size", 100, "--dim", 32,
                                  "--depth", 2, "--heads", 2, "--out", ckpt)
            self.assertEqual(code, 0, log)
            # Ten classes, as many as the model predicts, but not its ten (class0 ... class9): label
            # 0 would be read as class0, and every figure would be wrong without a sign of it.
            for split in ("train", "test"):
                for c in range(10):
                    os.makedirs(f"{tmp}/images/{split}/kind{c}")
                    Image.new("RGB", (32, 32)).save(f"{tmp}/images/{split}/kind{c}/0.png")
            words = "was trained on 10 classes (class0, class1, class2, ...), but the images in"
            code, log = run_train("--eval-only", "--ckpt", ckpt, "--dataset", "folder", "--data-dir",
                                  f"{tmp}/images")
            self.assertEqual(code, 1, log)
            self.assertIn(words, log)
            code, log = run_train("--resume", ckpt, "--dataset", "folder", "--data-dir", f"{tmp}/images")
            self.assertEqual(code, 1, log)
            self.assertIn(words, log)
            folder_ckpt = torch.load(ckpt, weights_only=True)
            folder_ckpt["data"]["dataset"] = "folder"       # visualize.py reads the checkpoint's dataset
            torch.save(folder_ckpt, ckpt)
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                self.assertEqual(visualize.main(["--ckpt", ckpt, "--data-dir", f"{tmp}/images",
                                                 "--only", "predictions"]), 1)
            self.assertIn(words, err.getvalue())
            # Without --data-dir, the folder saved in the checkpoint; if the data has moved since
            # (or training ran elsewhere), the error says where that folder came from.
            folder_ckpt["args"]["data_dir"] = "data/moved-away"
            torch.save(folder_ckpt, ckpt)
            code, log = run_train("--eval-only", "--ckpt", ckpt)
            self.assertEqual(code, 1, log)
            self.assertIn(f"(data/moved-away is where {ckpt} was trained from; say where the data is "
                          f"now with --data-dir)", log)

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
                     (("--eval-only", "--ckpt", tmp), 1, "is a folder; name the .pt file in it"),
                     (("--eval-only", "--ckpt", junk), 1, "is not a checkpoint: torch.save writes a zip"),
                     (("--out", os.path.join(junk, "m.pt")), 2, "can't make the folder"),   # a file there
                     # an empty --out (a script's unset variable) trained an epoch, then failed to save
                     (("--out", ""), 2, "--out is empty; give it a value, or leave it out"),
                     (("--resume", ""), 2, "--resume is empty"),       # had started a new run
                     # nan passes every `x < 0` check, and --mixup nan had silently meant no Mixup
                     (("--mixup", "nan"), 2, "--mixup must be a finite number, got nan"),
                     (("--lr", "inf"), 2, "--lr must be a finite number, got inf"),
                     (("--patience", -1), 2, "--patience must be 0 or more (0 never stops early), got -1"),
                     (("--workers", -1), 2, "--workers must be 0 or more"),
                     (("--mixup", -1), 2, "--mixup must be 0 or more (0 turns it off), got -1.0"),
                     # a negative --crop-padding was a traceback from torch.randint, one as large as
                     # the image a crop that quietly clamped, and a negative --min-lr a schedule
                     # that ended below zero, climbing the loss
                     (("--crop-padding", -1), 2, "--crop-padding must be 0 or more"),
                     (("--crop-padding", 32), 2, "--crop-padding 32 must be smaller than the image (32 pixels)"),
                     (("--min-lr", -1e-3), 2, "--min-lr must be 0 or more, got -0.001"),
                     # these two had been ignored without a word: a negative fraction held out
                     # nothing, and a --min-lr above --lr was clamped to it
                     (("--val-split", -0.1), 2, "--val-split must be a fraction of the training set, in [0, 1)"),
                     (("--min-lr", 0.1, "--lr", 1e-3), 2, "--min-lr 0.1 is above --lr 0.001")]
            for argv, want_code, words in cases:
                with self.subTest(argv=argv):
                    # (an --out of its own: a case that trained after all must not write model.pt
                    # into the folder the tests run in)
                    if "--out" not in argv:
                        argv = (*argv, "--out", os.path.join(tmp, "m.pt"))
                    code, out = run_train("--dataset", "fake", "--epochs", 1, *argv)
                    self.assertEqual(code, want_code, out)
                    self.assertIn(words, out)
                    self.assertNotIn("Traceback", out)

    def test_help_explains_every_flag(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as done:
            train.main(["-h"])
        self.assertEqual(done.exception.code, 0)
        for flag in ("--dataset", "--data-dir", "--model", "--epochs", "--batch-size", "--lr",
                     "--weight-decay", "--warmup-epochs", "--label-smoothing", "--device", "--workers",
                     "--seed", "--out", "--image-size", "--patch-size", "--dim", "--depth", "--heads",
                     "--mlp-ratio", "--val-split", "--eval-only", "--ckpt", "--compile", "--tta"):
            self.assertIn(flag, out.getvalue())


class TestReliability(unittest.TestCase):
    SMALL = ("--dataset", "fake", "--batch-size", 50, "--dim", 32, "--depth", 2, "--heads", 2)

    def test_interrupted_and_resumed_run_equals_uninterrupted(self):
        with tempfile.TemporaryDirectory() as tmp:
            a, b = os.path.join(tmp, "a.pt"), os.path.join(tmp, "b.pt")
            code, log = run_train(*self.SMALL, "--epochs", 3, "--out", a, "--drop-path", 0.1)
            self.assertEqual(code, 0, log)
            # Stop part-way into epoch 2 (step 27 of 60), exactly as Ctrl-C would: the flag is set.
            real = train.stop_requested

            def stop_at_27(ctx, step):
                if step == 27:
                    ctx["stop"].signal = "SIGINT"
                return real(ctx, step)
            train.stop_requested = stop_at_27
            try:
                code, log = run_train(*self.SMALL, "--epochs", 3, "--out", b, "--drop-path", 0.1)
            finally:
                train.stop_requested = real
            self.assertEqual(code, 128 + signal.SIGINT, log)
            self.assertIn(f"Continue with: python train.py --resume {b}", log)
            stopped = torch.load(b, weights_only=True)
            self.assertEqual(stopped["step"], 27)
            code, log = run_train("--resume", b)
            self.assertEqual(code, 0, log)
            self.assertIn("at step 27 (epoch 2, batch 8 of 20)", log)
            # the run's clock goes on from the stop, not from the end of epoch 1
            self.assertGreaterEqual(stopped["elapsed_s"], stopped["metrics"][0]["elapsed_s"])
            self.assertGreaterEqual(torch.load(b, weights_only=True)["metrics"][1]["elapsed_s"],
                                    stopped["elapsed_s"])
            ckpt_a, ckpt_b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
            # Same weights and the same metrics (timings aside): deterministic on CPU, so exactly equal.
            for k, v in ckpt_a["model"].items():
                torch.testing.assert_close(ckpt_b["model"][k], v, rtol=0, atol=0)
            timing = ("images_per_s", "epoch_s", "elapsed_s")
            strip = lambda hist: [{k: v for k, v in h.items() if k not in timing} for h in hist]
            self.assertEqual(strip(ckpt_a["metrics"]), strip(ckpt_b["metrics"]))
            # Resuming a run that has finished says so, and leaves its checkpoint as it was.
            with open(a, "rb") as f:
                before = f.read()
            code, log = run_train("--resume", a)
            self.assertEqual(code, 0, log)
            self.assertIn("has trained to the end of epoch 3, and --epochs is 3: nothing to do", log)
            with open(a, "rb") as f:
                self.assertEqual(f.read(), before)

    def _stopped_resumed_and_read_on_the_cpu(self, device):
        """Every recipe piece, mixed precision and loader processes on `device`, a run stopped
        part-way into epoch 2 and resumed, then read back by --eval-only on the CPU. On a GPU this
        is where a tensor on the wrong device breaks a run: the saved random state, the optimizers'
        and the EMA's state, the epoch's running sums, the gradient scaler, the checkpoint itself."""
        real = train.stop_requested

        def stop_at_6(ctx, step):              # epoch 2 of 4 steps each, part-way
            if step == 6:
                ctx["stop"].signal = "SIGINT"
            return real(ctx, step)
        recipe = ("--augment", "trivialaugment", "--mixup", 0.8, "--cutmix", 1.0, "--random-erasing", 0.25,
                  "--repeat-aug", 2, "--drop-path", 0.1, "--ema", 0.9, "--workers", 2, "--device", device)
        with tempfile.TemporaryDirectory() as tmp, fake_images(200):
            for precision in ("bf16", "fp16"):      # fp16 with loss scaling
                out = os.path.join(tmp, f"{precision}.pt")
                with unittest.mock.patch.object(train, "stop_requested", stop_at_6):
                    code, log = run_train(*self.SMALL, *recipe, "--precision", precision, "--epochs", 2,
                                          "--out", out)
                self.assertEqual(code, 128 + signal.SIGINT, log)
                self.assertEqual(train.load_checkpoint(out)["step"], 6)
                code, log = run_train("--resume", out)
                self.assertEqual(code, 0, log)
                self.assertIn(f"device {device}", log)
                ckpt = train.load_checkpoint(out)
                self.assertEqual([m["epoch"] for m in ckpt["metrics"]], [1, 2])
                self.assertTrue(all(math.isfinite(m["train_loss"]) for m in ckpt["metrics"]), log)
                code, log = run_train("--eval-only", "--ckpt", out, "--device", "cpu")
                self.assertEqual(code, 0, log)
                self.assertIn("test accuracy", log.strip().splitlines()[-1])

    def test_a_run_with_every_recipe_piece_resumes(self):
        self._stopped_resumed_and_read_on_the_cpu("cpu")

    @unittest.skipUnless(torch.cuda.is_available(), "no CUDA GPU")
    def test_a_gpu_run_resumes_and_reads_back_on_the_cpu(self):
        self._stopped_resumed_and_read_on_the_cpu("cuda")

    def test_a_long_epoch_is_saved_part_way(self):
        real = train.stop_requested

        def crash_at_27(ctx, step):           # a crash part-way into epoch 2 (steps 21-40)
            if step == 27:
                raise RuntimeError("power cut")
            return real(ctx, step)

        with tempfile.TemporaryDirectory() as tmp:
            a, b, c = (os.path.join(tmp, f"{n}.pt") for n in "abc")
            code, log = run_train(*self.SMALL, "--epochs", 2, "--out", a, "--drop-path", 0.1)
            self.assertEqual(code, 0, log)
            train.stop_requested = crash_at_27
            try:
                # --save-every's interval, here far below a step's time, saves after every step;
                # at the default of 30 minutes only the end of epoch 1 was saved.
                for out, every in ((b, 1e-6), (c, 30)):
                    with self.assertRaisesRegex(RuntimeError, "power cut"):
                        run_train(*self.SMALL, "--epochs", 2, "--out", out, "--drop-path", 0.1,
                                  "--save-every", every)
            finally:
                train.stop_requested = real
            self.assertEqual(torch.load(c, weights_only=True)["step"], 20)
            ckpt = torch.load(b, weights_only=True)
            self.assertEqual(ckpt["step"], 26)
            self.assertIn("partial_epoch", ckpt)
            code, log = run_train("--resume", b)
            self.assertEqual(code, 0, log)
            self.assertIn("at step 26 (epoch 2, batch 7 of 20)", log)
            ckpt_a, ckpt_b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
            for k, v in ckpt_a["model"].items():      # as if it had never crashed
                torch.testing.assert_close(ckpt_b["model"][k], v, rtol=0, atol=0)
            self.assertEqual(ckpt_b["metrics"][-1]["train_loss"], ckpt_a["metrics"][-1]["train_loss"])
            # A crash in the evaluation after an epoch's last step: the part-way save before that
            # step is the one to resume from; one after it would skip the epoch's evaluation.
            real_eval = train.evaluate
            train.evaluate = unittest.mock.Mock(side_effect=RuntimeError("power cut"))
            try:
                with self.assertRaisesRegex(RuntimeError, "power cut"):
                    run_train(*self.SMALL, "--epochs", 2, "--out", c, "--drop-path", 0.1,
                              "--save-every", 1e-6)
            finally:
                train.evaluate = real_eval
            self.assertEqual(torch.load(c, weights_only=True)["step"], 19)
            code, log = run_train("--resume", c)
            self.assertEqual(code, 0, log)
            ckpt_c = torch.load(c, weights_only=True)
            for k, v in ckpt_a["model"].items():
                torch.testing.assert_close(ckpt_c["model"][k], v, rtol=0, atol=0)
            accs = lambda ckpt: [h["eval_acc"] for h in ckpt["metrics"]]
            self.assertEqual(accs(ckpt_c), accs(ckpt_a))               # both epochs, evaluated once

    def test_compile_without_its_tools_fails_at_once_in_one_sentence(self):
        # Stand in for a machine without a C++ compiler: compiled functions fail when first called,
        # as PyTorch's do there, with PyTorch's message.
        def broken_compile(fn, **kwargs):
            def call(*args):
                raise RuntimeError("backend='inductor' raised:\nInvalidCxxCompiler: No working C++ "
                                   "compiler found in torch._inductor.config.cpp.cxx: (None, 'g++')")
            return call
        real, torch.compile = torch.compile, broken_compile
        try:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "m.pt")
                code, log = run_train(*self.SMALL, "--epochs", 1, "--compile", "--out", out)
                self.assertFalse(os.path.exists(out))             # stopped before any training
        finally:
            torch.compile = real
        self.assertEqual(code, 2, log)
        self.assertIn("--compile: torch.compile does not work on this machine (InvalidCxxCompiler: No "
                      "working C++ compiler", log)
        self.assertIn("train without --compile", log)
        self.assertNotIn("Traceback", log)

    def test_ctrl_c_before_training_is_one_line(self):
        # Ctrl-C while the images are still being read, before the training loop's handler is
        # installed: a line and 128 + SIGINT, as after a stop during training, not a traceback.
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = os.path.join(tmp, "m.pt")
            self.assertEqual(run_train(*self.SMALL, "--epochs", 1, "--out", ckpt)[0], 0)
            real = datasets.load_data
            datasets.load_data = interrupted
            try:
                code, log = run_train(*self.SMALL, "--epochs", 1, "--out", os.path.join(tmp, "n.pt"))
                err = io.StringIO()
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    vis_code = visualize.main(["--ckpt", ckpt, "--only", "predictions"])
            finally:
                datasets.load_data = real
        self.assertEqual(code, 128 + signal.SIGINT, log)
        self.assertIn("stopped by Ctrl-C; any checkpoint already written is intact", log)
        self.assertNotIn("Traceback", log)
        self.assertEqual(vis_code, 128 + signal.SIGINT)
        self.assertIn("stopped by Ctrl-C", err.getvalue())

    def test_out_of_memory_is_one_sentence_with_the_way_out(self):
        for error in (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                      RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"),
                      RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                                   "can't allocate memory: you tried to allocate 8589934592 bytes"),
                      MemoryError()):
            with self.subTest(error=error), unittest.mock.patch.object(train, "run", side_effect=error):
                code, log = run_train("--dataset", "fake")
                self.assertEqual(code, 1, log)
                self.assertIn("error: out of memory (", log)
                self.assertIn("--grad-accum 4", log)
                self.assertNotIn("Traceback", log)
        with unittest.mock.patch.object(train, "run", side_effect=RuntimeError("a bug")):
            with self.assertRaisesRegex(RuntimeError, "a bug"):      # other errors stay tracebacks
                run_train("--dataset", "fake")

    def test_full_disk_while_saving_is_one_sentence(self):
        def full_disk(obj, f, *args, **kwargs):
            f.write(b"half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed "
                               "writing file data/3: file write failed")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "m.pt")
            real, torch.save = torch.save, full_disk
            try:
                code, log = run_train(*self.SMALL, "--epochs", 1, "--out", out)
            finally:
                torch.save = real
            self.assertEqual(code, 1, log)
            self.assertIn(f"could not save {out} ([enforce fail", log)
            self.assertNotIn("Traceback", log)
            self.assertEqual(os.listdir(tmp), ["m.metrics.jsonl"])   # no half-written m.pt.tmp
            # A part-way save (--save-every) that fails is only a warning: the disk may have room
            # again by the epoch's end, whose save is the one that must not fail.
            calls = []

            def full_once(obj, f, *args, **kwargs):
                calls.append(1)
                return full_disk(obj, f) if len(calls) == 1 else real(obj, f, *args, **kwargs)
            torch.save = full_once
            try:
                code, log = run_train(*self.SMALL, "--epochs", 1, "--out", out, "--save-every", 1e-6)
            finally:
                torch.save = real
            self.assertEqual(code, 0, log)
            self.assertIn("warning: could not save", log)
            self.assertIn("training goes on", log)
            self.assertGreater(len(calls), 2)                  # it saved again after the warning
            self.assertEqual(torch.load(out, weights_only=True)["metrics"][-1]["epoch"], 1)

    def test_progress_says_when_the_run_ends(self):
        # Epoch 1 of 3, 10 batches, each look at the clock 61 s later (the start, then the update):
        # after 2 batches in 61 s, 8 are left in this epoch and 20 in the two after it.
        clock = itertools.count(step=61)
        with unittest.mock.patch.object(train.time, "time", lambda: next(clock)), \
                contextlib.redirect_stdout(io.StringIO()) as out:
            progress = train.Progress(10, "epoch 1/3", after=20)
            progress.update(2, lambda: "loss 2.3")          # 30.5 s a batch
        self.assertIn("epoch 1/3 [ 2/10] loss 2.3 eta 4:04, run 14:14", out.getvalue())

    def test_long_evaluation_shows_progress(self):
        # In a log file (not a terminal) a line a minute: a fine-tuned ViT-B/16 evaluates for
        # minutes on a CPU. Here each look at the clock is 61 s later.
        model = vit.build_model("cifar_tiny", dim=32, heads=2, depth=1)
        split = datasets.Split(torch.zeros(250, 3, 32, 32, dtype=torch.uint8), torch.zeros(250, dtype=torch.long))
        ctx = dict(device=torch.device("cpu"), rank=0, world=1, input_size=(32, 32), prefix="epoch 2/5",
                   mean=torch.zeros(3), std=torch.ones(3), autocast=contextlib.nullcontext)
        clock = itertools.count(step=61)
        with unittest.mock.patch.object(train.time, "time", lambda: next(clock)), \
                contextlib.redirect_stdout(io.StringIO()) as out:
            loss, acc = train.evaluate(model, split, ctx, batch_size=100)
        self.assertIn("epoch 2/5 evaluating [1/3] acc 100.0% eta 2:02", out.getvalue())   # all class 0
        self.assertIn("epoch 2/5 evaluating [2/3]", out.getvalue())
        self.assertAlmostEqual(loss, math.log(10), places=5)      # a zero head: every class 1/10

    def test_stop_request_handler(self):
        stop = train.StopRequest()
        with contextlib.redirect_stderr(io.StringIO()) as err:
            stop(signal.SIGTERM, None)
            self.assertEqual(stop.signal, "SIGTERM")
            with self.assertRaises(KeyboardInterrupt):       # the second signal quits at once
                stop(signal.SIGINT, None)
        self.assertIn("SIGTERM: finishing this step", err.getvalue())
        # Under torchrun a terminal's Ctrl-C reaches every process; only the first says so.
        quiet = train.StopRequest(loud=False)
        with contextlib.redirect_stderr(io.StringIO()) as err:
            quiet(signal.SIGINT, None)
        self.assertEqual((quiet.signal, err.getvalue()), ("SIGINT", ""))
        # A signal the run was started ignoring stays ignored: nohup ignores SIGHUP so that the run
        # outlives its terminal, and must not be undone.
        if hasattr(signal, "SIGHUP"):
            before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
            try:
                replaced = train.StopRequest().install()
                self.assertEqual(signal.getsignal(signal.SIGHUP), signal.SIG_IGN)
                self.assertIsInstance(signal.getsignal(signal.SIGTERM), train.StopRequest)
                train.StopRequest.restore(replaced)
            finally:
                signal.signal(signal.SIGHUP, before)

    def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "m.pt")
            self.assertEqual(run_train(*self.SMALL, "--epochs", 1, "--out", out)[0], 0)
            with open(out, "rb") as f:
                before = f.read()
            code, log = run_train("--resume", out, "--epochs", 3, "--lr", "1e30", "--grad-clip", 0)
            self.assertEqual(code, 1, log)
            self.assertIn("the loss became nan", log)
            with open(out, "rb") as f:
                self.assertEqual(f.read(), before)

    @fake_images(200)
    def test_best_checkpoint_and_patience(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "m.pt")
            # learning rate 0: accuracy never improves after epoch 1, so patience 2 stops after epoch 3
            code, log = run_train(*self.SMALL, "--epochs", 10, "--lr", 0, "--min-lr", 0, "--patience", 2,
                                  "--out", out)
            self.assertEqual(code, 0, log)
            self.assertIn("stopping early", log)
            self.assertEqual(train.load_checkpoint(out)["epoch"], 3)
            self.assertEqual(train.load_checkpoint(os.path.join(tmp, "m.best.pt"))["epoch"], 1)
            # The best checkpoint resumes too, into another file (into itself, its later epochs would
            # overwrite the best one), with a log that starts from its epoch 1.
            best = os.path.join(tmp, "m.best.pt")
            self.assertEqual(run_train("--resume", best)[0], 2)
            code, log = run_train("--resume", best, "--out", os.path.join(tmp, "b.pt"))
            self.assertEqual(code, 0, log)
            self.assertIn("resuming", log)
            self.assertEqual(train.load_checkpoint(best)["epoch"], 1)
            self.assertEqual(train.load_checkpoint(os.path.join(tmp, "b.pt"))["epoch"], 3)
            with open(os.path.join(tmp, "b.metrics.jsonl")) as f:
                self.assertEqual([json.loads(line)["epoch"] for line in f], [1, 2, 3])

    @fake_images(200)
    def test_a_new_run_keeps_the_earlier_one_and_resume_writes_where_it_read(self):
        def read(name):
            with open(os.path.join(tmp, name), "rb") as f:
                return f.read()
        with tempfile.TemporaryDirectory() as tmp:
            out, names = os.path.join(tmp, "m.pt"), ("m.pt", "m.best.pt", "m.metrics.jsonl")
            self.assertEqual(run_train(*self.SMALL, "--epochs", 1, "--out", out)[0], 0)
            first = {n: read(n) for n in names}
            code, log = run_train(*self.SMALL, "--epochs", 1, "--seed", 1, "--out", out)
            self.assertEqual(code, 0, log)
            self.assertIn(f"{out} held an earlier run; kept it as", log)
            for n in names:        # the first run, byte for byte, under _prev names; the second at m.*
                self.assertEqual(read(n.replace("m.", "m_prev.", 1)), first[n])
                self.assertNotEqual(read(n), first[n])
            # --resume goes on in the file it names, not in the --out its run was started with
            prev, other = os.path.join(tmp, "m_prev.pt"), os.path.join(tmp, "other.pt")
            self.assertEqual(run_train("--resume", prev, "--epochs", 2)[0], 0)
            self.assertEqual(train.load_checkpoint(prev)["epoch"], 2)
            self.assertEqual(train.load_checkpoint(out)["epoch"], 1)
            # not into the run's best checkpoint, which the later epochs would overwrite
            code, log = run_train("--resume", os.path.join(tmp, "m_prev.best.pt"), "--epochs", 3)
            self.assertEqual(code, 2, log)
            self.assertIn(f"is the best checkpoint of the run in {prev}", log)
            # resumed with --out elsewhere, the new log holds the run's earlier epochs too
            self.assertEqual(run_train("--resume", prev, "--epochs", 3, "--out", other)[0], 0)
            lines = read("other.metrics.jsonl").decode().splitlines()
            self.assertEqual([json.loads(line)["epoch"] for line in lines], [1, 2, 3])
            self.assertEqual(read("m_prev.metrics.jsonl").decode().splitlines(), lines[:2])
            # An --out without an extension: the kept files are the ones its own resume looks for.
            for f in train.run_files(os.path.join(tmp, "run")):
                with open(f, "w") as fh:
                    fh.write(f)
            said = []
            train.keep_earlier_run(os.path.join(tmp, "run"), said.append)
            for f, p in zip(train.run_files(os.path.join(tmp, "run")), train.run_files(os.path.join(tmp, "run_prev"))):
                self.assertFalse(os.path.exists(f))
                self.assertEqual(read(os.path.basename(p)).decode(), f)
            self.assertIn(f"--resume {os.path.join(tmp, 'run_prev')} continues it", said[0])
            # and its best checkpoint names it, not a run.pt that was never written
            best = os.path.join(tmp, "run.best.pt")
            with self.assertRaisesRegex(ValueError, f"is the best checkpoint of the run in {os.path.join(tmp, 'run')}, "):
                train.resumed_args(train.parse_args(["--resume", best]), {"args": {"out": os.path.join(tmp, "run")}},
                                   said.append, {"resume"})

    def test_a_flag_given_on_resume_wins_even_at_its_default_value(self):
        # --epochs 10 and --patience 0 are the parser's defaults: typed on the command line, they
        # must still replace the saved 30 and 3 (they did not when "given" meant "not the default").
        # And a run compiled on a machine that can compile goes on without on one that can't.
        saved = vars(train.parse_args(["--epochs", "30", "--patience", "3", "--out", "a.pt", "--compile"]))
        for argv, expected in ((["--epochs", "10", "--patience", "0"], (10, 0, "a.pt", True)),
                               (["--out", "model.pt", "--no-compile"], (30, 3, "model.pt", False)),
                               ([], (30, 3, "a.pt", True))):
            argv = ["--resume", "a.pt", *argv]
            args = train.resumed_args(train.parse_args(argv), {"args": saved}, lambda *a: None,
                                      train.flags_given(argv))
            self.assertEqual((args.epochs, args.patience, args.out, args.compile), expected, argv)

    @unittest.skipIf(os.name == "nt", "no flock on Windows, so no lock there")
    def test_a_second_run_on_the_same_out_stops_and_touches_nothing(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "m.pt")
            self.assertEqual(run_train(*self.SMALL, "--epochs", 1, "--out", out)[0], 0)
            self.assertEqual(sorted(os.listdir(tmp)), ["m.best.pt", "m.metrics.jsonl", "m.pt"])

            def files():
                found = {}
                for name in os.listdir(tmp):
                    with open(os.path.join(tmp, name), "rb") as f:
                        found[name] = f.read()
                return found
            before = files()
            held = train.claim_out(out)          # as a run in another terminal holds it
            try:
                for extra in ((), ("--resume", out, "--epochs", 2)):
                    code, log = run_train(*self.SMALL, "--epochs", 1, "--out", out, *extra)
                    self.assertEqual(code, 1, log)
                    self.assertIn(f"another run (process {os.getpid()}) is writing {out} now", log)
            finally:
                train.release_out(held)
            self.assertEqual(files(), before)            # not renamed, not written, no lock file
            # Once that run has ended, the next goes ahead, and leaves no lock file behind.
            self.assertEqual(run_train(*self.SMALL, "--epochs", 1, "--out", out)[0], 0)
            self.assertNotIn("m.pt.lock", os.listdir(tmp))
            self.assertIn("m_prev.pt", os.listdir(tmp))
            # A file system that can't lock at all (ENOLCK) lets the run go on, unguarded: only a
            # lock that another process holds (EWOULDBLOCK) stops it.
            import errno
            import fcntl
            with unittest.mock.patch.object(fcntl, "flock", side_effect=OSError(errno.ENOLCK, "No locks")):
                train.release_out(train.claim_out(out))

    def test_save_is_atomic(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "m.pt")
            train.save_checkpoint({"config": {}, "model": {}, "epoch": 1}, path)
            real = torch.save

            def crash(obj, f):
                real(obj, f)
                f.truncate(10)                   # half a file written, then the machine dies
                raise OSError("disk full")
            torch.save = crash
            try:
                with self.assertRaisesRegex(train.CheckpointError, r"could not save .* \(disk full\)"):
                    train.save_checkpoint({"config": {}, "model": {}, "epoch": 2}, path)
            finally:
                torch.save = real
            self.assertEqual(torch.load(path, weights_only=True)["epoch"], 1)
            self.assertEqual(os.listdir(tmp), ["m.pt"])              # the half-written file is gone
            # The new file reaches the disk before it replaces the old one (fsync, then rename).
            calls = []
            with unittest.mock.patch.object(train.os, "fsync", lambda fd: calls.append("fsync")), \
                    unittest.mock.patch.object(train.os, "replace", lambda a, b: calls.append("replace")):
                train.save_checkpoint({"config": {}, "model": {}, "epoch": 3}, path)
            self.assertEqual(calls, ["fsync", "replace"])

    def test_load_weights_strips_wrappers_and_names_mismatches(self):
        model = ViT(ViTConfig(**TINY))
        wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
        train.load_weights(ViT(ViTConfig(**TINY)), wrapped)
        broken = dict(model.state_dict())
        del broken["head.bias"]
        broken["extra.weight"] = torch.zeros(1)
        broken["pos_embed"] = torch.zeros(1, 5, 32)
        with self.assertRaisesRegex(train.CheckpointError,
                                    "missing: head.bias; unexpected: extra.weight; wrong shape.*pos_embed"):
            train.load_weights(model, broken)

    def test_bad_checkpoints_and_flags(self):
        with tempfile.TemporaryDirectory() as tmp:
            good = os.path.join(tmp, "m.pt")
            self.assertEqual(run_train(*self.SMALL, "--epochs", 1, "--out", good)[0], 0)
            truncated = os.path.join(tmp, "t.pt")
            with open(good, "rb") as f, open(truncated, "wb") as g:
                g.write(f.read()[:5000])
            foreign = os.path.join(tmp, "f.pt")
            torch.save({"weights": torch.zeros(3)}, foreign)
            # An object that only a full unpickling can build: torch's refusal was a page of advice
            # to load it with weights_only=False, which would run code from the file.
            pickled = os.path.join(tmp, "p.pt")
            torch.save({"config": {}, "model": {}, "args": train.parse_args([])}, pickled)
            cases = [(("--eval-only", "--ckpt", truncated), 1, "t.pt is not a checkpoint: torch.save writes a zip"),
                     (("--eval-only", "--ckpt", pickled), 1, "p.pt holds Python objects besides tensors"),
                     (("--eval-only", "--ckpt", foreign), 1, "not a checkpoint of this project"),
                     (("--resume", good, "--dim", 64), 1, "different model than asked for: --dim 64"),
                     (("--resume", good, "--epochs", 2, "--optimizer", "adamw"), 1,
                      "does not fit --optimizer adamw"),
                     (("--resume", good, "--epochs", 2, "--batch-size", 25), 2, "a resumed run keeps it"),
                     # these were reported as changed and then changed nothing, or broke the optimizer
                     (("--resume", good, "--epochs", 2, "--model", "cifar_small"), 2,
                      "--model: how " + good + " started can't change on resume; drop it"),
                     (("--resume", good, "--epochs", 2, "--pos-init", "random", "--head-only"), 2,
                      "--head-only, --pos-init: how"),
                     (("--resume", good, "--epochs", 2, "--val-split", 0.5), 1,
                      "comes from a run on 1000 training images, and these data have 500"),
                     (("--dim", -4), 2, "dim must be positive"),
                     (("--device", "cuda:7"), 2, "--device cuda:7"),
                     (("--device", "banana"), 2, "not a device name"),
                     (("--batch-size", 0), 2, "--batch-size 0 must be positive"),
                     (("--batch-size", -3), 2, "--batch-size -3 must be positive"),   # not sqrt(-3)
                     (("--out", tmp), 2, "is a folder; give a file name"),
                     (("--pretrained", good, "--attn-init", "mimetic"), 2, "with --pretrained every weight"),
                     # these were ignored without a word
                     (("--ckpt", good), 2, f"--ckpt names the checkpoint for --eval-only; to go on "
                                           f"training it, use --resume {good}"),
                     (("--weights", "IMAGENET1K_V1"), 2, "give --pretrained too"),
                     (("--pretrained", good, "--model", "cifar_small"), 2, "both name the model; drop --model"),
                     (("--pretrained", good, "--weights", "IMAGENET1K_V1"), 2, "is a checkpoint of ours; drop --weights"),
                     (("--val-split", 1.5), 2, "--val-split must be a fraction"),
                     (("--flip", "alternate", "--repeat-aug", 3), 2, "use --flip random with --repeat-aug")]
            for argv, want_code, words in cases:
                with self.subTest(argv=argv):
                    code, out = run_train(*self.SMALL, "--epochs", 1, "--out", os.path.join(tmp, "x.pt"), *argv)
                    self.assertEqual(code, want_code, out)
                    self.assertIn(words, out)
                    self.assertNotIn("Traceback", out)
            # A folder that permissions call writable but where no file can be made (root passes
            # every permission check): the probe file train.py writes there is made a folder here.
            blocked = os.path.join(tmp, "blocked.pt")
            os.mkdir(f"{blocked}.{os.getpid()}.tmp")
            code, out = run_train(*self.SMALL, "--epochs", 1, "--out", blocked)
            self.assertEqual(code, 2, out)
            self.assertIn(f"--out {blocked} can't be written", out)
            self.assertNotIn("Traceback", out)

    def test_a_failure_of_the_first_process_stops_every_process(self):
        # Under torchrun only the first process writes files. If it can't claim --out (another run
        # holds it) or save at an epoch's end (a full disk), every process hears so and stops there,
        # instead of training on into its next exchange with the first, which then fails with a
        # traceback from gloo. Here the one process plays another one, told by the first of its
        # failure; the exchange itself is a real one in test_two_processes_match_one.
        for failed_at, epochs_seen in ((1, 0), (2, 1)):     # 1: claiming --out; 2: epoch 1's save
            calls = []

            def told(problem, device):
                calls.append(problem)
                return len(calls) == failed_at
            with self.subTest(failed_at=failed_at), tempfile.TemporaryDirectory() as tmp, \
                    unittest.mock.patch.object(train, "first_process_failed", told):
                code, log = run_train(*self.SMALL, "--epochs", 3, "--out", f"{tmp}/m.pt")
                self.assertEqual(code, 1, log)
                self.assertEqual(calls, [None] * failed_at)     # its own claim and saves went well
                self.assertEqual(log.count("epoch   1/3"), epochs_seen)
                self.assertNotIn("epoch   2/3", log)
                self.assertNotIn("Traceback", log)

    def test_two_processes_match_one(self):
        # torchrun with 2 CPU processes (gloo) and global batch 50 against 1 process with batch 50. No
        # augmentation: each process draws its own random crops, which would make the runs differ.
        with tempfile.TemporaryDirectory() as tmp:
            # The random attention and patch starts: with the mimetic one the tiny test model's
            # attention is so sharp that float rounding (the sums are split differently) grows past
            # the tolerance, and with the PCA one the patch embeddings ended up to 1.3e-4 apart on an
            # AVX-512 Intel CPU. Equal training is what is tested here, not those starts.
            # And the learning rate the tolerances below were set at: the rounding grows with the step.
            common = [*map(str, self.SMALL), "--epochs", "1", "--crop-padding", "0", "--flip", "none",
                      "--device", "cpu", "--attn-init", "random", "--patch-init", "random", "--lr", "2e-3"]
            # TMPDIR: torchrun leaves a folder of its own (torchelastic_*) in the temporary folder
            # at every launch; in this test's folder it goes when the test ends.
            env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=tmp)
            launch = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc_per_node=2", "train.py", *common, "--out", f"{tmp}/two.pt"],
                                      cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=env)
            try:
                stdout, stderr = launch.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                # SIGTERM, which torchrun passes on to its processes; the SIGKILL of a timeout
                # ends torchrun alone and had left a hung process behind, training or not
                launch.terminate()
                launch.communicate(timeout=60)
                raise
            self.assertEqual(launch.returncode, 0, stdout + stderr)
            self.assertIn("2 process(es), global batch 50", stdout)
            self.assertIn("weights identical in all 2 processes", stdout)
            self.assertEqual(stdout.count("epoch   1/1"), 1)                # only rank 0 prints
            code, log = run_train(*common, "--out", f"{tmp}/one.pt")
            self.assertEqual(code, 0, log)
            one, two = torch.load(f"{tmp}/one.pt", weights_only=True), torch.load(f"{tmp}/two.pt", weights_only=True)
            for k, v in one["model"].items():
                torch.testing.assert_close(two["model"][k], v, atol=1e-5, rtol=1e-4)
            self.assertAlmostEqual(one["metrics"][0]["train_loss"], two["metrics"][0]["train_loss"], places=3)
            self.assertEqual(one["metrics"][0]["eval_acc"], two["metrics"][0]["eval_acc"])


class TestFineTuning(unittest.TestCase):
    SMALL = ("--dataset", "fake", "--batch-size", 50, "--epochs", 1)

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.old_home = os.environ.get("TORCH_HOME")
        os.environ["TORCH_HOME"] = self.tmp.name        # a private torch hub cache, empty at first

    def tearDown(self):
        if self.old_home is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = self.old_home
        self.tmp.cleanup()

    def put_stand_in_weights(self):
        """A small ViT in torchvision's format, at the path where torchvision caches vit_b_16's
        IMAGENET1K_V1 weights: the real loading code then finds it instead of downloading."""
        torch.manual_seed(0)
        tv = torchvision.models.VisionTransformer(image_size=224, patch_size=16, num_layers=2, num_heads=12,
                                                  hidden_dim=48, mlp_dim=96, num_classes=1000)
        weights = torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1
        folder = os.path.join(self.tmp.name, "hub", "checkpoints")
        os.makedirs(folder)
        torch.save(tv.state_dict(), os.path.join(folder, os.path.basename(weights.url)))

    def test_vit_b_16_weights_give_torchvision_logits(self):
        torch.manual_seed(0)
        tv = torchvision.models.vit_b_16().eval()          # the real shape, random weights
        for p in tv.heads.parameters():
            torch.nn.init.normal_(p, std=0.02)
        ours = vit.from_torchvision(tv).eval()
        self.assertEqual((ours.cfg.dim, ours.cfg.depth, ours.cfg.heads, ours.cfg.mlp_dim), (768, 12, 12, 3072))
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            expected = tv(x)
            self.assertLessEqual((ours(x) - expected).abs().max().item(), 1e-5)
            self.assertLessEqual((ours(x, return_attention=True)[0] - expected).abs().max().item(), 1e-5)

    def test_reset_head_and_set_image_size(self):
        model = ViT(ViTConfig(**TINY))
        model.reset_head(3)
        self.assertEqual(model.head.weight.shape, (3, 32))
        self.assertEqual(model.head.weight.abs().sum().item(), 0.0)
        model.set_image_size(24)
        self.assertEqual(model.pos_embed.shape, (1, 1 + 36, 32))
        self.assertEqual(model(torch.randn(2, 3, 24, 24)).shape, (2, 3))

    def test_pretrained_from_the_torch_hub_cache(self):
        self.put_stand_in_weights()
        out = os.path.join(self.tmp.name, "ft.pt")
        code, log = run_train(*self.SMALL, "--pretrained", "vit_b_16", "--weights", "IMAGENET1K_V1",
                              "--image-size", 32, "--out", out)
        self.assertEqual(code, 0, log)
        self.assertIn("vit_b_16 (IMAGENET1K_V1), fine-tuned", log)
        self.assertIn("sgd peak lr 1.00e-02", log)
        ckpt = torch.load(out, weights_only=True)
        self.assertEqual(ckpt["config"]["image_size"], 32)
        self.assertEqual(ckpt["model"]["pos_embed"].shape, (1, 1 + 4, 48))   # 14x14 grid -> 2x2
        self.assertEqual(ckpt["model"]["head.weight"].shape, (10, 48))        # 1000 classes -> 10
        self.assertEqual(ckpt["data"]["mean"], (0.485, 0.456, 0.406))          # the weights' normalisation
        # visualize.py draws attention maps of the fine-tuned model like of any other
        with contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(visualize.main(["--ckpt", out, "--only", "attention", "--num-images", "2"]), 0)
        self.assertTrue(os.path.isfile(os.path.join(self.tmp.name, "ft_vis", "attention.png")))

    def test_head_only_trains_only_the_head(self):
        self.put_stand_in_weights()
        out = os.path.join(self.tmp.name, "probe.pt")
        code, log = run_train(*self.SMALL, "--pretrained", "vit_b_16", "--weights", "IMAGENET1K_V1",
                              "--image-size", 32, "--head-only", "--out", out)
        self.assertEqual(code, 0, log)
        self.assertIn("(0.00M trained)", log)
        state = torch.load(out, weights_only=True)["model"]
        stand_in = torch.load(os.path.join(self.tmp.name, "hub", "checkpoints", "vit_b_16-c867db91.pth"),
                              weights_only=True)
        torch.testing.assert_close(state["blocks.0.attn.qkv.weight"],
                                   stand_in["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"],
                                   rtol=0, atol=0)
        self.assertGreater(state["head.weight"].abs().sum().item(), 0)

    def test_missing_weights_offline_is_one_sentence(self):
        def offline(*args, **kwargs):
            raise OSError("Name or service not known")
        real = torch.hub.download_url_to_file
        torch.hub.download_url_to_file = offline
        try:
            code, log = run_train(*self.SMALL, "--pretrained", "vit_b_16", "--out",
                                  os.path.join(self.tmp.name, "m.pt"))
        finally:
            torch.hub.download_url_to_file = real
        self.assertEqual(code, 1, log)
        self.assertIn("not in the torch hub cache", log)
        self.assertIn("https://download.pytorch.org/models/vit_b_16-c867db91.pth", log)
        self.assertNotIn("Traceback", log)
        code, log = run_train(*self.SMALL, "--pretrained", "vit_b_16", "--weights", "NOPE")
        self.assertEqual(code, 2)
        self.assertIn("--weights NOPE is not one of vit_b_16's: IMAGENET1K_V1", log)
        code, log = run_train(*self.SMALL, "--pretrained", "vit_b_16", "--dim", 64)
        self.assertEqual(code, 2)
        self.assertIn("can't be changed when fine-tuning", log)

    def test_own_checkpoint_at_a_new_image_size(self):
        small = os.path.join(self.tmp.name, "small.pt")
        args = (*self.SMALL, "--dim", 32, "--depth", 2, "--heads", 2, "--image-size", 16)
        self.assertEqual(run_train(*args, "--out", small)[0], 0)
        code, log = run_train("--eval-only", "--ckpt", small, "--image-size", 24)
        self.assertEqual(code, 0, log)
        self.assertIn("at 24x24", log)
        big = os.path.join(self.tmp.name, "big.pt")
        code, log = run_train(*self.SMALL, "--pretrained", small, "--image-size", 24, "--out", big)
        self.assertEqual(code, 0, log)
        pos = torch.load(big, weights_only=True)["model"]["pos_embed"]
        self.assertEqual(pos.shape, (1, 36, 32))       # 6x6 patches, no class token (cifar_tiny pools the mean)

    def test_grad_accum_gives_the_same_training(self):
        with tempfile.TemporaryDirectory() as tmp:
            common = (*self.SMALL, "--dim", 32, "--depth", 2, "--heads", 2, "--crop-padding", 0, "--flip", "none",
                      "--attn-init", "random", "--lr", 2e-3)   # as in test_two_processes_match_one
            self.assertEqual(run_train(*common, "--out", f"{tmp}/a.pt")[0], 0)
            code, log = run_train(*common, "--grad-accum", 5, "--out", f"{tmp}/b.pt")
            self.assertEqual(code, 0, log)
            self.assertIn("global batch 50 in 5 parts", log)
            a, b = torch.load(f"{tmp}/a.pt", weights_only=True), torch.load(f"{tmp}/b.pt", weights_only=True)
            self.assertEqual(a["step"], b["step"])
            for k, v in a["model"].items():
                torch.testing.assert_close(b["model"][k], v, atol=2e-5, rtol=1e-4)


class TestRealSignals(unittest.TestCase):
    """Signals sent to real training processes, as a terminal or a scheduler sends them.

    Both processes start here at once: each spends seconds of one core importing torch, and with
    two cores they do it side by side, not one after the other."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        argv = [sys.executable, "-u", "train.py", *map(str, TestReliability.SMALL), "--epochs", "100000"]
        # One thread each: two processes of two threads on two cores wait on each other's threads
        # (here the first epoch's line came after 31 s instead of 4).
        env = dict(os.environ, OMP_NUM_THREADS="1")

        def as_from_a_terminal():
            # A script's background job (`python -m unittest &`) starts with SIGINT ignored, and a
            # run keeps a signal it was started ignoring (StopRequest.install), so Ctrl-C would
            # never arrive. A terminal's foreground process has the default handlers.
            for s in train.STOP_SIGNALS:
                signal.signal(s, signal.SIG_DFL)
        # With a loader process, as on a GPU: a terminal's Ctrl-C reaches every process of the
        # foreground group, the loader's too, which had printed the message again for itself.
        cls.ctrl_c = subprocess.Popen(argv + ["--workers", "1", "--out", f"{cls.tmp.name}/c.pt"], cwd=HERE,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True, preexec_fn=as_from_a_terminal)
        cls.hangup = None
        if hasattr(signal, "SIGHUP"):
            # An ssh connection drops, or the terminal window is closed: the process gets SIGHUP,
            # and from then on every write to the terminal fails. A pseudo-terminal whose other end
            # is closed behaves so.
            import pty
            cls.terminal, tty = pty.openpty()
            cls.hangup = subprocess.Popen(argv + ["--out", f"{cls.tmp.name}/h.pt"], cwd=HERE, env=env,
                                          stdout=tty, stderr=tty, start_new_session=True,
                                          preexec_fn=as_from_a_terminal)
            os.close(tty)

    @classmethod
    def tearDownClass(cls):
        for proc in (cls.ctrl_c, cls.hangup):
            if proc is not None and proc.poll() is None:      # left running by a failed test
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        cls.ctrl_c.stdout.close()
        cls.tmp.cleanup()

    def test_ctrl_c_in_a_real_process_saves_and_says_how_to_resume(self):
        proc, lines = self.ctrl_c, []
        for line in proc.stdout:                # wait until training is under way
            lines.append(line)
            if line.startswith("epoch   1/"):
                break
        os.killpg(proc.pid, signal.SIGINT)      # to the group, as a terminal sends it
        rest, _ = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 128 + signal.SIGINT, "".join(lines) + rest)
        self.assertEqual(rest.count("finishing this step"), 1, rest)
        self.assertIn("--resume", rest)
        self.assertNotIn("Traceback", rest)
        ckpt = train.load_checkpoint(f"{self.tmp.name}/c.pt")
        self.assertGreaterEqual(ckpt["step"], 20)

    @unittest.skipUnless(hasattr(signal, "SIGHUP"), "no SIGHUP on this system")
    def test_closed_terminal_saves(self):
        proc, seen = self.hangup, b""
        try:
            while b"epoch   1/" not in seen:    # wait until training is under way
                seen += os.read(self.terminal, 4096)
            # The kernel sends SIGHUP as the terminal hangs up; the run is left writing to a
            # terminal that fails every write (the stop message, the line that it saved).
            os.killpg(proc.pid, signal.SIGHUP)
        finally:
            os.close(self.terminal)
        self.assertEqual(proc.wait(timeout=60), 128 + signal.SIGHUP)
        ckpt = train.load_checkpoint(f"{self.tmp.name}/h.pt")
        self.assertGreaterEqual(ckpt["step"], 20)              # the epoch after the first, part-way
        self.assertIn("partial_epoch", ckpt)


class TestRecipe(unittest.TestCase):
    """Each recipe flag changes what it should: a flag that silently does nothing is a bug."""
    SMALL = ("--dataset", "fake", "--batch-size", 50, "--epochs", 1, "--dim", 32, "--depth", 2, "--heads", 2)

    def train_weights(self, *flags, images=200):
        # 200 fake images, not 1000 (fake_images): these tests ask whether a flag acts, not how far
        # the training goes.
        with tempfile.TemporaryDirectory() as tmp, fake_images(images):
            code, log = run_train(*self.SMALL, *flags, "--out", f"{tmp}/m.pt")
            self.assertEqual(code, 0, log)
            return torch.load(f"{tmp}/m.pt", weights_only=True), log

    def test_a_warmup_longer_than_the_run_is_noted(self):
        # cifar10-best's 10 epochs of warmup in a 1-epoch try: the rate climbs to half its peak and
        # stops there, which the run now says instead of leaving it to be found in the log.
        weights, log = self.train_weights("--warmup-epochs", 2, "--lr", 6e-3)
        self.assertIn("note: the warmup (--warmup-epochs 2) is longer than the run (1 epoch(s)), so the "
                      "learning rate only rises and never reaches 6.00e-03", log)
        self.assertAlmostEqual(weights["metrics"][-1]["lr"], 3e-3, places=6)     # half-way up
        _, log = self.train_weights("--warmup-epochs", 1)   # the default: the peak at the last step
        self.assertNotIn("note: the warmup", log)

    def test_loader_workers_follow_the_per_image_work(self):
        cpu, gpu = torch.device("cpu"), torch.device("cuda")
        self.assertEqual(train.default_workers(cpu, "autoaugment", 0.25), 0)      # cores go to the model
        self.assertEqual(train.default_workers(gpu, "none", 0.0), 4)              # bytes only
        with unittest.mock.patch.object(train.os, "sched_getaffinity", lambda pid: set(range(16)), create=True):
            self.assertEqual(train.default_workers(gpu, "autoaugment", 0.0), 8)
            self.assertEqual(train.default_workers(gpu, "none", 0.25), 8)
            with unittest.mock.patch.dict(os.environ, {"LOCAL_WORLD_SIZE": "8"}):
                self.assertEqual(train.default_workers(gpu, "trivialaugment", 0.0), 4)   # 2 cores each: the floor
            with unittest.mock.patch.dict(os.environ, {"LOCAL_WORLD_SIZE": "3"}):
                self.assertEqual(train.default_workers(gpu, "randaugment", 0.0), 5)

    def test_precision_flag_changes_the_arithmetic(self):
        # On a GPU --precision auto means bf16 (or fp16 with loss scaling); both run on a CPU too,
        # so the path a GPU takes is tested here: autocast changes the sums, and only fp16 scales.
        fp32, _ = self.train_weights("--precision", "fp32")
        for name in ("bf16", "fp16"):
            ckpt, log = self.train_weights("--precision", name)
            self.assertIn(f"precision {train.pick_precision(name, torch.device('cpu'))}", log)
            w, w32 = ckpt["model"]["blocks.0.attn.qkv.weight"], fp32["model"]["blocks.0.attn.qkv.weight"]
            self.assertFalse(torch.equal(w, w32), name)
            torch.testing.assert_close(w, w32, rtol=0, atol=0.02)           # the same training, rounded
            self.assertEqual(bool(ckpt["scaler"]), name == "fp16", name)  # GradScaler's state, if on
        self.assertEqual(fp32["scaler"], {})
        # What a GPU gets with no flag, decided here with the GPU mocked: bf16 where it has it,
        # else fp16 (with the loss scaling above), fp32 on MPS; and under torchrun each process
        # its own GPU, by its local rank.
        cuda, mps = torch.device("cuda"), torch.device("mps")
        mock = unittest.mock.patch.object
        for bf16, want in ((True, torch.bfloat16), (False, torch.float16)):
            with mock(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16):
                self.assertEqual(train.pick_precision("auto", cuda), want)
        self.assertIsNone(train.pick_precision("auto", mps))
        with mock(torch.cuda, "is_available", lambda: True), mock(torch.cuda, "device_count", lambda: 2):
            self.assertEqual(train.pick_device("auto", local_rank=1), torch.device("cuda", 1))
            self.assertEqual(train.pick_device("cuda", local_rank=1), torch.device("cuda", 1))
            with self.assertRaisesRegex(ValueError, "--device cuda:2: there are only 2 GPUs"):
                train.pick_device("cuda:2")
        with mock(torch.cuda, "is_available", lambda: False), mock(torch.backends.mps, "is_available", lambda: True):
            self.assertEqual(train.pick_device("auto"), mps)
        # TF32 for the matmuls that autocast leaves in float32 (Muon's): on CUDA under autocast
        # only, never when --precision fp32 asks for float32.
        before = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            self.assertFalse(train.use_tf32(torch.device("cpu"), torch.bfloat16))
            self.assertFalse(train.use_tf32(torch.device("cuda"), None))
            self.assertTrue(train.use_tf32(torch.device("cuda"), torch.bfloat16))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before

    def test_presets_set_defaults_that_flags_override(self):
        for name, preset in train.PRESETS.items():
            args = train.parse_args(["--preset", name])
            for k, v in preset.items():
                self.assertEqual(getattr(args, k), v, (name, k))
            self.assertIn(args.model, vit.MODELS)
        args = train.parse_args(["--preset", "cifar10-best", "--epochs", "3", "--dataset", "fake"])
        self.assertEqual((args.epochs, args.dataset, args.augment), (3, "fake", "autoaugment"))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as e:
            train.parse_args(["--preset", "cifar10-huge"])
        self.assertEqual(e.exception.code, 2)
        self.assertIn("invalid choice: 'cifar10-huge'", err.getvalue())

    def test_augmentation_policies_and_erasing_change_images(self):
        split = datasets.fake_split(32, 16, 10, seed=0)
        for augment in ("randaugment", "autoaugment", "trivialaugment"):
            with self.subTest(augment=augment):
                tf = datasets.train_transform(augment)
                self.assertEqual(type(tf.transforms[-1]).__name__.lower(), augment.replace("trivialaugment", "trivialaugmentwide"))
                torch.manual_seed(0)
                changed = sum(not torch.equal(tf(x), x) for x in split.images)
                self.assertGreater(changed, 16)
        erase = datasets.train_transform("none", random_erasing=1.0)
        out = erase(split.images[0].clone() | 1)                    # no zero pixel before erasing
        self.assertTrue((out == 0).any())
        with self.assertRaisesRegex(ValueError, "unknown --augment"):
            datasets.train_transform(augment="cutout")

    def test_mixup_and_cutmix_make_soft_targets(self):
        x, y = torch.randn(8, 3, 16, 16), torch.arange(8)
        for mixer in (datasets.batch_mixer(10, mixup=0.8), datasets.batch_mixer(10, cutmix=1.0),
                      datasets.batch_mixer(10, 0.8, 1.0)):
            torch.manual_seed(0)
            mx, target = mixer(x, y)
            self.assertEqual(target.shape, (8, 10))
            torch.testing.assert_close(target.sum(1), torch.ones(8))
            self.assertFalse(torch.equal(mx, x))
            self.assertGreater((target > 0).sum(1).max().item(), 1)   # two classes share a target
        self.assertIsNone(datasets.batch_mixer(10))

    def test_repeated_augmentation_sampler(self):
        order = list(datasets.EpochSampler(12, repeats=3))
        self.assertEqual(len(order), 12)
        self.assertEqual(order[0::3], order[1::3])                   # each image three times in a row
        self.assertEqual(len(set(order)), 4)
        # two processes: copies of an image go to different processes, together the whole epoch
        r0, r1 = list(datasets.EpochSampler(12, 2, 0, repeats=2)), list(datasets.EpochSampler(12, 2, 1, repeats=2))
        self.assertEqual(r0, r1)
        plain = datasets.EpochSampler(10, 1, 0)
        plain.skip = 4
        self.assertEqual(list(plain), list(datasets.EpochSampler(10, 1, 0))[4:])

    def test_training_flags_change_the_weights(self):
        # At 16x16 (16 patches) the 18 runs take half the time, and each flag acts as at 32x32.
        plain = ("--image-size", 16, "--crop-padding", 0, "--flip", "none")
        base, _ = self.train_weights(*plain)
        for flags in (("--mixup", 0.8), ("--cutmix", 1.0), ("--augment", "randaugment"),
                      ("--random-erasing", 0.5), ("--repeat-aug", 3), ("--label-smoothing", 0.3),
                      ("--drop-path", 0.2), ("--weight-decay", 0.5), ("--dropout", 0.2),
                      ("--crop-padding", 4), ("--pos-init", "random"), ("--patch-init", "random"),
                      ("--attn-init", "random"), ("--low-res", 8, "--low-res-epochs", 1),
                      ("--optimizer", "adamw"), ("--flip", "alternate"), ("--flip", "random")):
            with self.subTest(flags=flags):
                ckpt, _ = self.train_weights(*plain, *flags)
                diff = (ckpt["model"]["blocks.0.mlp.fc1.weight"] - base["model"]["blocks.0.mlp.fc1.weight"]).abs().max()
                self.assertGreater(diff.item(), 1e-6, flags)

    def test_alternating_flips(self):
        first = torch.rand(1000, generator=torch.Generator().manual_seed(0)) < 0.5
        index = torch.randperm(1000)[:50]
        flips = [datasets.alternating_flips(index, epoch, first) for epoch in range(4)]
        self.assertTrue(torch.equal(flips[0], first[index]))
        for a, b in zip(flips, flips[1:]):
            self.assertTrue(torch.equal(b, ~a))         # each image the other way round from before
        # In training: what the loop mirrors, epoch by epoch, for the images it drew.
        seen, real = [], datasets.alternating_flips

        def recorder(index, epoch, first):
            seen.append((index.clone(), epoch, real(index, epoch, first)))
            return seen[-1][2]
        with unittest.mock.patch.object(datasets, "alternating_flips", recorder):
            ckpt, log = self.train_weights("--epochs", 2, images=1000)
        self.assertIn("alternate flips", log)                             # the default
        mirrored = [{}, {}]                                               # epoch -> {image: mirrored}
        for index, epoch, flip in seen:
            mirrored[epoch].update(zip(index.tolist(), flip.tolist()))
        self.assertEqual(len(mirrored[0]), 1000)                          # every fake training image
        self.assertTrue(all(mirrored[1][i] != m for i, m in mirrored[0].items()))
        self.assertTrue(400 < sum(mirrored[0].values()) < 600)            # about half, each epoch
        self.assertEqual(ckpt["args"]["flip"], "alternate")
        # Repeated augmentation shows copies of an image in one epoch: they get coins instead.
        self.assertIn("random flips", self.train_weights("--repeat-aug", 3)[1])

    def test_default_learning_rate_follows_the_optimizer_and_the_batch(self):
        # Measured best for each at batch 32 (train.MODE_DEFAULTS): 3e-3 with Muon, 2e-3 when AdamW
        # trains every weight; other batches by the square-root rule, 4x the batch 2x the rate.
        # A flag still wins.
        for flags, lr in [(("--batch-size", 32), 3e-3), (("--batch-size", 32, "--optimizer", "adamw"), 2e-3),
                          (("--batch-size", 128), 6e-3), (("--batch-size", 128, "--optimizer", "adamw"), 4e-3),
                          (("--lr", 5e-4), 5e-4)]:
            ckpt, log = self.train_weights(*flags)
            self.assertAlmostEqual(ckpt["args"]["lr"], lr, msg=flags)
            self.assertIn(f"peak lr {lr:.2e}", log)

    def test_progressive_resizing(self):
        # 16 -> 32 pixels over 4 epochs, in whole 4-pixel patches, then the full size; off by default
        self.assertEqual([train.train_size_at(e, 32, 16, 4, 4) for e in range(6)], [16, 20, 24, 28, 32, 32])
        self.assertEqual(train.train_size_at(0, 32, 0, 0, 4), 32)
        # A smaller image is a smaller grid: the model resizes its position embeddings to it, and
        # they still get gradients (they are learned at every size).
        model = ViT(ViTConfig(**TINY))                                    # built for 16x16: 4x4 patches
        x = torch.randn(2, 3, 8, 8)                                       # 2x2 patches
        tokens = model.embed(x)                                           # (2, 1 + 4, D)
        pos = vit.resize_pos_embed(model.pos_embed, (4, 4), (2, 2))
        torch.testing.assert_close(tokens, torch.cat([model.cls_token.expand(2, -1, -1),
                                   model.patch_embed(x).flatten(2).transpose(1, 2)], 1) + pos)
        torch.nn.init.normal_(model.head.weight)      # the zero head would pass back no gradient
        model(x).sum().backward()
        self.assertGreater(model.pos_embed.grad.abs().sum().item(), 0)
        # In a run, the first epoch trains at 16 pixels and says so; evaluation stays at 32.
        with tempfile.TemporaryDirectory() as tmp:
            code, log = run_train(*self.SMALL, "--epochs", 2, "--low-res", 16, "--low-res-epochs", 1,
                                  "--out", f"{tmp}/m.pt")
            self.assertEqual(code, 0, log)
            history = torch.load(f"{tmp}/m.pt", weights_only=True)["metrics"]
            self.assertEqual([h["train_size"] for h in history], [16, 32])
            self.assertIn("the first 1 epoch(s) at 16 pixels, then 32", log)
            self.assertIn("at 16px", log)
        for flags, message in ((("--low-res", 2, "--low-res-epochs", 1), "--low-res 2 must lie between the patch size (4)"),
                               (("--low-res", 16), "go together")):
            code, log = run_train(*self.SMALL, *flags)
            self.assertEqual(code, 2)
            self.assertIn(message, log)

    def test_tta_averages_an_image_and_its_mirror(self):
        torch.manual_seed(0)
        model = vit.build_model("cifar_tiny", image_size=16, depth=1).eval()
        torch.nn.init.normal_(model.head.weight, std=0.5)   # the zero head would say 1/K for any image
        split = datasets.fake_split(40, 16, 10, seed=0)
        ctx = dict(device=torch.device("cpu"), rank=0, world=1, input_size=(16, 16),
                   mean=[0.5] * 3, std=[0.25] * 3, autocast=contextlib.nullcontext)
        plain = train.evaluate(model, split, ctx, batch_size=16)
        tta = train.evaluate(model, split, dict(ctx, tta=True), batch_size=16)
        with torch.no_grad():                   # the same by hand, in one batch
            x = datasets.normalize(split.images, ctx["mean"], ctx["std"])
            probs = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2        # (B, K)
        self.assertAlmostEqual(tta[0], F.nll_loss(probs.log(), split.labels).item(), places=5)
        self.assertAlmostEqual(tta[1], (probs.argmax(1) == split.labels).float().mean().item(), places=6)
        self.assertNotAlmostEqual(plain[0], tta[0], places=4)   # the flag changes the evaluation

    def test_ema_is_evaluated_and_saved(self):
        ckpt, log = self.train_weights("--ema", 0.9)
        self.assertIsNotNone(ckpt["ema"])
        raw, avg = ckpt["model"]["head.weight"], ckpt["ema"]["head.weight"]
        self.assertFalse(torch.equal(raw, avg))
        self.assertGreater(avg.abs().sum().item(), 0)               # it moved away from the zero init
        # rebuilding for evaluation takes the averaged weights; resuming takes the raw ones
        torch.testing.assert_close(train.model_from_checkpoint(ckpt).head.weight, avg)
        torch.testing.assert_close(train.model_from_checkpoint(ckpt, raw=True).head.weight, raw)

    def test_sincos_positions_are_2d_codes(self):
        pe = vit.sincos_pos_embed((4, 6), 32)                         # (1, 1 + 4*6, 32)
        self.assertEqual(pe.shape, (1, 25, 32))
        self.assertEqual(pe[0, 0].abs().sum().item(), 0)               # the class token's row
        grid = pe[0, 1:].view(4, 6, 32)
        sim = lambda a, b: F.cosine_similarity(grid[a], grid[b], dim=0).item()
        # a neighbour in the same row or column is more alike than a far corner
        self.assertGreater(sim((1, 1), (1, 2)), sim((1, 1), (3, 5)))
        self.assertGreater(sim((1, 1), (2, 1)), sim((1, 1), (3, 5)))
        self.assertEqual(vit.sincos_pos_embed((2, 2), 8, has_cls=False).shape, (1, 4, 8))
        self.assertEqual(vit.sincos_pos_embed((2, 2), 6).shape, (1, 5, 6))   # any width

    def test_pca_patch_init_whitens_the_patches(self):
        torch.manual_seed(0)
        model = vit.build_model("cifar_tiny", image_size=16, dim=96)  # 96 filters of 3*4*4 = 48 numbers
        # correlated, off-centre, unequal channels: far from white to begin with
        images = F.avg_pool2d(torch.randn(400, 3, 18, 18), 3, stride=1) * torch.tensor([3., 1., .3]).view(1, 3, 1, 1) + 2
        vit.pca_patch_init(model, images, eps=1e-9)
        with torch.no_grad():
            tokens = model.patch_embed(images).flatten(2).transpose(1, 2).flatten(0, 1)   # (400*16, 96)
        first, second = tokens[:, :48], tokens[:, 48:]
        torch.testing.assert_close(second, -first)                     # the negated copies
        torch.testing.assert_close(first.mean(0), torch.zeros(48), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.cov(first.T), torch.eye(48), atol=2e-3, rtol=0)
        with self.assertRaisesRegex(ValueError, "patch stem"):
            vit.pca_patch_init(vit.build_model("cifar_tiny", dim=96, stem="conv"), images)

    def test_pca_start_takes_fewer_images_when_they_are_large(self):
        seen = []

        def record(model, images):
            seen.append(tuple(images.shape))
            raise KeyboardInterrupt                # enough seen: stop before training
        with tempfile.TemporaryDirectory() as tmp, unittest.mock.patch.object(vit, "pca_patch_init", record):
            code, log = run_train("--dataset", "fake", "--image-size", 224, "--patch-size", 32, "--dim", 32,
                                  "--depth", 1, "--heads", 2, "--out", f"{tmp}/m.pt")
        self.assertEqual(code, 128 + signal.SIGINT, log)
        self.assertEqual(seen, [(332, 3, 224, 224)])   # 5000 would be 3 GB of floats, 12 GB at the peak

    def test_mimetic_attention_init_attends_to_neighbours(self):
        model = vit.build_model("cifar_tiny", dim=96, heads=3)         # D 96, 3 heads of d 32
        model.pos_embed.data.copy_(vit.sincos_pos_embed((8, 8), 96, False))   # 64 patch tokens, no class token
        vit.mimetic_attention_init(model, generator=torch.Generator().manual_seed(0))
        attn, D, d = model.blocks[0].attn, 96, 32
        W_q, W_k, W_v = attn.qkv.weight.detach().view(3, D, D)
        vo = attn.proj.weight.detach() @ W_v                           # (D, D), full rank
        self.assertAlmostEqual(vo.diag().mean().item(), -0.4, delta=0.02)          # ~ -0.4 I
        self.assertAlmostEqual((vo + 0.4 * torch.eye(D)).std().item(), 0.4 / D ** 0.5, delta=0.01)
        for i in range(3):
            qk = W_q[i * d:(i + 1) * d].T @ W_k[i * d:(i + 1) * d]     # (D, D), rank d
            self.assertEqual(torch.linalg.matrix_rank(qk).item(), d)
            off_diagonal = qk - torch.diag(qk.diag())
            self.assertGreater(qk.diag().mean().item(), 4 * off_diagonal.abs().mean().item())  # ~ +I
        # What it is for: a blank image leaves only the position embeddings, and the patch in row 3,
        # column 3 then attends more to its neighbours than to the far corner, in every head.
        with torch.no_grad():
            _, maps = model(torch.zeros(1, 3, 32, 32), return_attention=True)
        row = maps[0][0, :, 3 * 8 + 3].view(3, 8, 8)                   # (h, 8, 8) over the patches
        for near in ((3, 4), (4, 3), (2, 3)):
            self.assertTrue((row[:, near[0], near[1]] > 2 * row[:, 7, 7]).all(), near)
        torch.manual_seed(0)
        plain = vit.build_model("cifar_tiny", dim=96, heads=3)         # the random start: no such bias
        plain.pos_embed.data.copy_(vit.sincos_pos_embed((8, 8), 96, False))
        with torch.no_grad():
            _, maps = plain(torch.zeros(1, 3, 32, 32), return_attention=True)
        self.assertLess(maps[0][0, :, 3 * 8 + 3].max().item(), 0.05)   # about uniform, 1/64

    def test_conv_stem_is_the_hybrid(self):
        plain, hybrid = vit.build_model("cifar_tiny", dim=96), vit.build_model("cifar_tiny", dim=96, stem="conv")
        self.assertIsInstance(plain.stem, torch.nn.Identity)
        self.assertEqual(hybrid.patch_embed.in_channels, 48)          # patches of a 48-channel map
        self.assertEqual(hybrid(torch.randn(2, 3, 32, 32)).shape, (2, 10))
        self.assertEqual(hybrid.embed(torch.randn(2, 3, 32, 32)).shape, (2, 64, 96))  # same tokens
        self.assertGreater(vit.forward_flops(hybrid.cfg), vit.forward_flops(plain.cfg))
        ckpt, _ = self.train_weights("--stem", "conv")
        self.assertEqual(ckpt["config"]["stem"], "conv")

    def test_forward_flops_counts_the_matmuls(self):
        cfg = ViTConfig(image_size=8, patch_size=4, dim=4, depth=1, heads=1, mlp_ratio=2.0, num_classes=3)
        # 4 patches of 48 inputs; 5 tokens: q,k,v,out 4*5*16, q k^T and attn v 2*25*4, MLP 2*5*4*8; head 12
        macs = 4 * 4 * 48 + (4 * 5 * 16 + 2 * 25 * 4 + 2 * 5 * 4 * 8) + 12
        self.assertEqual(vit.forward_flops(cfg), 2 * macs)

    @fake_images(200)
    def test_benchmark_reports_speeds(self):
        code, log = run_train("--dataset", "fake", "--batch-size", 50, "--dim", 32, "--depth", 2, "--heads", 2,
                              "--benchmark", "--out", os.path.join(tempfile.gettempdir(), "unused.pt"))
        self.assertEqual(code, 0, log)
        for words in ("training (loader + model)", "data loader alone", "model alone", "GFLOP/s", "% of"):
            self.assertIn(words, log)
        # A finished run's settings can be benchmarked too (it used to say "nothing to do"),
        # and its checkpoint stays as it was.
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "m.pt")
            self.assertEqual(run_train("--dataset", "fake", "--batch-size", 50, "--dim", 32, "--depth", 2,
                                       "--heads", 2, "--epochs", 1, "--out", out)[0], 0)
            with open(out, "rb") as f:
                before = f.read()
            code, log = run_train("--resume", out, "--benchmark")
            self.assertEqual(code, 0, log)
            self.assertIn("model alone", log)
            with open(out, "rb") as f:
                self.assertEqual(f.read(), before)
        # On a GPU the share is of the data sheet's bf16 peak, found by the GPU's name: the PCIe
        # H100's name holds "H100" too, and must not get the SXM's higher peak.
        cuda = torch.device("cuda")
        for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                           ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12)):
            with unittest.mock.patch.object(torch.cuda, "get_device_name", lambda device=None: name):
                self.assertEqual(train.device_peak(cuda, torch.bfloat16), (peak, f"{name} bf16 data sheet"))

    def test_tutorial_comparison_is_like_for_like(self):
        # README's speed ratios against a tutorial's ViT come from results/compare_tutorial.py: its
        # models must be the same size, and its tutorial model a working ViT (it learns a batch).
        import importlib.util
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compare_tutorial.py")
        spec = importlib.util.spec_from_file_location("compare_tutorial", path)
        compare = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(compare)
        torch.manual_seed(0)
        tutorial = compare.TutorialViT()
        self.assertEqual(vit.num_params(tutorial), vit.num_params(vit.build_model("cifar_tiny", **compare.SHAPE)))
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        opt = torch.optim.AdamW(tutorial.parameters(), lr=3e-3)
        first = F.cross_entropy(tutorial(x), y).item()
        for _ in range(30):
            loss = F.cross_entropy(tutorial(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.assertLess(loss.item(), first / 4)
        with contextlib.redirect_stdout(io.StringIO()):
            rates, params = compare.step_rates(rounds=1, steps=1, batch=4)
        self.assertEqual(len(set(params.values())), 1, params)           # all four the same size
        self.assertTrue(all(r > 0 for r in rates.values()), rates)
        # --pool mean: ours as cifar_tiny pools by default, without the class token and its position
        # embedding (48 numbers each)
        with contextlib.redirect_stdout(io.StringIO()):
            _, params = compare.step_rates(rounds=1, steps=1, batch=4, pool="mean")
        self.assertEqual(params["tutorial, AdamW"] - params["ours, AdamW"], 2 * 48)
        # --shapes: our model at other shapes too, and a shape that can't be a ViT is a usage error
        self.assertEqual(compare.shape("64/6/2/3"), (64, 6, 2, 3.0))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as e:
            compare.main(["steps", "--shapes", "64/6/5/3"])
        self.assertEqual(e.exception.code, 2)
        self.assertIn("not divisible by 5 heads", err.getvalue())
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as e:
            compare.main(["steps", "--rounds", "0"])         # had ended in "no median for empty data"
        self.assertEqual(e.exception.code, 2)
        self.assertIn("--rounds, --steps and --epochs must be at least 1", err.getvalue())


class TestVisualize(unittest.TestCase):
    def short_run(self, folder, *flags):
        """The checkpoint of a tiny model trained for one epoch on the fake data, in `folder`."""
        ckpt = os.path.join(folder, "m.pt")
        code, log = run_train("--dataset", "fake", "--epochs", 1, "--batch-size", 100, "--dim", 32,
                              "--depth", 2, "--heads", 2, *flags, "--out", ckpt)
        self.assertEqual(code, 0, log)
        return ckpt

    def test_rollout(self):
        torch.manual_seed(0)
        maps = [torch.rand(2, 3, 5, 5).softmax(-1) for _ in range(3)]
        r = visualize.rollout(maps)
        torch.testing.assert_close(r.sum(-1), torch.ones(2, 5))          # rows sum to 1
        # depth 1: the rollout is that layer's map, heads averaged, with the residual identity added
        one = visualize.rollout(maps[:1])
        expected = (maps[0].mean(1) + torch.eye(5)) / 2
        torch.testing.assert_close(one, expected)
        # depth 2: the product of the per-layer maps, later layer on the left
        two = visualize.rollout(maps[:2])
        second = (maps[1].mean(1) + torch.eye(5)) / 2
        torch.testing.assert_close(two, second @ expected)
        kept = visualize.rollout(maps, "max", discard_ratio=0.4)
        torch.testing.assert_close(kept.sum(-1), torch.ones(2, 5))

    def test_mean_attention_distance(self):
        grid, n = (2, 2), 5                                               # 4 patches + class token
        self_only = torch.eye(n).expand(1, 2, n, n)
        self.assertEqual(visualize.mean_attention_distance(self_only, grid, 4).tolist(), [0.0, 0.0])
        uniform = torch.full((1, 1, n, n), 1 / n)
        # on a 2x2 grid a patch is 0, 1, 1 and sqrt(2) patches from the four patches
        expected = 4 * (0 + 1 + 1 + math.sqrt(2)) / 4
        self.assertAlmostEqual(visualize.mean_attention_distance(uniform, grid, 4).item(), expected, places=5)

    def test_position_similarity_with_itself_is_one(self):
        sim = visualize.position_similarity(torch.randn(1, 1 + 6, 8), (2, 3))
        self.assertEqual(sim.shape, (2, 3, 2, 3))
        for i in range(2):
            for j in range(3):
                self.assertAlmostEqual(sim[i, j, i, j].item(), 1.0, places=5)

    def test_every_picture_from_a_short_run(self):
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = self.short_run(tmp)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                self.assertEqual(visualize.main(["--ckpt", ckpt, "--num-images", "4"]), 0)
            self.assertIn("no class token", out.getvalue())            # cifar_tiny's mean token
            self.assertIn(f"trained to epoch {torch.load(ckpt, weights_only=True)['epoch']} on fake", out.getvalue())
            # A checkpoint saved part-way into an epoch (Ctrl-C) is no "epoch 0" model.
            part = {"epoch": 0, "step": 1170, "partial_epoch": torch.zeros(3)}
            self.assertEqual(train.trained_to(part), "step 1170, part-way into epoch 1")
            self.assertIn("the final mean token draws on", out.getvalue())        # rollout
            self.assertIn("of the attention each patch receives, averaged", out.getvalue())   # the gif
            folder = os.path.join(tmp, "m_vis")
            expected = {"attention.png": (150 + 4 * 98 + 2, 40 + 4 * 98 + 2),   # image, mean, 2 heads; 4 rows
                        "rollout.png": (150 + 3 * 98 + 2, 22 + 18 + 4 * 98 + 2),
                        "figure7_filters.png": None, "figure7_position_similarity.png": None,
                        "figure7_attention_distance.png": (520, 360), "curves.png": (1040, 360),
                        "predictions.png": None, "confusion.png": None, "cls_embeddings.png": (560, 460),
                        "token_norms.png": None, "attention_layers.gif": None, "augmentation.png": None}
            self.assertEqual(sorted(os.listdir(folder)), sorted(expected))
            for name, size in expected.items():
                with Image.open(os.path.join(folder, name)) as im:
                    im.verify()                                   # a valid, complete image file
                with Image.open(os.path.join(folder, name)) as im:
                    self.assertEqual(im.format, "GIF" if name.endswith(".gif") else "PNG")
                    if size:
                        self.assertEqual(im.size, size, name)
                    self.assertGreater(min(im.size), 40)
                self.assertIn(os.path.join(folder, name), out.getvalue())

    def test_confusion_and_embeddings_see_every_class(self):
        # An image folder lists its test images class by class (the CIFAR-10 JPEG copy: 1,000
        # airplanes, then 1,000 automobiles, ...): the pictures over many images must sample them
        # all, not take the first ones.
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = self.short_run(tmp)
            fake = datasets.load_data("fake", fake_size=(100, 3000))
            order = fake.test.labels.argsort(stable=True)
            fake.test = datasets.Split(fake.test.images[order], fake.test.labels[order])   # by class
            seen = {}                                   # picture -> the classes of its images

            def recorder(name):                         # stands in for a picture, keeps its labels
                def record(self, images, labels):
                    seen[name] = set(labels.tolist())
                return record
            with unittest.mock.patch.object(datasets, "load_data", return_value=fake), \
                    unittest.mock.patch.object(visualize.Visualizer, "confusion", recorder("confusion")), \
                    unittest.mock.patch.object(visualize.Visualizer, "cls_embeddings", recorder("embeddings")), \
                    contextlib.redirect_stdout(io.StringIO()):
                self.assertEqual(visualize.main(["--ckpt", ckpt, "--only", "predictions,cls_embeddings"]), 0)
            self.assertEqual(seen, {"confusion": set(range(10)), "embeddings": set(range(10))})

    def test_pictures_of_many_classes_with_long_names(self):
        # 60 classes (CIFAR-100 has 100): the embeddings used to repeat ten colours, so that classes
        # 0, 10, 20... looked like one; names ran over the images beside them; and the confusion
        # matrix, unlabelled past 40 classes, did not say which classes it confuses.
        torch.manual_seed(0)
        K = 60
        model = vit.build_model("cifar_tiny", dim=32, heads=2, depth=1, num_classes=K).eval()
        names = [f"a_rather_long_class_name_{k:02d}" for k in range(K)]
        labels = torch.arange(200) % K
        with tempfile.TemporaryDirectory() as tmp:
            v = visualize.Visualizer(model, {}, torch.zeros(2, 3, 32, 32, dtype=torch.uint8), None,
                                     names, (0.5,) * 3, (0.25,) * 3, tmp, None)
            torch.nn.init.normal_(model.head.weight)
            summaries = torch.randn(200, 32)
            summaries[:10] = 10 * model.head.weight[7].detach()   # ten images of class 5 called 7
            labels[:10] = 5
            drawn, real_points = [], visualize.Plot.points

            def points(plot, xs, ys, color, label=None, r=3):
                drawn.append((len(xs), color, label))
                return real_points(plot, xs, ys, color, label, r)
            with unittest.mock.patch.object(visualize.Plot, "points", points), \
                    contextlib.redirect_stdout(io.StringIO()) as out:
                v.confusion(summaries, labels)
                v.cls_embeddings(summaries, labels)
            self.assertEqual(drawn[0], ((labels >= 10).sum().item(), (205, 205, 205), "50 other classes"))
            self.assertEqual([c for _, c, _ in drawn[1:]], visualize.PALETTE)      # then ten colours
            self.assertEqual([label for _, _, label in drawn[1:]], names[:10])
            # the largest cells off the diagonal, named in full, true class first
            self.assertIn(f"(most confused, true as predicted: {names[5]} as {names[7]} 1", out.getvalue())
        draw = visualize.ImageDraw.Draw(visualize.Image.new("RGB", (1, 1)))
        self.assertEqual(visualize.fit_text(draw, "cat", 100, visualize.font(12)), "cat")
        cut = visualize.fit_text(draw, names[0] * 3, 100, visualize.font(12))
        self.assertTrue(cut.endswith("…") and draw.textlength(cut, font=visualize.font(12)) <= 100, cut)
        tile = torch.zeros(3, 8, 8)
        picture = visualize.grid_picture([[tile]], [f"true: {names[0]}"])          # the label's width
        self.assertGreater(picture.width, 150 + 8 + 4)

    def test_many_images_are_classified_without_attention_maps(self):
        # The confusion matrix and the embeddings take 2,000 images: one pass for both, by the
        # fused path, 100 at a time, giving the same scores as the explicit path that keeps every
        # layer's maps (ViT-B/16 at 224 pixels: 0.93 GB a layer for 500 images).
        torch.manual_seed(0)
        model = vit.build_model("cifar_tiny", dim=32, heads=2, depth=2).eval()
        images = torch.randint(0, 256, (250, 3, 32, 32), dtype=torch.uint8)
        with tempfile.TemporaryDirectory() as tmp:
            v = visualize.Visualizer(model, {}, images[:8], None, list("abcdefghij"), (0.5,) * 3,
                                     (0.25,) * 3, tmp, None)
            with unittest.mock.patch.object(visualize.Visualizer, "forward", side_effect=AssertionError("maps")), \
                    contextlib.redirect_stdout(io.StringIO()):
                summaries = v.summaries(images)                           # (250, 32)
                v.confusion(summaries, torch.randint(0, 10, (250,)))
                v.cls_embeddings(summaries, torch.randint(0, 10, (250,)))
            self.assertTrue(os.path.isfile(os.path.join(tmp, "confusion.png")))
            self.assertTrue(os.path.isfile(os.path.join(tmp, "cls_embeddings.png")))
        with torch.no_grad():
            scores = model.head(summaries)
        torch.testing.assert_close(scores, v.forward(images)[0], rtol=1e-4, atol=1e-5)
        # A slow pass (a big model on a CPU) says how far it has got.
        clock = itertools.count(step=6)                  # each look at the clock 6 s later
        with unittest.mock.patch.object(datasets.time, "monotonic", lambda: next(clock)), \
                contextlib.redirect_stdout(io.StringIO()) as out:
            chunks = datasets.with_progress(images.split(100), "classifying the test sample", 250, size=100)
            self.assertEqual([len(c) for c in chunks], [100, 100, 50])
        self.assertIn("classifying the test sample: 100/250 images, about 18 s to go", out.getvalue())

    def test_own_images_from_a_folder(self):
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = self.short_run(tmp)
            folder = os.path.join(tmp, "photos")
            os.makedirs(folder)
            for name in ("b.png", "a.jpg"):
                Image.new("RGB", (40, 30), (120, 60, 0)).save(os.path.join(folder, name))
            with open(os.path.join(folder, "notes.txt"), "w") as f:
                f.write("not an image")
            broken = os.path.join(folder, "c.png")             # a broken file in the folder is left
            with open(broken, "wb") as f:                      # out and named; named itself, an error
                f.write(b"\x89PNG cut short")
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                self.assertEqual(visualize.main(["--ckpt", ckpt, "--images", folder, "--only", "predictions"]), 0)
            printed = [line.split(":")[0] for line in out.getvalue().splitlines() if "%" in line]
            self.assertEqual(printed, [os.path.join(folder, "a.jpg"), os.path.join(folder, "b.png")])
            self.assertIn(f"left out 1 file(s) that no decoder could read ({broken}); replace or delete "
                          f"them, and this line goes\n", out.getvalue())
            only_broken = os.path.join(tmp, "broken")          # nothing readable: that is the error
            os.makedirs(only_broken)
            shutil.move(broken, only_broken)
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                self.assertEqual(visualize.main(["--ckpt", ckpt, "--images", only_broken]), 1)
            self.assertIn("c.png is not an image PIL can read", err.getvalue())
            shutil.rmtree(only_broken)
            # the folder around the image folders, as a dataset's test/ is: they are named (the
            # pictures just drawn are images too)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                self.assertEqual(visualize.main(["--ckpt", ckpt, "--images", tmp]), 2)
            self.assertIn(f"--images {tmp}: no images there (but in its folders: --images {tmp}/m_vis "
                          f"{folder})", err.getvalue())
            empty = os.path.join(tmp, "empty")
            os.makedirs(empty)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                self.assertEqual(visualize.main(["--ckpt", ckpt, "--images", empty]), 2)
            self.assertIn(f"--images {empty}: no images there", err.getvalue())
            for i in range(63):
                Image.new("RGB", (8, 8)).save(os.path.join(folder, f"{i}.png"))
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                self.assertEqual(visualize.main(["--ckpt", ckpt, "--images", folder]), 2)
            self.assertIn("65 images; give 1 to 64 (each is a row of the attention pictures), or add "
                          "--only predictions", err.getvalue())
            # Only their classes: any number, all printed; the picture draws the first 64.
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                self.assertEqual(visualize.main(["--ckpt", ckpt, "--images", folder, "--only", "predictions"]), 0)
            self.assertEqual(sum("%" in line for line in out.getvalue().splitlines()), 65)
            picture = os.path.join(os.path.splitext(ckpt)[0] + "_vis", "predictions.png")
            with Image.open(picture) as im:
                size = im.size
            os.remove(os.path.join(folder, "62.png"))                         # 64 images left
            with contextlib.redirect_stdout(io.StringIO()):
                visualize.main(["--ckpt", ckpt, "--images", folder, "--only", "predictions"])
            with Image.open(picture) as im:
                self.assertEqual(im.size, size)                               # 64 rows both times

    def test_plot_ticks_are_round_numbers(self):
        labels = lambda lo, hi: [f"{t:.3g}" for t in visualize.round_ticks(lo, hi)]
        self.assertEqual(labels(0.346, 0.822), ["0.4", "0.5", "0.6", "0.7", "0.8"])
        self.assertEqual(labels(0.668, 1.93), ["0.75", "1", "1.25", "1.5", "1.75"])
        self.assertEqual(visualize.round_ticks(-3.2, 4.1), [-2, 0, 2, 4])

    def test_own_images_of_any_mode(self):
        with tempfile.TemporaryDirectory() as tmp:
            # The class token here: the short run above pools the mean token, as cifar_tiny does.
            ckpt = self.short_run(tmp, "--pool", "cls")
            paths = []
            for mode, size in (("L", (40, 30)), ("P", (20, 20)), ("RGBA", (64, 64)), ("CMYK", (33, 17)),
                               ("I;16", (25, 25))):
                p = os.path.join(tmp, f"{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}")
                Image.new(mode, size).save(p)
                paths.append(p)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = visualize.main(["--ckpt", ckpt, "--images", *paths, "--only", "attention,rollout,blocks"])
            self.assertEqual(code, 0)
            self.assertIn("class-token attention", out.getvalue())
            self.assertIn("the final class token draws on", out.getvalue())       # rollout
            self.assertNotIn("no class token", out.getvalue())
            with Image.open(os.path.join(tmp, "m_vis", "attention.png")) as im:
                self.assertEqual(im.size[1], 40 + 5 * 98 + 2)               # one row per image
            not_image = os.path.join(tmp, "x.png")
            with open(not_image, "w") as f:
                f.write("hello")
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                self.assertEqual(visualize.main(["--ckpt", ckpt, "--images", not_image]), 1)
            self.assertIn("is not an image", err.getvalue())
            err = io.StringIO()                  # (a missing file was called "not an image")
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                self.assertEqual(visualize.main(["--ckpt", ckpt, "--images", not_image + "x"]), 1)
            self.assertIn(f"--images: {not_image}x does not exist", err.getvalue())
            # Flags out of range are usage errors, found before anything is drawn: the model has 2
            # layers, and a layer number past them used to wrap around to another layer.
            mine = ["--ckpt", ckpt, "--images", paths[0], "--only", "attention"]
            for flags, words in [(("--layer", "3"), "--layer 3: the model has 2 layers"),
                                 (("--layer", "-3"), "--layer -3: the model has 2 layers"),
                                 (("--num-images", "65"), "--num-images must be from 1 to 64, got 65"),
                                 (("--only", ""), "--only names no picture"),    # it drew them all
                                 (("--out", os.path.join(paths[0], "sub")), "can't make that folder")]:
                err = io.StringIO()
                with self.subTest(flags=flags), contextlib.redirect_stderr(err), \
                        contextlib.redirect_stdout(io.StringIO()):
                    self.assertEqual(visualize.main(mine + list(flags)), 2)
                    self.assertIn(words, err.getvalue())
            # A wrong data folder is an error too, and leaves no empty picture folder behind.
            folder_ckpt = torch.load(ckpt, weights_only=True)
            folder_ckpt["data"]["dataset"] = "folder"                      # as if trained on images
            torch.save(folder_ckpt, f"{tmp}/folder.pt")
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                self.assertEqual(visualize.main(["--ckpt", f"{tmp}/folder.pt", "--data-dir",
                                                 f"{tmp}/nowhere", "--out", f"{tmp}/pictures"]), 1)
            self.assertIn("does not exist", err.getvalue())
            self.assertFalse(os.path.exists(f"{tmp}/pictures"))
            # Your own images need only the checkpoint: without its data, the pictures of the
            # dataset are left out, and the predictions come in words too.
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                self.assertEqual(visualize.main(["--ckpt", f"{tmp}/folder.pt", "--images", *paths[:2],
                                                 "--data-dir", f"{tmp}/nowhere", "--out", f"{tmp}/mine"]), 0)
            self.assertIn("drawing your images only", out.getvalue())
            self.assertRegex(out.getvalue(), rf"{re.escape(paths[1])}: \w+ \d+\.\d%, \w+ \d+\.\d%, \w+ \d+\.\d%")
            drawn = sorted(os.listdir(f"{tmp}/mine"))
            self.assertIn("predictions.png", drawn)
            self.assertIn("attention.png", drawn)
            self.assertFalse({"confusion.png", "cls_embeddings.png", "augmentation.png"} & set(drawn), drawn)
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):   # asked for
                self.assertEqual(visualize.main(["--ckpt", f"{tmp}/folder.pt", "--images", paths[0],
                                                 "--data-dir", f"{tmp}/nowhere", "--only", "augmentation"]), 1)


if __name__ == "__main__":
    unittest.main()
