"""Weighted k-NN classification on the frozen backbone's features (DINO's protocol).

    python eval_knn.py --pretrained_weights output/demo/checkpoint.pth         # the demo model, demo data
    torchrun --nproc_per_node=8 eval_knn.py --arch swin_tiny \\
        --cfg experiments/imagenet/swin/swin_tiny_patch4_window7_224.yaml --data_path imagenet \\
        --pretrained_weights out/checkpoint.pth --checkpoint_key teacher MODEL.NUM_CLASSES 0

Features are the backbone's pooled output, L2-normalised, of the Resize + CenterCrop view of every image
of ``data_path/train`` (the bank) and ``data_path/val``. A test image's class scores are the sum over its
k most cosine-similar bank images of ``exp(similarity / T)`` for their class. Top-1/top-5 per k are printed
and written to ``knn.json``. The functions here are reused by eval_linear.py and, as :class:`OnlineKNN`,
by main_esvit.py (``--knn_freq``).
"""
import argparse
import functools
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

import utils
from datasets import build_dataset, demo_data_path, worker_init, worker_nice
from datasets.transforms import to_normalized_tensor
from main_esvit import DEMO_CFG, load_config
from models.pretrained import build_frozen_backbone

DEMO_IMAGE_SIZE = 64  # the demo model's global crop size (experiments/cpu/swin_demo.yaml)
KNN_CHUNK_ELEMENTS = 2 ** 27  # test x bank similarities computed at once (512 MiB in float32)


def get_backbone_args_parser():
    """Options shared by eval_knn.py and eval_linear.py: the backbone, its weights and the data."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument('--cfg', default=None, type=str, help='the pretraining yaml (MODEL.NAME, MODEL.SPEC)')
    p.add_argument('--arch', default=None, type=str, help='as in main_esvit.py (default: the yaml\'s family)')
    p.add_argument('--patch_size', default=16, type=int, help='kept for command-line compatibility (ViT only)')
    p.add_argument('--pretrained_weights', default='', type=str,
                   help='checkpoint to evaluate (none: a randomly initialised backbone)')
    p.add_argument('--checkpoint_key', default='teacher', type=str, help='teacher or student')
    p.add_argument('--data_path', default=None, type=str,
                   help='folder with train/ and val/ (or train.zip and val.zip with --zip_mode); '
                        'default: the embedded demo data')
    p.add_argument('--zip_mode', default=False, type=utils.bool_flag)
    p.add_argument('--image_size', default=224, type=int, help='center crop fed to the backbone')
    p.add_argument('--resize_size', default=None, type=int,
                   help='images are resized to this before the crop (default: image_size * 256 / 224)')
    p.add_argument('--batch_size_per_gpu', default=128, type=int)
    p.add_argument('--num_workers', default=10, type=int)
    p.add_argument('--seed', default=0, type=int,
                   help="seed of a random init (the same on every rank) and of the linear probe's data order")
    p.add_argument('--dist_url', default='env://', type=str)
    p.add_argument('--local_rank', '--local-rank', default=0, type=int, help='set by torch.distributed.launch')
    p.add_argument('opts', default=None, nargs=argparse.REMAINDER, help='config overrides: KEY VALUE ...')
    return p


def get_args_parser():
    p = argparse.ArgumentParser('EsViT k-NN evaluation', parents=[get_backbone_args_parser()])
    p.add_argument('--nb_knn', default=[10, 20, 100, 200], nargs='+', type=int, help='the k values')
    p.add_argument('--temperature', default=0.07, type=float, help='T of the vote weights exp(similarity / T)')
    p.add_argument('--dump_features', default=None, type=str, help='save the features and labels in this folder')
    p.add_argument('--load_features', default=None, type=str, help='use the features saved in this folder')
    p.add_argument('--output_dir', default=None, type=str,
                   help='where knn.json goes (default: the --dump_features or --load_features folder, else .)')
    return p


def parse_args(parser, argv=None):
    """Parse; with no --cfg, --arch or --data_path, evaluate the demo model on the demo data."""
    args = parser.parse_args(argv)
    if args.cfg is None and args.arch is None and args.data_path is None:
        parser.set_defaults(cfg=DEMO_CFG, image_size=DEMO_IMAGE_SIZE)
        args = parser.parse_args(argv)
    return args


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------
def eval_transform(image_size, resize_size=None):
    """Resize (bicubic) + CenterCrop + normalisation; ``resize_size`` defaults to ``image_size * 256 / 224``."""
    return T.Compose([
        T.Resize(resize_size or round(image_size * 256 / 224), interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        to_normalized_tensor,
    ])


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
    return DataLoader(indexed, sampler=sampler, batch_size=batch_size, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=False,
                      worker_init_fn=functools.partial(worker_init, nice=nice))


# ---------------------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------------------
def pooled_features(backbone, images):
    """The backbone's pooled output, L2-normalised. B x C"""
    return F.normalize(backbone.forward_features(images)[0], dim=1)


