"""Datasets and augmentation: every image decoded once, held in memory as uint8, augmented by the batch.

CIFAR-sized data is small (50,000 x 3 x 32 x 32 bytes = 150 MB), so we decode each file once into one
uint8 tensor and never touch the disk or a JPEG decoder again. Two CPU cores then spend their time
training instead of decoding, and a batch travels to the GPU as bytes (4x less than float32) and is
turned into normalised floats there (`normalize`). An image folder's decoded tensor is also saved next
to its images, so that the next start skips the decoding too.

Datasets (`--dataset`):
    cifar10, cifar100   torchvision's copies, downloaded into --data-dir (default ./data)
    folder              any tree  DATA_DIR/train/<class>/*.jpg  and  DATA_DIR/test/<class>/*.jpg
                        (or val/ instead of test/), e.g. the CIFAR-10 JPEG copy; or only
                        DATA_DIR/<class>/*.jpg, a tenth of each class then held out to test on
                        (_split_class_folders). Files no decoder can read are left out, and named
    fake                synthetic images with a learnable pattern per class; offline, for tests

Augmentation (training only) is the standard CIFAR recipe: a random 32x32 crop of the image padded by
a few pixels (4 is usual; train.py's default is 2: ahead in 2-epoch runs, no worse in 10), and a
horizontal flip, done for a whole batch at once on the device (crop_flip). The flip alternates: each
image is mirrored in every other epoch (alternating_flips). Both are label-preserving
for natural images and give the model many slightly different views of each picture, which a ViT
needs more than a CNN does: it has no built-in notion that a shifted object is the same object (the
paper's Sec. 3.1, "Inductive bias").
Stronger options for longer runs, all off by default: augmentation policies and random erasing
(train_transform, per image in the loader), Mixup and CutMix (batch_mixer), repeated augmentation
(EpochSampler).

Letters in shape comments: N images, C channels, H/W height/width, B batch.
"""

import functools
import hashlib
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# torchvision is imported inside the functions that use it: importing it takes about a second (as
# long as torch itself), which a start that reads its images from the decoded cache doesn't need.

DATASETS = ("cifar10", "cifar100", "folder", "fake")

