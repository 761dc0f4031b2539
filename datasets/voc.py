"""Semantic segmentation data in the Pascal VOC layout, and the joint image + mask views of the linear
segmentation probe.

    DIR/JPEGImages/<id>.jpg|png, DIR/SegmentationClass/<id>.png (palette or grey class indices, 255 = ignore),
    DIR/ImageSets/Segmentation/{train,val}.txt (one id a line)

    dataset = VOCSegmentation(root, 'train', transform=segmentation_train_transform(224))
        dataset[i] -> (image 3 x S x S normalised, mask S x S uint8 class indices, IGNORE_INDEX = ignored)
    dataset.check(num_labels) -> the largest class index of the split's masks; a UserError (DataError) for a
        missing file, a mask whose size differs from its image, or a class index >= num_labels

Both views act on the image and its mask together (the image resampled bicubically, the mask with the nearest
neighbour of each pixel centre): validation resizes the short side and takes the centre square, training takes
a random resized crop and a random horizontal flip.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from .folder import DataError, load_rgb
from .transforms import IMAGENET_MEAN, IMAGENET_STD

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = ('.jpg', '.png', '.jpeg')
BICUBIC, NEAREST = InterpolationMode.BICUBIC, InterpolationMode.NEAREST_EXACT


class JointView:
    """(image 3 x H x W uint8, mask H x W uint8) -> (3 x S x S normalised float, S x S uint8), both resampled on
    the same grid: the image bicubically (antialiased), the mask with the nearest neighbour of each output
    pixel's centre (NEAREST_EXACT; torchvision's NEAREST, the default for masks, shifts them by up to a pixel).

    ``train``: a random resized crop (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip with probability 0.5,
    drawn from torch's random stream; else the short side resized to ``resize_size`` and the centre S x S."""

    def __init__(self, image_size, train, resize_size=None):
        self.size, self.train = image_size, train
        self.resize_size = resize_size or round(image_size * 256 / 224)

    def __call__(self, image, mask):
        mask = mask[None]  # 1 x H x W
        if self.train:
            top, left, height, width = v2.RandomResizedCrop.get_params(image, scale=[0.08, 1.0],
                                                                       ratio=[3 / 4, 4 / 3])
            image, mask = (TF.resized_crop(x, top, left, height, width, [self.size, self.size], interpolation=mode,
                                           antialias=True) for x, mode in ((image, BICUBIC), (mask, NEAREST)))
            if torch.rand(1).item() < 0.5:
                image, mask = image.flip(-1), mask.flip(-1)
        else:
            image, mask = (TF.center_crop(TF.resize(x, self.resize_size, interpolation=mode, antialias=True),
                                          self.size) for x, mode in ((image, BICUBIC), (mask, NEAREST)))
        image = TF.normalize(image.float().div_(255), IMAGENET_MEAN, IMAGENET_STD)
        return image, mask[0]


def segmentation_val_transform(image_size, resize_size=None):
    """The validation view: resize the short side to ``resize_size`` (default S x 256/224), centre crop S."""
    return JointView(image_size, train=False, resize_size=resize_size)


def segmentation_train_transform(image_size):
    """The training view: random resized crop (scale 0.08-1) and horizontal flip of image and mask together."""
    return JointView(image_size, train=True)


class VOCSegmentation(Dataset):
    """The ``split`` of a VOC-layout folder, as (image, mask) pairs through ``transform``."""

    def __init__(self, root, split, transform=None):
        self.root, self.split, self.transform = Path(root), split, transform
        split_file = self.root / 'ImageSets' / 'Segmentation' / f'{split}.txt'
        if not split_file.is_file():
            raise DataError(f"split file {split_file} not found (VOC layout: ImageSets/Segmentation/{split}.txt)")
        self.ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        if not self.ids:
            raise DataError(f"split file {split_file} names no image")
        self.samples = [(self._image_path(i), self.root / 'SegmentationClass' / f'{i}.png') for i in self.ids]

    def _image_path(self, image_id):
        for extension in IMAGE_EXTENSIONS:
            path = self.root / 'JPEGImages' / f'{image_id}{extension}'
            if path.is_file():
                return path
        raise DataError(f"no image {self.root / 'JPEGImages' / image_id}.jpg|png for the id in the {self.split} split")

    def __len__(self):
        return len(self.ids)

    def load(self, index):
        """(PIL RGB image, PIL mask of class indices in mode 'L')."""
        image_path, mask_path = self.samples[index]
        if not mask_path.is_file():
            raise DataError(f"mask {mask_path} not found for {image_path.name}")
        image, mask = load_rgb(image_path), Image.open(mask_path)
        if mask.size != image.size:
            raise DataError(f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
                            f"{image.size[0]}x{image.size[1]}")
        if mask.mode not in ('L', 'P'):  # palette PNGs hold the class index in the pixel itself
            raise DataError(f"mask {mask_path} has mode {mask.mode}: expected class indices (a grey or palette PNG)")
        return image, Image.fromarray(np.asarray(mask))

    def check(self, num_labels=None):
        """Read every mask once: the largest class index (ignore excluded); a DataError for a mask whose size
        differs from its image or that holds a class index >= ``num_labels``."""
        largest = 0
        for index, (image_path, mask_path) in enumerate(self.samples):
            if not mask_path.is_file():
                raise DataError(f"mask {mask_path} not found for {image_path.name}")
            with Image.open(image_path) as image, Image.open(mask_path) as mask:
                if mask.size != image.size:
                    raise DataError(f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} "
                                    f"is {image.size[0]}x{image.size[1]}")
                values = np.unique(np.asarray(mask))
            values = values[values != IGNORE_INDEX]
            if values.size and num_labels is not None and values.max() >= num_labels:
                raise DataError(f"mask {mask_path} holds class {values.max()}, above --num_labels {num_labels} "
                                f"(classes 0..{num_labels - 1}; {IGNORE_INDEX} = ignore)")
            largest = max(largest, int(values.max()) if values.size else 0)
        return largest

    def __getitem__(self, index):
        image, mask = self.load(index)
        if self.transform is None:
            return image, mask
        return self.transform(TF.pil_to_tensor(image), torch.from_numpy(np.array(mask)))
