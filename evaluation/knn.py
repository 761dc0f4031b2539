"""Weighted k-NN classification on the frozen backbone's features (DINO's protocol): ``eval_knn(args)`` runs
eval_knn.py, :class:`OnlineKNN` measures a backbone during pretraining.

Features are the backbone's pooled output, L2-normalised, of the evaluation view (resize + center crop) of every
image of ``data_path/train`` (the bank) and ``data_path/val``. A test image's class scores are the sum over its
k most cosine-similar bank images of ``exp(similarity / T)`` for their class.
"""
import os
import sys

import torch

import utils
from datasets import eval_transform
from .backbone import build_frozen_backbone
from .checkpoints import model_config
from .features import build_eval_loader, build_train_val_datasets, extract_features

KNN_CHUNK_ELEMENTS = 2 ** 27  # test x bank similarities computed at once (512 MiB in float32)


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
# eval_knn.py
# ---------------------------------------------------------------------------------------------------------
FEATURE_FILES = {'train_features': 'trainfeat.pth', 'test_features': 'testfeat.pth',
                 'train_labels': 'trainlabels.pth', 'test_labels': 'testlabels.pth'}


def clamp_ks(ks, bank_size):
    """The k values, each at most ``bank_size`` (the training images), without repeats; a warning names the
    ones lowered."""
    too_large = [k for k in ks if k > bank_size]
    if too_large:
        print(f"WARNING: k = {', '.join(map(str, too_large))} exceeds the {bank_size} training images: "
              f"k = {bank_size} is used instead", file=sys.stderr)
    return list(dict.fromkeys(min(k, bank_size) for k in ks))


def compute_features(args):
    """Features and labels of data_path/train and data_path/val under the frozen backbone; ``args.nb_knn``
    clamped to the training images before any work."""
    transform = eval_transform(args.image_size, args.resize_size)
    train_set, val_set = build_train_val_datasets(args.data_path, transform, transform, args.zip_mode)
    print(f"Data loaded: {len(train_set)} train and {len(val_set)} val images, {len(train_set.classes)} classes.")
    backbone = build_frozen_backbone(model_config(args), args.pretrained_weights, args.checkpoint_key)
    args.nb_knn = clamp_ks(args.nb_knn, len(train_set))
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


def eval_knn(args):
    utils.init_distributed_mode(args)
    utils.fix_random_seeds(args.seed)
    if min(args.nb_knn) < 1 or args.temperature <= 0:
        raise utils.UserError(f"--nb_knn must be positive and --temperature > 0, got {args.nb_knn}, {args.temperature}")
    output_dir = utils.make_output_dir(args.output_dir or args.dump_features or args.load_features or '.')

    if args.load_features:
        features = load_features(args.load_features, args.device)
    else:
        features = compute_features(args)
        if args.dump_features:
            save_features(features, args.dump_features)
    if not args.use_cuda:  # --use_cuda False: the vote runs on the features in CPU memory
        features = {name: tensor.cpu() for name, tensor in features.items()}
    num_train = len(features['train_labels'])
    args.nb_knn = clamp_ks(args.nb_knn, num_train)  # loaded features: clamped here
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
        utils.save_json(summary, os.path.join(output_dir, 'knn.json'))
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
        k = clamp_ks([k], len(train_set))[0]
        self.train_loader = build_eval_loader(train_set, batch_size, num_workers)
        self.val_loader = build_eval_loader(val_set, batch_size, num_workers)
        self.num_classes = len(train_set.classes)
        self.k, self.temperature = k, temperature

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
