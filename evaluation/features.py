"""What every evaluation protocol shares: the command-line options of the frozen backbone and its data, the
train/val image folders, and features of a frozen backbone gathered across processes in dataset order.

    parser = argparse.ArgumentParser(parents=[backbone_args_parser()]); args = parse_eval_args(parser)
    train_set, val_set = build_train_val_datasets(data_path, train_transform, val_transform)
    loader = build_eval_loader(dataset, batch_size, num_workers)
    features, labels = extract_features(backbone, loader, device)   # N x D float32, N; every rank gets all
"""
import argparse
import os

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler, SequentialSampler

import utils
from datasets import WorkerLoader, build_dataset, demo_data_path, worker_nice

DEMO_IMAGE_SIZE = 64  # the demo model's global crop size (experiments/cpu/swin_demo.yaml)


def backbone_args_parser():
    """Options shared by the evaluation scripts: the backbone, its weights and the data."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument('--cfg', default=None, type=str,
                   help="the pretraining yaml (MODEL.NAME, MODEL.SPEC); default: the one --pretrained_weights "
                        "was trained with (this project's and the original's checkpoints store it)")
    p.add_argument('--arch', default=None, type=str,
                   help="as in main_esvit.py: a sized name (swin_tiny) builds the original's yaml without --cfg; "
                        "default: the checkpoint's")
    p.add_argument('--patch_size', default=16, type=int,
                   help="patch size of a ViT --arch (deit_tiny, deit_small, vit_base): 16 (default) or 8, as the "
                        "checkpoint was trained")
    p.add_argument('--pretrained_weights', default='', type=str,
                   help="checkpoint to evaluate: a training checkpoint (this project's, the original's, DINO's), "
                        "or a backbone state dict (.pth / .safetensors, also timm's or torchvision's keys); "
                        "none: a randomly initialised backbone")
    p.add_argument('--checkpoint_key', default='teacher', type=str, help='teacher or student')
    p.add_argument('--data_path', default=None, type=str,
                   help='folder with train/ and val/ (or train.zip and val.zip with --zip_mode); '
                        'default: the embedded demo data')
    p.add_argument('--zip_mode', default=False, type=utils.bool_flag,
                   help='--data_path holds train.zip and val.zip instead of train/ and val/')
    p.add_argument('--image_size', default=224, type=int, help='center crop fed to the backbone')
    p.add_argument('--resize_size', default=None, type=int,
                   help='images are resized to this before the crop (default: image_size * 256 / 224)')
    p.add_argument('--batch_size_per_gpu', default=128, type=int, help='images per process and batch')
    p.add_argument('--num_workers', default=10, type=int,
                   help='DataLoader worker processes per process (at most the CPUs available)')
    p.add_argument('--seed', default=0, type=int,
                   help="seed of a random init (the same on every rank) and of the linear probe's data order")
    p.add_argument('--dist_url', default='env://', type=str,
                   help='init method of the process group (env://: the variables torchrun sets)')
    p.add_argument('--local_rank', '--local-rank', default=0, type=int, help='set by torch.distributed.launch')
    p.add_argument('opts', default=None, nargs=argparse.REMAINDER, help='config overrides: KEY VALUE ...')
    return p


def probe_args_parser():
    """Options of the trained probes (eval_linear.py, eval_segmentation.py): schedule, output, resume; a script
    sets its own defaults with ``set_defaults``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument('--epochs', default=100, type=int, help='training epochs of the linear classifier')
    p.add_argument('--lr', default=0.001, type=float, help='peak lr for a total batch of 256 (scaled linearly)')
    p.add_argument('--num_labels', default=None, type=int,
                   help='classifier outputs (default: the train classes; segmentation: the largest class index + 1)')
    p.add_argument('--val_freq', default=1, type=int, help='validate every N epochs (and after the last)')
    p.add_argument('--output_dir', default='.', type=str,
                   help='where checkpoint.pth.tar, log.txt and tb/ go; rerun to resume')
    p.add_argument('--evaluate', action='store_true', help='only validate the classifier saved in --output_dir')
    p.add_argument('--cache_features', default=False, type=utils.bool_flag,
                   help='train on features computed once without augmentation (fast approximation for CPU runs)')
    p.add_argument('--print_freq', default=20, type=int, help='progress line every N batches')
    return p