# Per-channel mean and standard deviation of the training images, pixel values scaled to [0, 1].
# CIFAR-10: computed over the 50,000 training images (the same values as in e.g. the pytorch-cifar and
# timm communities; beware the often-copied std (0.2023, 0.1994, 0.2010), which is not the dataset's).
# CIFAR-100: likewise over its 50,000 training images. A folder's are computed when it is loaded.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def is_image_name(name):
    """An image file by its name. Hidden files are not: macOS leaves a "._0001.jpg" of metadata
    beside each image it copies to a USB stick or a network drive, which no decoder can read."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


class DataError(RuntimeError):
    """A problem with the data that the user can fix; train.py prints it as one sentence."""


@dataclass
class Split:
    images: torch.Tensor   # (N, C, H, W) uint8
    labels: torch.Tensor   # (N,) int64

    def __len__(self):
        return len(self.labels)


@dataclass
class Data:
    train: Split
    val: "Split | None"    # held out from train with --val-split, else None (quoted: Python 3.9)
    test: Split
    classes: list
    mean: tuple
    std: tuple
    notes: list = field(default_factory=list)   # lines for train.py to print: where the test set
                                                # came from, files left out


def load_data(name, data_dir="./data", image_size=32, val_split=0.0, seed=0, fake_size=(1000, 200)):
    """Load a dataset into memory, at the images' own size.

    Images are kept as they are stored (32x32 for CIFAR) and batches are resized on the device to the
    model's input (`normalize`), so fine-tuning at 224x224 does not hold 50 times more bytes. Only an
    image folder whose images differ in size, or are larger than image_size, is resized here.
    """
    notes = []
    if name in ("cifar10", "cifar100"):
        train, test, classes = _torchvision_cifar(name, data_dir)
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    elif name == "folder":
        train, test, classes, notes = _image_folder(data_dir, image_size)
        mean, std = channel_stats(train.images)
    elif name == "fake":
        classes = [f"class{i}" for i in range(10)]
        train = fake_split(fake_size[0], image_size, len(classes), seed=1)
        test = fake_split(fake_size[1], image_size, len(classes), seed=2)
        mean, std = channel_stats(train.images)
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    val = None
    if val_split:                             # (a negative one is refused below, not ignored)
        if not 0 < val_split < 1:
            raise DataError(f"--val-split is a fraction of the training set in (0, 1), got {val_split}")
        # A fixed permutation (seeded) so that resuming, and every rank of a multi-GPU run, hold out
        # exactly the same images.
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, int(len(train) * val_split))
        val = Split(train.images[order[:n_val]], train.labels[order[:n_val]])
        train = Split(train.images[order[n_val:]], train.labels[order[n_val:]])
    return Data(train, val, test, classes, tuple(mean), tuple(std), notes)


def _torchvision_cifar(name, data_dir):
    from torchvision import datasets
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    looks_like_folder = os.path.isdir(os.path.join(data_dir, "train"))
    if looks_like_folder and not os.path.isdir(os.path.join(data_dir, cls.base_folder)):
        # Most likely --data-dir given without --dataset folder: CIFAR would be downloaded into the
        # user's image folder and trained on instead of their images, without a word.
        raise DataError(f"{data_dir} holds a train/ folder, so it looks like an image folder, but the "
                        f"dataset is {name}; add --dataset folder to train on those images (or give {name} a "
                        f"--data-dir of its own)")
    try:
        train = cls(data_dir, train=True, download=True)
        test = cls(data_dir, train=False, download=True)
    except Exception as e:  # URLError, socket errors, a half-downloaded archive: all end the same way
        raise DataError(
            f"could not download {name.upper()} into {data_dir} ({type(e).__name__}: {e}). If this "
            f"machine is offline, train on an image folder instead: python train.py --dataset folder "
            f"--data-dir path/to/images (with train/<class>/ and test/<class>/ inside, or only "
            f"<class>/ folders)") from None

    def to_split(ds):  # torchvision keeps CIFAR as a numpy array (N, H, W, C)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()   # (N, C, H, W)
        return Split(images, torch.tensor(ds.targets, dtype=torch.long))
    return to_split(train), to_split(test), list(train.classes)


def _image_folder(root, image_size):
    if not os.path.isdir(root):
        what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
        raise DataError(f"--data-dir {root} {what}; for --dataset folder it must hold train/ "
                        f"and test/ (or val/) folders with one sub-folder of images per class, or only "
                        f"the class folders")
    train_dir = os.path.join(root, "train")
    test_dir = next((os.path.join(root, d) for d in ("test", "val") if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(train_dir) and test_dir is None and not _folder_hint(root) and _has_class_folders(root):
        return _split_class_folders(root, image_size)
    if not os.path.isdir(train_dir) or test_dir is None:
        found = ", ".join(sorted(os.listdir(root))[:8]) or "nothing"
        raise DataError(f"{root} must hold train/ and test/ (or val/) folders with one sub-folder of "
                        f"images per class inside each, or only the class folders (about a tenth of "
                        f"each is then held out to test on); found: {found}{_folder_hint(root)}")
    classes = _class_folders(train_dir)
    if not classes:
        raise DataError(f"{train_dir} has no class sub-folders (expected {train_dir}/<class>/<image>)")
    _two_classes_at_least(train_dir, classes)
    # Test images of a class the model never trained on could only be counted wrong, or, as the
    # labels come from train/'s folders, be left out unseen: either way the accuracy would mislead.
    unknown = sorted(set(_class_folders(test_dir)) - set(classes))
    if unknown:
        raise DataError(f"{test_dir} has class folders that {train_dir} lacks: {', '.join(unknown[:5])}; "
                        f"the model can only learn the classes it trains on")
    train, train_out = _read_folder(train_dir, *_list_images(train_dir, classes, every_class=True), image_size)
    test, test_out = _read_folder(test_dir, *_list_images(test_dir, classes), image_size)
    notes = [left_out_note(train_dir, train_out), left_out_note(test_dir, test_out)]
    return train, test, classes, [n for n in notes if n]


# The share of each class held out to test on, for a folder of class folders with no test/ of its own.
TEST_SHARE = 0.1


def _has_class_folders(root):
    """Does root hold images in sub-folders of its own (root/<class>/<image>)?"""
    return any(is_image_name(f) for c in _class_folders(root) for f in os.listdir(os.path.join(root, c)))


def _split_class_folders(root, image_size):
    """root/<class>/<image> without train/ and test/, as most photo collections come: about a tenth
    of each class becomes the test set. Which tenth, a hash of each image's name decides, not a
    random draw: so every run (any --seed), a resumed one, --eval-only and visualize.py test on the
    same images, on any machine and torch version, and adding images to the folder moves none of
    the others from training to test (a model trained before would be tested on what it learned)."""
    classes = _class_folders(root)
    _two_classes_at_least(root, classes)
    names, labels = _list_images(root, classes, every_class=True)
    everything, left_out = _read_folder(root, names, labels, image_size)
    left_out_set = set(left_out)
    names = [n for n in names if n not in left_out_set]   # the names of the images decoded
    share = lambda name: int(hashlib.sha1(name.encode()).hexdigest(), 16) % 10_000 / 10_000   # in [0, 1)
    test = torch.tensor([share(name) < TEST_SHARE for name in names])
    for label in range(len(classes)):         # a class whose few images all fell in the test set
        mine = everything.labels == label     # keeps them to learn from instead
        if test[mine].all():
            test[mine] = False
    if not test.any():
        raise DataError(f"{root} has no train/ and test/ folders, and too few images to hold out "
                        f"about {TEST_SHARE:.0%} of them to test on ({len(everything)} in {len(classes)} "
                        f"classes); add images, or split them into train/<class>/ and test/<class>/")
    pick = lambda keep: Split(everything.images[keep], everything.labels[keep])
    notes = [f"{root} has no train/ and test/ folders: about {TEST_SHARE:.0%} of each class held out "
             f"to test on", left_out_note(root, left_out)]
    return pick(~test), pick(test), classes, [n for n in notes if n]


def _two_classes_at_least(where, classes):
    # With one class every answer is right: the loss is 0 from the first step and the accuracy
    # 100%, a run that looks perfect and learns nothing.
    if len(classes) == 1:
        raise DataError(f"{where} has one class folder ({classes[0]}), and a classifier learns to tell "
                        f"classes apart: give it a folder of images for each of two or more classes")


def _class_folders(split_dir):
    # Hidden folders are no classes: Jupyter leaves .ipynb_checkpoints in every folder it opens. Nor
    # is __MACOSX, the metadata that a zip made on a Mac unpacks into elsewhere.
    return sorted(d.name for d in os.scandir(split_dir)
                  if d.is_dir() and not d.name.startswith(".") and d.name != "__MACOSX")


def _folder_hint(root):
    """The folder the user most likely meant, when --data-dir is one level off: one split of the
    dataset (data/cifar10-jpeg/train) or the folder around it (data)."""
    root = os.path.normpath(root)
    if os.path.basename(root) in ("train", "test", "val"):
        candidates = [os.path.dirname(root) or "."]                      # one level up
    else:
        candidates = [os.path.join(root, d) for d in sorted(os.listdir(root))]   # one level down
    for c in candidates:
        if os.path.isdir(os.path.join(c, "train")):
            return f" (did you mean --data-dir {c}?)"
    return ""


def _list_images(split_dir, classes, every_class=False):
    """The images of split_dir/<class>/, class by class: their names relative to split_dir
    ("cat/0001.jpg") and labels."""
    names, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        found = sorted(f for f in os.listdir(class_dir) if is_image_name(f)) \
            if os.path.isdir(class_dir) else []
        if every_class and not found:
            # The head would get an output for a class it never sees, and the test set could
            # still hold it; a training folder left empty is almost always a mistake.
            raise DataError(f"{class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); a class "
                            f"needs training images: add some, or remove the folder")
        names += [f"{name}/{f}" for f in found]
        labels += [label] * len(found)
    if not names:
        raise DataError(f"no images found in {split_dir} (looked for {', '.join(IMAGE_EXTENSIONS)} "
                        f"files in one sub-folder per class: {', '.join(classes[:5])}...)")
    return names, labels


def _read_folder(split_dir, names, labels, image_size):
    """The images `names` (relative to split_dir, as _list_images lists them), decoded: a Split,
    and the names of the files left out because no decoder could read them."""
    files = [os.path.join(split_dir, n) for n in names]
    # Decoding 60,000 small JPEGs takes 5-8 s on two CPU cores, every start. So the decoded tensor is
    # kept next to the images, and reused while every file's name, size and modification time (and
    # the image size asked for, and the decoder's version) are what they were; any change decodes
    # again. Version 2 turns photos upright (EXIF), so a cache of version 1 may hold them on their side.
    fingerprint = hashlib.sha1(f"{image_size} decoder 2".encode())
    for n, f in zip(names, files):
        st = os.stat(f)
        fingerprint.update(f"\n{n} {st.st_size} {st.st_mtime_ns}".encode())
    cache = os.path.join(split_dir, f".decoded-{image_size}px.pt")
    try:
        saved = torch.load(cache, weights_only=True)
        if saved["fingerprint"] == fingerprint.hexdigest():
            return Split(saved["images"], saved["labels"]), saved.get("left_out", [])
    except Exception:       # none yet, or unreadable (a half-written file, another torch): decode
        pass
    split, bad = _decode_files(files, labels, image_size, split_dir)
    left_out = [names[i] for i in bad]
    tmp = f"{cache}.{os.getpid()}.tmp"       # written aside, then renamed: never half a cache
    try:
        torch.save({"fingerprint": fingerprint.hexdigest(), "images": split.images,
                    "labels": split.labels, "left_out": left_out}, tmp)
        os.replace(tmp, cache)
    except (OSError, RuntimeError):         # a read-only folder or a full disk: the next start decodes
        if os.path.exists(tmp):
            os.remove(tmp)
    return split, left_out


def left_out_note(where, left_out):
    """The line naming the files of `where` (a folder, or "") that no decoder could read; "" if none."""
    if not left_out:
        return ""
    shown = ", ".join(left_out[:3]) + (f" and {len(left_out) - 3} more" if len(left_out) > 3 else "")
    place = f" in {where}" if where else ""
    return (f"left out {len(left_out)} file(s){place} that no decoder could read ({shown}); "
            f"replace or delete them, and this line goes")


def with_progress(items, what, total, size=1):
    """Yield `items` (each `size` of `total` images), saying every 10 s how far they have got.

    Seconds of work say nothing; a folder of large photos, or 2,000 images through a big model on a
    CPU, takes minutes, and a silent terminal looks like a hang.
    """
    start = last = time.monotonic()
    for i, item in enumerate(items):
        now = time.monotonic()
        if i and now - last > 10:              # (i: the rate needs one item done)
            last, done = now, min(i * size, total)
            print(f"{what}: {done}/{total} images, about {(now - start) / done * (total - done):.0f} s "
                  f"to go", flush=True)
        yield item


def _decode_files(files, labels, image_size, where=""):
    """Decode `files` into a Split; also returns the indices of those left out, unreadable."""
    from torchvision.transforms import v2
    square = [image_size, image_size]
    # Photos (100 kB and more a file) take milliseconds each to decode, in C with Python's lock
    # released, so threads decode as many at once as there are cores (measured on 2 cores: 1.9x
    # faster). Small files like CIFAR's (2 kB) go faster one by one: handing each to a thread costs
    # more than decoding it (measured: twice the time, even with one thread).
    photos = sum(os.path.getsize(f) for f in files) > 100_000 * len(files)
    if photos:
        # Each photo is held at image_size x image_size at most, twice over while the list is stacked
        # into one tensor. Too many for the machine's memory, the system would kill the process only
        # after the long decoding (ImageNet's 1.28 million at 224 pixels: 385 GB), with one word.
        need, have = 2 * len(files) * 3 * image_size ** 2, _memory_bytes()
        if have and need > have:
            raise DataError(f"{where}: {len(files)} images at {image_size}x{image_size} pixels need about "
                            f"{need / 1e9:.1f} GB of memory, and this machine has {have / 1e9:.1f} GB; "
                            f"train at a smaller --image-size, or on a part of the images")
    pool = ThreadPoolExecutor(os.cpu_count() or 1)
    try:
        read = functools.partial(_read_or_error, image_size=image_size, peek=photos)
        decoded = pool.map(read, files) if photos else map(read, files)
        images = list(with_progress(decoded, f"decoding {where}", len(files)))   # (3, H, W) uint8 each
    finally:
        pool.shutdown(cancel_futures=True)             # after Ctrl-C: stop there
    # A broken file among thousands of photos (a download cut short, a file of another kind with an
    # image's name) is left out, and named, rather than stopping the run after the long decoding
    # and again at the next broken file. If no file could be read, that is the error.
    bad = [i for i, x in enumerate(images) if isinstance(x, DataError)]
    if len(bad) == len(files):
        raise images[0]
    labels = [y for x, y in zip(images, labels) if not isinstance(x, DataError)]
    images = [x for x in images if not isinstance(x, DataError)]
    if len({x.shape for x in images}) > 1:
        # Images of several sizes: all to one, so that they fit one tensor. (Images of one size,
        # smaller than the model's input, are kept as they are; normalize() enlarges each batch.)
        images = [x if list(x.shape[-2:]) == square else v2.functional.resize(x, square, antialias=True)
                  for x in images]
    return Split(torch.stack(images), torch.tensor(labels, dtype=torch.long)), bad


def _read_or_error(path, image_size, peek):
    try:
        return _read_small(path, image_size, peek)
    except DataError as e:         # returned, to be counted with the others
        return e


def _memory_bytes():
    """The machine's memory in bytes, or None where the system can't say (Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _read_small(path, image_size, peek):
    """One file -> (3, H, W) uint8, shrunk to image_size x image_size if either side is larger.

    Each image is shrunk as it is read, never kept at full size: a folder of photos held whole until
    the last one was read would not fit in memory (10,000 of 2000x1500 pixels: 90 GB). With `peek`
    the file's header is read first, for the size: a photo larger than the model's input is then
    decoded straight to a fraction of its size (read_image's draft mode). For small files the peek
    costs more than it saves (measured: 75% more time on CIFAR's).
    """
    from torchvision.transforms import v2
    if peek:
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(path) as im:             # the header only: the size, not the pixels
                large = max(im.size) > image_size
        except (UnidentifiedImageError, OSError):
            large = False                              # read_image says what is wrong with the file
        return read_image(path, image_size if large else None)
    x = read_image(path)                               # (3, H, W) uint8
    if max(x.shape[-2:]) > image_size:
        x = v2.functional.resize(x, [image_size, image_size], antialias=True)
    return x


def read_image(path, size=None):
    """Any image file -> (3, H, W) uint8 RGB, resized to size x size if given and different.

    A JPEG read at a size several times smaller than stored is decoded straight to a half, a
    quarter or an eighth of its size (PIL's draft mode, which the JPEG format allows cheaply), never
    below `size`, and then resized: 2.4x faster for a 4000x3000 photo read at 224 pixels (measured:
    29-30 against 69-73 ms), with pixels that differ from a full decode's by 0.3 levels in 255
    on average.

    JPEGs, the usual case, go to torchvision's decoder, which turns bytes straight into a tensor:
    the same pixels as PIL (checked on all of the CIFAR-10 JPEG copy) in under half the time
    (measured: 56-103 against 187-206 us per CIFAR image). Everything else, and any JPEG that decoder refuses, goes
    through PIL, which converts every mode it knows (grayscale, palette, RGBA, CMYK) to RGB; 16-bit
    grayscale is scaled down to 8 bits first, since PIL's own conversion would clip it to white.

    Both turn a photo upright as its EXIF orientation says: a phone stores a portrait photo lying on
    its side with a note to rotate it, which every image viewer follows, so the model sees the
    photo as its owner does.
    """
    if size is None and path.lower().endswith((".jpg", ".jpeg")):
        # torchvision 0.29 deprecates its decoder in favour of TorchCodec, another dependency, and
        # warns on every call; when a later version drops it, PIL reads JPEGs instead.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                from torchvision.io import ImageReadMode, decode_jpeg, read_file
                return decode_jpeg(read_file(path), mode=ImageReadMode.RGB,
                                   apply_exif_orientation=True)               # (3, H, W) uint8
            except (ImportError, RuntimeError):
                pass                              # PIL reads it, or says why it can't
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            if size is not None:
                im.draft("RGB", (size, size))         # JPEGs only; other formats ignore it
            im = ImageOps.exif_transpose(im)          # upright (an image without EXIF: as it is)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = im.point(lambda v: v / 256).convert("L")
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            return x.reshape(im.size[1], im.size[0], 3).permute(2, 0, 1).contiguous()   # (3, H, W)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path} is not an image PIL can read ({e})") from None


def fake_split(n, image_size, num_classes, seed):
    """Noise images with a bright square whose place and colour depend on the class: learnable, offline."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    images = torch.randint(0, 128, (n, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    s = max(image_size // 4, 1)
    for c in range(num_classes):
        idx = (labels == c).nonzero().squeeze(1)
        row, col = (c // 4) * s % (image_size - s + 1), (c % 4) * s % (image_size - s + 1)
        images[idx, c % 3, row:row + s, col:col + s] = 255
    return Split(images, labels)


def channel_stats(images):
    """Per-channel mean and std of a (N, C, H, W) uint8 tensor, in [0, 1] units.

    A pixel takes one of only 256 values, so we count how often each occurs and take the mean and
    the (sample) std from those 256 counts: the same numbers as converting the 20 million pixels
    per channel to float, in 0.05 instead of 0.4-0.96 s for CIFAR-10, on every start.
    """
    x = images[:20000].transpose(0, 1).reshape(images.shape[1], -1)   # (C, n) uint8; a sample suffices
    value = torch.arange(256, dtype=torch.float64) / 255                # (256,) what each byte means
    means, stds = [], []
    for pixels in x:                                                     # (n,) one channel
        count = torch.bincount(pixels, minlength=256).double()          # (256,)
        n = count.sum()
        mean = (count * value).sum() / n
        var = (count * (value - mean) ** 2).sum() / (n - 1)
        means.append(round(mean.item(), 4))
        # A channel that never changes (images drawn in pure red, say) has std 0, and dividing by
        # it turned every pixel into NaN at the first step. One grey level (1/255) is the floor.
        stds.append(round(max(var.sqrt().item(), 1 / 255), 4))
    return tuple(means), tuple(stds)


AUGMENTS = ("none", "randaugment", "autoaugment", "trivialaugment")


def train_transform(augment="none", random_erasing=0.0):
    """Per-sample augmentation on uint8 (C, H, W) tensors in the loader; None when there is none.

    augment: a policy of stronger photometric and geometric changes (colour, contrast, rotation,
        shear, ...) picked at random per image. A ViT has fewer built-in assumptions about images than
        a CNN (Sec. 3.1, "Inductive bias"), so on a small dataset it needs more of these to generalise
        (DeiT, Touvron et al. 2021). RandAugment (Cubuk et al. 2020), AutoAugment's CIFAR-10 policy
        (Cubuk et al. 2019) or TrivialAugment (Müller & Hutter 2021).
    random_erasing: the probability of blanking a random rectangle (Zhong et al. 2020), so the model
        can't rely on any one part of the object.
    The crop and flip of the standard recipe come after these, for the whole batch (crop_flip).
    """
    if augment not in AUGMENTS:
        raise ValueError(f"unknown --augment {augment!r}; choose one of: {', '.join(AUGMENTS)}")
    if augment == "none" and random_erasing == 0:
        return None                       # and no import of torchvision's transforms (0.2 s)
    from torchvision.transforms import v2
    steps = []
    if augment == "randaugment":
        steps.append(v2.RandAugment(num_ops=2, magnitude=9))
    elif augment == "autoaugment":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
    elif augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide())
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, value=0))
    return v2.Compose(steps) if steps else None


def crop_flip(images, padding=4, flip=True):
    """The standard CIFAR augmentation for a whole uint8 batch (B, C, H, W), on its own device.

    Each image gets its own random crop of the image padded by `padding` pixels (mirror padding) and,
    with probability 1/2, a horizontal flip: the same as torchvision's RandomCrop(padding_mode=
    "reflect") + RandomHorizontalFlip applied image by image, but done with one gather for the batch
    instead of a few small operations per image, which on two CPU cores cost more than the crop itself.
    `flip` may also be a (B,) bool tensor that says which images to mirror (alternating_flips).
    """
    if padding == 0 and flip is False:
        return images
    B, C, H, W = images.shape
    dev = images.device
    # Output pixel (i, j) of image b comes from source pixel (i + dy_b - padding, j + dx_b - padding),
    # mirrored back inside the image where that falls into the padding.
    dy = torch.randint(0, 2 * padding + 1, (B, 1), device=dev)
    dx = torch.randint(0, 2 * padding + 1, (B, 1), device=dev)
    # A flipped image's output column j is column W-1-j of its crop.
    j = torch.arange(W, device=dev).expand(B, W)                         # (B, W)
    if isinstance(flip, torch.Tensor):
        j = torch.where(flip.to(dev)[:, None], W - 1 - j, j)
    elif flip:
        j = torch.where(torch.rand(B, 1, device=dev) < 0.5, W - 1 - j, j)
    rows = torch.arange(H, device=dev) + dy - padding                    # (B, H), may fall outside
    cols = j + dx - padding                                              # (B, W)

    def mirror(i, n):                           # -1 -> 1, n -> n - 2: reflect at the borders
        return (n - 1 - ((n - 1 - i.abs()).abs())).clamp(0, n - 1)

    rows, cols = mirror(rows, H), mirror(cols, W)
    index = rows[:, :, None] * W + cols[:, None, :]                      # (B, H, W) into H*W pixels
    index = index.flatten(1)[:, None].expand(B, C, H * W)                # (B, C, H*W), same per channel
    return images.flatten(2).gather(2, index).view(B, C, H, W)


def alternating_flips(index, epoch, first):
    """Which images of a batch to mirror in this epoch: each one in every other epoch (B,) bool.

    `index` (B,) says which training images the batch holds, `first` (N,) bool which of all N images
    are mirrored in epoch 0 (a random half, drawn once from the seed). A coin tossed per image and
    epoch shows an image the same way round in two epochs running half the time, so over a short run
    some images are seen mostly one way; alternating shows every image both ways equally often, and
    each epoch the view it was not shown the epoch before (the "alternating flip" of Jordan 2024,
    "94% on CIFAR-10 in 3.29 Seconds on a Single GPU"). In every epoch half the images are still
    mirrored, as with the coin.
    """
    return first[index] ^ (epoch % 2 == 1)


def flips_for(mode, index, epoch, first):
    """crop_flip's `flip` under train.py's --flip MODE: a (B,) mask for alternate, else a bool."""
    if mode == "alternate":
        return alternating_flips(index, epoch, first)
    return mode == "random"


def batch_mixer(num_classes, mixup=0.0, cutmix=0.0):
    """Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on whole batches, or None.

    Mixup blends two images and their labels; CutMix pastes a rectangle of one image into another and
    mixes the labels by area. Both turn labels into soft targets (B, K) and stop a small dataset from
    being memorised. With both on, each batch gets one of them at random (as in DeiT).
    """
    from torchvision.transforms import v2
    mixers = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
             ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


class EpochSampler(torch.utils.data.Sampler):
    """The order of the training images in one epoch, for one of `world` processes.

    The order depends only on the seed and the epoch (set_epoch), so every process agrees on it and a
    resumed run replays it. Process r takes every world-th image, so one step's images over all
    processes are the same whatever their number. `skip` starts part-way (to resume a stopped epoch).
    repeats > 1 is repeated augmentation (Hoffer et al. 2020, used by DeiT): each image appears
    `repeats` times in a row, seen by different processes or in one batch with different random
    augmentations, and the epoch keeps its length by using 1/repeats of the images.
    """

    def __init__(self, n, world=1, rank=0, seed=0, repeats=1):
        self.n, self.world, self.rank, self.seed, self.repeats = n, world, rank, seed, repeats
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g)
        if self.repeats > 1:
            order = order[:math.ceil(self.n / self.repeats)].repeat_interleave(self.repeats)[:self.n]
        order = order[:self.n // self.world * self.world][self.rank::self.world]   # equal shares
        return iter(order[self.skip:].tolist())

    def __len__(self):
        return self.n // self.world - self.skip


class ImageDataset(torch.utils.data.Dataset):
    """A Split as a Dataset: item i is (augmented uint8 image (C, H, W), label, i).

    The index travels with the image so that the training loop can decide per image what depends on
    the epoch, such as which images to mirror (alternating_flips)."""

    def __init__(self, split, transform=None):
        self.split, self.transform = split, transform

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        x = self.split.images[i]
        return (self.transform(x) if self.transform else x), self.split.labels[i], i


def normalize(images, mean, std, size=None):
    """uint8 (B, C, H, W) on any device -> float32 (B, C, *size), zero mean and unit variance.

    Done on the device, after the bytes have been copied there. `size` (height, width) resizes the
    batch to the model's input, e.g. 32x32 CIFAR images for a model fine-tuned at 224x224, or 32x32
    ones to 16x16 for the first epochs of train.py --low-res.
    """
    x = images.float().div_(255)
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        # Shrinking averages the pixels that each output pixel covers ("area"), so fine detail
        # blurs instead of aliasing into stripes; growing interpolates between neighbours.
        shrink = size[0] <= x.shape[-2] and size[1] <= x.shape[-1]
        x = F.interpolate(x, size=tuple(size), mode="area" if shrink else "bilinear",
                          align_corners=None if shrink else False)
    # as_tensor copies nothing when mean and std already are tensors on this device (train.py makes
    # them once): a copy from a Python list every step would make the CPU wait for the GPU each time.
    mean = torch.as_tensor(mean, device=x.device).view(1, -1, 1, 1)   # (1, C, 1, 1): broadcasts
    std = torch.as_tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std
