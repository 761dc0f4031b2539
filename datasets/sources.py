"""Where the pre-training images come from, behind one ``build_dataset``:

    class folders (ImageFolder)              --data_path DIR with DIR/<class>/.../<image>
    an unlabelled folder                      --data_path DIR with images at its top level, or any tree that
                                              ImageFolder cannot read as classes: every image at any depth
    a zip of class folders                    --zip_mode True (datasets/folder.py)
    a text file of image paths                --data_path LIST.txt: one path per line (relative to the list's
                                              folder or absolute), optionally followed by an integer label
    the original's TSV layout                 --tsv_mode True (datasets/tsv.py)
    WebDataset tar shards                     --data_path 'shards/train-{000000..000127}.tar', a .tar file, a
                                              pipe: command or a URL (datasets/shards.py)

All but the shards are map-style datasets with the ImageFolder interface (``samples``, ``targets``, ``classes``)
and the corrupt-image handling of datasets/folder.py; unlabelled images have the target -1.
"""
import os

from torchvision.datasets.folder import IMG_EXTENSIONS

from .folder import DataError, ImageFolderDataset, RobustImageDataset, build_dataset as build_folder_dataset

LIST_SUFFIXES = ('.txt', '.lst', '.list')


class FileImagesDataset(RobustImageDataset):
    """Images at the paths of ``samples`` [(path, target)]."""

    def __init__(self, root, samples, transform=None, on_bad_image='skip'):
        self.root, self.samples, self.transform, self.target_transform = root, samples, transform, None
        self.targets = [target for _, target in samples]
        self.classes = sorted({target for target in self.targets if target >= 0})
        self._init_bad_image_policy(on_bad_image)


def image_files(root):
    """Paths of the images under ``root`` at any depth, in sorted order of their relative paths."""
    found = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders.sort()
        found.extend(os.path.join(folder, name) for name in sorted(files) if name.lower().endswith(IMG_EXTENSIONS))
    return found


def unlabelled_folder(root, transform=None, on_bad_image='skip'):
    """Every image under ``root``, at any depth, target -1."""
    paths = image_files(root)
    if not paths:
        raise DataError(f"data folder {root} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
    return FileImagesDataset(root, [(path, -1) for path in paths], transform, on_bad_image)


def image_list(list_path, transform=None, on_bad_image='skip'):
    """The images a text file lists, one per line: ``path`` or ``path label``; relative paths start at the list's
    folder; blank lines and lines starting with # are skipped."""
    base = os.path.dirname(os.path.abspath(list_path))
    samples = []
    with open(list_path) as lines:
        for line in lines:
            line = line.strip()
            if not line or line.startswith('#'):
                continue
            path, label = line, -1
            parts = line.rsplit(None, 1)
            if len(parts) == 2 and parts[1].lstrip('-').isdigit():
                path, label = parts[0], int(parts[1])
            samples.append((os.path.join(base, path), label))
    if not samples:
        raise DataError(f"image list {list_path} lists no images")
    return FileImagesDataset(list_path, samples, transform, on_bad_image)


def has_top_level_images(root):
    return any(name.lower().endswith(IMG_EXTENSIONS) and os.path.isfile(os.path.join(root, name))
               for name in os.listdir(root))


def is_shard_source(data_path):
    """WebDataset shards: a brace pattern, a .tar file, a pipe: command or a URL."""
    return ('{' in data_path or data_path.startswith('pipe:') or '://' in data_path
            or data_path.endswith(('.tar', '.tar.gz', '.tgz')))


def build_dataset(data_path, transform=None, zip_mode=False, on_bad_image='skip', zip_prefix='', tsv_mode=False,
                  labelled=True, shard_options=None):
    """The dataset of ``data_path`` (see the module's docstring). ``labelled`` (evaluation): class folders or a
    zip only; pre-training passes False to accept every source, and ``shard_options`` (seed, epoch_images,
    shuffle_buffer) for shards."""
    data_path = os.fspath(data_path)
    if labelled or zip_mode:
        return build_folder_dataset(data_path, transform, zip_mode, on_bad_image, zip_prefix)
    if tsv_mode:
        from .tsv import TSVDataset
        return TSVDataset(data_path, transform, on_bad_image)
    if is_shard_source(data_path):
        from .shards import ShardDataset
        return ShardDataset(data_path, transform, on_bad_image, **(shard_options or {}))
    if os.path.isfile(data_path) and data_path.lower().endswith(LIST_SUFFIXES):
        return image_list(data_path, transform, on_bad_image)
    if os.path.isdir(data_path) and has_top_level_images(data_path):
        return unlabelled_folder(data_path, transform, on_bad_image)
    try:  # class folders; else (a folder without images, a nested unlabelled folder) the images at any depth
        return ImageFolderDataset(data_path, transform=transform, on_bad_image=on_bad_image)
    except DataError:
        if not (os.path.isdir(data_path) and image_files(data_path)):
            raise
        return unlabelled_folder(data_path, transform, on_bad_image)
