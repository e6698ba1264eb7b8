"""Images for the demo and for training: scikit-image's bundled photos (nothing downloaded)
or an ImageFolder directory."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

# RGB photos shipped inside scikit-image; each one is a class of the sample set.
SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
                 "colorwheel", "retina", "hubble_deep_field")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(image)).float().div(255)
    if t.dim() == 2:
        t = t[..., None].expand(-1, -1, 3)
    return t[..., :3].permute(2, 0, 1)


def augment(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop (35-100% of the area), horizontal flip, brightness/contrast jitter,
    normalisation: (3, h, w) in [0, 1] -> (3, size, size)."""
    _, h, w = image.shape
    r = torch.rand(4, generator=generator).tolist()
    scale = 0.35 + 0.65 * r[0]
    ch, cw = max(8, int(h * scale ** 0.5)), max(8, int(w * scale ** 0.5))
    top, left = int(r[1] * (h - ch)), int(r[2] * (w - cw))
    crop = image[:, top:top + ch, left:left + cw]
    crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    if r[3] < 0.5:
        crop = crop.flip(-1)
    jitter = 1 + 0.2 * (torch.rand(2, generator=generator) - 0.5)
    crop = ((crop - crop.mean()) * jitter[1] + crop.mean()) * jitter[0]
    return (crop.clamp(0, 1) - MEAN) / STD


def _view_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The random stream of one view: a new one for every (seed, epoch, image)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + index)


class EpochViews(Dataset):
    """Augmented views that change every epoch: the training loop calls set_epoch before each
    pass (DataLoader workers copy the dataset at the start of each pass, so they see it)."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class SamplePhotos(EpochViews):
    """``length`` augmented views of scikit-image's bundled photos; label = photo index."""

    def __init__(self, size: int, length: int = 256, seed: int = 0):
        try:
            import skimage.data
        except ImportError as exc:
            raise ImportError("the sample photos come from scikit-image: pip install "
                              "'ultron_kernels[model]' (or pass --data <ImageFolder>)") from exc

        self.images = [_to_tensor(getattr(skimage.data, name)()) for name in SAMPLE_PHOTOS]
        self.size, self.length, self.seed = size, length, seed
        self.num_classes = len(self.images)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        label = index % self.num_classes
        return augment(self.images[label], self.size, _view_generator(self.seed, self.epoch, index)), label


class ImageFolderViews(EpochViews):
    """An ImageFolder directory (one sub-folder per class) with the same augmentation."""

    def __init__(self, root: str, size: int, seed: int = 0):
        try:
            from torchvision.datasets import ImageFolder
        except ImportError as exc:
            raise ImportError("--data reads an ImageFolder through torchvision: pip install "
                              "'ultron_kernels[model]'") from exc

        self.folder = ImageFolder(root)
        self.size, self.seed = size, seed
        self.num_classes = len(self.folder.classes)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        image, label = self.folder[index]
        view = augment(_to_tensor(np.array(image.convert("RGB"))), self.size,
                       _view_generator(self.seed, self.epoch, index))
        return view, label


def sample_batch(batch: int, size: int, seed: int = 0):
    data = SamplePhotos(size, length=batch, seed=seed)
    images, labels = zip(*(data[i] for i in range(batch)))
    return torch.stack(images), torch.tensor(labels), data.num_classes
