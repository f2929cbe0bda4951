"""Labelled image datasets (in memory or lazily from files) and image decoding."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..normalization import NORMALIZATIONS, Normalization

__all__ = [
    "IMAGE_EXTENSIONS",
    "PRELOAD_MAX_SIDE",
    "ImageDataset",
    "decode_all",
    "decode_images",
    "open_rgb",
    "pixel_statistics",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff")

# Images at most this large (both sides) are decoded once into one uint8 tensor; larger ones stay lazy.
PRELOAD_MAX_SIDE = 64


class ImageDataset(Dataset):
    """Labelled images, either decoded in memory (uint8 [N, 3, H, W]) or read lazily from files.

    ``dataset[i]`` returns ``(image, label)``: image float32 [3, S, S] normalised, label an int. With
    ``augment=True`` small images get the standard CIFAR augmentation (random crop with 4 pixels of zero
    padding, horizontal flip); large lazy images get a random resized crop and a flip. Without it, small
    images are returned as they are and large ones are resized and centre-cropped to ``image_size``.
    Augmentation draws from torch's global generator (seeded per DataLoader worker), so it is
    reproducible under a fixed seed.

    Args:
        labels: [N] int64 class indices.
        classes: class names, ``len(classes)`` = number of classes.
        images: [N, 3, H, W] uint8 pixels, or ``None`` with ``paths``.
        paths: N image files, or ``None`` with ``images``.
        normalization: pixel normalisation.
        augment: training augmentation on/off.
        image_size: output side; default the stored side (in-memory) or 224 (lazy files).
        fine_labels: [N] finer labels of the same images where the dataset has them (CIFAR-100's 100 fine
            classes beside its 20 coarse labels); kept through :meth:`subset` and :meth:`with_options`.
    """

    def __init__(
        self,
        labels: torch.Tensor,
        classes: Sequence[str],
        images: torch.Tensor | None = None,
        paths: Sequence[str] | None = None,
        normalization: Normalization | None = None,
        augment: bool = False,
        image_size: int | None = None,
        fine_labels: torch.Tensor | None = None,
    ) -> None:
        if (images is None) == (paths is None):
            raise ValueError("ImageDataset: expected exactly one of images= or paths=")
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.dim() != 1:
            raise ValueError(f"labels: expected a 1-D tensor, got shape {list(labels.shape)}")
        n = images.shape[0] if images is not None else len(paths)
        if labels.shape[0] != n:
            raise ValueError(f"labels: expected {n} labels (one per image), got {labels.shape[0]}")
        if images is not None:
            if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"images: expected uint8 [N, 3, H, W], got {images.dtype} {list(images.shape)}")
        if n and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError(
                f"labels: expected values in [0, {len(classes) - 1}], got [{int(labels.min())}, {int(labels.max())}]"
            )
        if fine_labels is not None:
            fine_labels = torch.as_tensor(fine_labels, dtype=torch.int64)
            if tuple(fine_labels.shape) != tuple(labels.shape):
                raise ValueError(f"fine_labels: expected shape {list(labels.shape)}, got {list(fine_labels.shape)}")
        self.labels = labels
        self.fine_labels = fine_labels
        self.classes = list(classes)
        self.images = images
        self.paths = list(paths) if paths is not None else None
        self.normalization = normalization or NORMALIZATIONS["imagenet"]
        self.augment = augment
        if image_size is None:
            image_size = int(images.shape[-1]) if images is not None else 224
        self.image_size = int(image_size)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def with_options(
        self,
        augment: bool | None = None,
        normalization: Normalization | None = None,
        image_size: int | None = None,
    ) -> ImageDataset:
        """A view of the same images with other transform options (no copy of the pixels)."""
        return ImageDataset(
            self.labels,
            self.classes,
            images=self.images,
            paths=self.paths,
            normalization=normalization or self.normalization,
            augment=self.augment if augment is None else augment,
            image_size=image_size or self.image_size,
            fine_labels=self.fine_labels,
        )

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageDataset:
        """The samples at ``indices``, same options (in-memory pixels are gathered into a new tensor)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageDataset(
            self.labels[idx],
            self.classes,
            images=self.images[idx] if self.images is not None else None,
            paths=[self.paths[i] for i in idx.tolist()] if self.paths is not None else None,
            normalization=self.normalization,
            augment=self.augment,
            image_size=self.image_size,
            fine_labels=self.fine_labels[idx] if self.fine_labels is not None else None,
        )

    def with_flips(self) -> ImageDataset:
        """The ``2N`` images ``[all of self, all of self flipped left-right]`` (labels repeated): the cached
        form of horizontal-flip augmentation (a feature cache of it holds both views of every image).

        Raises:
            ValueError: the images are lazy files (only decoded, in-memory images are flipped here).
        """
        if self.images is None:
            raise ValueError("with_flips: expected decoded in-memory images, got lazy image files")
        return ImageDataset(
            self.labels.repeat(2),
            self.classes,
            images=torch.cat([self.images, self.images.flip(-1)]),
            normalization=self.normalization,
            augment=self.augment,
            image_size=self.image_size,
            fine_labels=self.fine_labels.repeat(2) if self.fine_labels is not None else None,
        )

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        label = int(self.labels[i])
        if self.images is not None:
            x = self._small(self.images[i])
        else:
            x = self._large(self.paths[i])
        return self.normalization.apply(x), label

    def _small(self, img: torch.Tensor) -> torch.Tensor:
        x = img.float().div_(255.0)
        if self.augment:
            pad = 4
            h, w = x.shape[-2:]
            x = F.pad(x, (pad, pad, pad, pad))
            top = int(torch.randint(0, 2 * pad + 1, (1,)))
            left = int(torch.randint(0, 2 * pad + 1, (1,)))
            x = x[:, top : top + h, left : left + w]
            if bool(torch.rand(()) < 0.5):
                x = x.flip(-1)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(
                x.unsqueeze(0), size=(self.image_size, self.image_size), mode="bilinear", antialias=True
            ).squeeze(0)
        return x

    def _large(self, path: str) -> torch.Tensor:
        from torchvision import transforms

        img = open_rgb(path)
        if self.augment:
            tf = transforms.Compose([transforms.RandomResizedCrop(self.image_size), transforms.RandomHorizontalFlip()])
        else:
            tf = transforms.Compose(
                [
                    transforms.Resize(int(round(self.image_size * 256 / 224))),
                    transforms.CenterCrop(self.image_size),
                ]
            )
        return transforms.functional.to_tensor(tf(img))