def all_gather_cat(tensor):
    """``tensor`` of every rank, concatenated along dim 0 in rank order (all ranks pass the same shape)."""
    if not utils.is_dist():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(utils.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def extract_features(model, loader, device, forward=pooled_features, print_freq=20):
    """``forward(model, images)`` of every sample of ``loader`` (from :func:`build_eval_loader`), in dataset
    order, on every rank: (features N x D float32, labels N), both on ``device``. Progress is printed every
    ``print_freq`` batches (0: never).

    Each rank computes its shard; the batches of all ranks are gathered and written at their sample index,
    so the shards' padding (samples repeated by DistributedSampler) is overwritten by identical rows."""
    num_samples = len(loader.dataset)
    features = labels = None
    batches = utils.MetricLogger().log_every(loader, print_freq, 'Features:') if print_freq else loader
    for images, targets, indices in batches:
        batch_features = forward(model, images.to(device, non_blocking=True)).float()  # b x D
        batch_features = all_gather_cat(batch_features)                              # (b*W) x D
        targets = all_gather_cat(targets.to(device))
        indices = all_gather_cat(indices.to(device))
        if features is None:
            features = torch.zeros(num_samples, batch_features.shape[1], device=device)
            labels = torch.zeros(num_samples, dtype=torch.long, device=device)
        features.index_copy_(0, indices, batch_features)
        labels.index_copy_(0, indices, targets)
    return features, labels


# ---------------------------------------------------------------------------------------------------------
# k-NN
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def knn_accuracies(train_features, train_labels, test_features, test_labels, ks, T, num_classes,
                   chunk_elements=KNN_CHUNK_ELEMENTS):
    """{k: (top-1 %, top-5 %)} of the weighted k-NN vote, for each k of ``ks``.

    Features are L2-normalised rows (train N x C, test M x C). The class scores are DINO's, sum over the
    k nearest bank rows of exp(similarity / T), up to a factor per test image. Test images go in chunks of
    ``chunk_elements // N`` rows, so memory stays bounded whatever the bank size; the nearest neighbours
    are found once for the largest k. Top-5 counts a hit among the min(5, num_classes) best classes."""
    k_max = max(ks)
    if min(ks) < 1 or k_max > len(train_labels):
        raise ValueError(f"k must be between 1 and the {len(train_labels)} training samples, got {list(ks)}")
    chunk = max(1, chunk_elements // len(train_labels))
    correct = {k: torch.zeros(2, dtype=torch.long, device=test_features.device) for k in ks}
    for start in range(0, len(test_labels), chunk):
        features, targets = test_features[start:start + chunk], test_labels[start:start + chunk]  # b x C, b
        similarity, neighbours = (features @ train_features.T).topk(k_max, dim=1)                # b x k_max
        neighbour_labels = train_labels[neighbours]                                               # b x k_max
        # exp(s / T) scaled by exp(-s_max / T) per test image: the same class ranking, no overflow at small T
        shifted = similarity - similarity[:, :1]
        for k in ks:
            weights = (shifted[:, :k] / T).exp()                                                  # b x k
            scores = torch.zeros(len(targets), num_classes, device=weights.device)
            scores.scatter_add_(1, neighbour_labels[:, :k], weights)                               # b x classes
            ranked = scores.topk(min(5, num_classes), dim=1).indices
            hits = ranked == targets[:, None]
            correct[k] += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
    return {k: tuple((100.0 * c / len(test_labels)).tolist()) for k, c in correct.items()}


def knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes):
    """(top-1 %, top-5 %) of the weighted k-NN vote with ``k`` neighbours (see :func:`knn_accuracies`)."""
    return knn_accuracies(train_features, train_labels, test_features, test_labels, [k], T, num_classes)[k]


# ---------------------------------------------------------------------------------------------------------
# the script
# ---------------------------------------------------------------------------------------------------------
FEATURE_FILES = {'train_features': 'trainfeat.pth', 'test_features': 'testfeat.pth',
                 'train_labels': 'trainlabels.pth', 'test_labels': 'testlabels.pth'}


def compute_features(args):
    """Features and labels of data_path/train and data_path/val under the frozen backbone."""
    transform = eval_transform(args.image_size, args.resize_size)
    train_set, val_set = build_train_val_datasets(args.data_path, transform, transform, args.zip_mode)
    print(f"Data loaded: {len(train_set)} train and {len(val_set)} val images, {len(train_set.classes)} classes.")
    backbone = build_frozen_backbone(load_config(args), args.pretrained_weights, args.checkpoint_key)
    backbone.to(args.device)
    result = {}
    for split, dataset in (('train', train_set), ('test', val_set)):
        print(f"Extracting features of the {split} set...")
        loader = build_eval_loader(dataset, args.batch_size_per_gpu, args.num_workers)
        result[f'{split}_features'], result[f'{split}_labels'] = extract_features(backbone, loader, args.device)
    return result


def save_features(features, folder):
    if not utils.is_main_process():
        return
    os.makedirs(folder, exist_ok=True)
    for name, file_name in FEATURE_FILES.items():
        utils.save_checkpoint(features[name].cpu(), os.path.join(folder, file_name))
    print(f"Features saved in {folder}")


def load_features(folder, device):
    features = {}
    for name, file_name in FEATURE_FILES.items():
        tensor = utils.load_checkpoint(os.path.join(folder, file_name))
        if not torch.is_tensor(tensor):
            raise utils.UserError(f"{os.path.join(folder, file_name)} does not hold a tensor")
        features[name] = tensor.to(device)
    return features


def make_output_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise utils.UserError(f"cannot create output dir {path}: {e.strerror}") from None
    return path


def eval_knn(args):
    utils.init_distributed_mode(args)
    utils.fix_random_seeds(args.seed)
    if min(args.nb_knn) < 1 or args.temperature <= 0:
        raise utils.UserError(f"--nb_knn must be positive and --temperature > 0, got {args.nb_knn}, {args.temperature}")
    output_dir = make_output_dir(args.output_dir or args.dump_features or args.load_features or '.')

    if args.load_features:
        features = load_features(args.load_features, args.device)
    else:
        features = compute_features(args)
        if args.dump_features:
            save_features(features, args.dump_features)
    num_train = len(features['train_labels'])
    if max(args.nb_knn) > num_train:
        raise utils.UserError(f"--nb_knn {max(args.nb_knn)} exceeds the {num_train} training images")
    num_classes = int(torch.cat([features['train_labels'], features['test_labels']]).max()) + 1

    print(f"Weighted k-NN (T={args.temperature}) on {num_train} train and {len(features['test_labels'])} val images")
    accuracies = knn_accuracies(features['train_features'], features['train_labels'], features['test_features'],
                                features['test_labels'], args.nb_knn, args.temperature, num_classes)
    print(f"{'k':>5}  {'top-1':>7}  {'top-5':>7}")
    for k, (top1, top5) in accuracies.items():
        print(f"{k:>5}  {top1:>7.2f}  {top5:>7.2f}")
    if utils.is_main_process():
        summary = {'pretrained_weights': args.pretrained_weights, 'checkpoint_key': args.checkpoint_key,
                   'temperature': args.temperature, 'num_train': num_train,
                   'num_test': len(features['test_labels']),
                   'knn': {str(k): {'top1': top1, 'top5': top5} for k, (top1, top5) in accuracies.items()}}
        with open(os.path.join(output_dir, 'knn.json'), 'w') as f:
            json.dump(summary, f, indent=1)
    return accuracies


# ---------------------------------------------------------------------------------------------------------
# online k-NN during pretraining
# ---------------------------------------------------------------------------------------------------------
class OnlineKNN:
    """k-NN accuracy of a backbone on ``data_path/train`` (bank) and ``data_path/val``, e.g. the teacher's
    during pretraining: ``OnlineKNN(data_path, image_size)(backbone, epoch) -> {'knn_top1', 'knn_top5'}``.

    The datasets are opened once. Every rank must call it (the features are gathered across processes);
    the backbone is put in eval mode for the extraction and back in its previous mode after."""

    def __init__(self, data_path, image_size, resize_size=None, k=20, temperature=0.07, batch_size=64,
                 num_workers=2, zip_mode=False):
        transform = eval_transform(image_size, resize_size)
        train_set, val_set = build_train_val_datasets(data_path, transform, transform, zip_mode)
        if k > len(train_set):
            raise utils.UserError(f"k-NN with k={k} needs more than the {len(train_set)} images of {data_path}/train")
        self.train_loader = build_eval_loader(train_set, batch_size, num_workers)
        self.val_loader = build_eval_loader(val_set, batch_size, num_workers)
        self.num_classes = len(train_set.classes)
        self.k, self.temperature = k, temperature

    @classmethod
    def for_pretraining(cls, args, config):
        """From main_esvit's arguments: ``--knn_data_path``, by default the demo data's train/val when the
        run pretrains on the demo data; the crop size is the global crops' (TRAIN.IMAGE_SIZE)."""
        data_path = args.knn_data_path
        if args.knn_freq < 0:
            raise utils.UserError(f"--knn_freq must be 0 (never) or a number of epochs, got {args.knn_freq}")
        if data_path is None and args.data_path is not None:
            raise utils.UserError("--knn_freq needs --knn_data_path (a folder with train/ and val/)")
        return cls(data_path, config.TRAIN.IMAGE_SIZE[0], batch_size=args.batch_size_per_gpu,
                   num_workers=args.num_workers, zip_mode=args.zip_mode)

    def __call__(self, backbone, epoch):
        device = next(backbone.parameters()).device
        was_training = backbone.training
        backbone.eval()
        try:
            train_features, train_labels = extract_features(backbone, self.train_loader, device, print_freq=0)
            test_features, test_labels = extract_features(backbone, self.val_loader, device, print_freq=0)
        finally:
            backbone.train(was_training)
        top1, top5 = knn_classifier(train_features, train_labels, test_features, test_labels, self.k,
                                    self.temperature, self.num_classes)
        print(f"Epoch {epoch}: {self.k}-NN top-1 {top1:.2f}%, top-5 {top5:.2f}% ({len(test_labels)} val images)")
        return {'knn_top1': top1, 'knn_top5': top5}


if __name__ == '__main__':
    utils.run_main(eval_knn, parse_args(get_args_parser()))