def parse_eval_args(parser, argv=None):
    """Parse; with no --cfg, --arch or --data_path (``args.demo``), evaluate on the demo data at the demo's size,
    the model that --pretrained_weights was trained with or else the demo model
    (``evaluation.checkpoints.model_config``)."""
    args = parser.parse_args(argv)
    if args.cfg is None and args.arch is None and args.data_path is None:
        parser.set_defaults(image_size=DEMO_IMAGE_SIZE)
        args = parser.parse_args(argv)
        args.demo = True
    return args


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------
def build_split_dataset(data_path, split, transform, zip_mode=False):
    """``data_path/split`` (a class-folder tree, or ``data_path/split.zip`` with ``zip_mode``); the embedded
    demo data's split when ``data_path`` is None."""
    if data_path is None:
        return build_dataset(demo_data_path(split), transform)
    if zip_mode:
        return build_dataset(os.path.join(data_path, f'{split}.zip'), transform, zip_mode=True)
    return build_dataset(os.path.join(data_path, split), transform)


def build_train_val_datasets(data_path, train_transform, val_transform, zip_mode=False):
    """The train and val splits, which must name the same classes (their labels are class indices)."""
    train_set = build_split_dataset(data_path, 'train', train_transform, zip_mode)
    val_set = build_split_dataset(data_path, 'val', val_transform, zip_mode)
    if train_set.classes != val_set.classes:
        raise utils.UserError(f"train and val of {data_path} have different class folders "
                              f"({len(train_set.classes)} vs {len(val_set.classes)} classes)")
    return train_set, val_set


class IndexedDataset(Dataset):
    """(image, label, index) of an image dataset: the index places the sample after gathering."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return image, label, index


def build_eval_loader(dataset, batch_size, num_workers):
    """In-order loader over ``IndexedDataset(dataset)``; one shard per rank when distributed (the sampler
    pads the shards to equal length with repeated samples, which :func:`extract_features` tolerates).
    Workers at the lowest priority when the model runs on the CPU (see ``datasets.worker_nice``)."""
    indexed = IndexedDataset(dataset)
    sampler = DistributedSampler(indexed, shuffle=False) if utils.is_dist() else SequentialSampler(indexed)
    nice = worker_nice(torch.device('cuda' if torch.cuda.is_available() else 'cpu'))
    return WorkerLoader(indexed, sampler=sampler, batch_size=batch_size, num_workers=num_workers, nice=nice,
                        pin_memory=torch.cuda.is_available(), drop_last=False)


# ---------------------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------------------
def pooled_features(backbone, images):
    """The backbone's pooled output, L2-normalised. B x C"""
    return F.normalize(backbone.forward_features(images)[0], dim=1)


@torch.no_grad()
def extract_features(model, loader, device, forward=pooled_features, print_freq=20):
    """``forward(model, images)`` of every sample of ``loader`` (from :func:`build_eval_loader`), in dataset
    order, on every rank: (features N x D float32, labels N), both on ``device``; a forward or dataset of
    other shapes gives N x ... of each (e.g. dense features N x h x w x D, masks N x H x W). Progress is printed every
    ``print_freq`` batches (0: never).

    Each rank computes its shard; the batches of all ranks are gathered and written at their sample index,
    so the shards' padding (samples repeated by DistributedSampler) is overwritten by identical rows."""
    num_samples = len(loader.dataset)
    features = labels = None
    batches = utils.MetricLogger().log_every(loader, print_freq, 'Features:') if print_freq else loader
    for images, targets, indices in batches:
        batch_features = forward(model, images.to(device, non_blocking=True)).float()  # b x D
        batch_features = utils.all_gather_cat(batch_features)                        # (b*W) x D
        targets = utils.all_gather_cat(targets.to(device))
        indices = utils.all_gather_cat(indices.to(device))
        if features is None:
            features = torch.zeros(num_samples, *batch_features.shape[1:], device=device)
            labels = torch.zeros(num_samples, *targets.shape[1:], dtype=targets.dtype, device=device)
        features.index_copy_(0, indices, batch_features)
        labels.index_copy_(0, indices, targets)
    return features, labels