def pixel_statistics(dataset: ImageDataset, max_images: int = 512) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``dataset``'s pixels in [0, 1] (before normalisation, without augmentation),
    from up to ``max_images`` images spread evenly over it (at most 64 decoded from files)."""
    n = len(dataset)
    count = min(n, max_images if dataset.images is not None else min(max_images, 64))
    idx = torch.linspace(0, n - 1, count).round().long().unique()
    if dataset.images is not None:
        x = dataset.images[idx].float().div_(255.0)
    else:
        plain = dataset.with_options(augment=False)
        x = torch.stack([plain._large(plain.paths[i]) for i in idx.tolist()])
    x = x.transpose(0, 1).reshape(x.shape[1], -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


def open_rgb(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise RuntimeError(f"image file {path!r}: cannot be read as an image ({e})") from e


def decode_all(paths: list[str], desc: str, workers: int | None = None) -> torch.Tensor:
    """Decode every image file once into one uint8 tensor [N, 3, H, W] (all images must share one size)."""
    from tqdm.auto import tqdm

    first = np.asarray(open_rgb(paths[0]))
    h, w = first.shape[:2]
    out = np.empty((len(paths), h, w, 3), dtype=np.uint8)

    def load(i: int) -> None:
        a = np.asarray(open_rgb(paths[i]))
        if a.shape != (h, w, 3):
            raise RuntimeError(
                f"image {paths[i]!r}: size {a.shape[1]}x{a.shape[0]} differs from {w}x{h} of {paths[0]!r}; "
                "images decoded into memory must share one size"
            )
        out[i] = a

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as ex:
        for _ in tqdm(
            ex.map(load, range(len(paths))),
            total=len(paths),
            desc=desc,
            leave=False,
            disable=len(paths) < 2000,
        ):
            pass
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def decode_images(dataset, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``dataset`` decoded and normalised once, in dataset order.

    Args:
        dataset: yields ``(image [3, H, W] float32 normalised, label)``; an ``ImageDataset`` is switched to
            its un-augmented view.

    Returns:
        images [N, 3, H, W] float32 (contiguous), labels [N] int64.
    """
    from torch.utils.data import DataLoader

    if hasattr(dataset, "with_options"):
        dataset = dataset.with_options(augment=False)
    xs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    if not xs:
        raise ValueError("dataset: expected at least one image, got an empty dataset")
    return torch.cat(xs), torch.cat(ys).long()
