"""Linear probe: a linear classifier trained on the frozen backbone's features (DINO's protocol); ``eval_linear(args)``
runs eval_linear.py.

Features: ``forward_return_n_last_blocks`` (the token means of the last ``--n_last_blocks`` blocks,
concatenated) for the transformers, the pooled ``layer4`` for ResNets. The backbone stays in eval mode
without gradients; only the linear layer (SGD, momentum 0.9, lr x total batch / 256, cosine to 0) learns,
on RandomResizedCrop + flip views, and is validated on the Resize + CenterCrop views every ``--val_freq``
epochs and after the last. ``--cache_features True`` computes the features once, without augmentation, and
trains on them: a fast approximation of the protocol (no crop/flip augmentation) for CPU runs.

The output directory holds ``checkpoint.pth.tar`` (the classifier, optimizer, scheduler, epoch and best
accuracy; written atomically; rerunning the command resumes), ``log.txt`` (a JSON line per epoch) and
TensorBoard scalars under ``tb/``.
"""
import os
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import BatchSampler, TensorDataset

import utils
from datasets import (DistributedEpochSampler, EpochRandomSampler, build_loader, eval_transform, probe_train_transform,
                      set_epoch)
from .backbone import build_frozen_backbone
from .checkpoints import model_config
from .features import build_eval_loader, build_train_val_datasets, extract_features

CHECKPOINT_NAME = 'checkpoint.pth.tar'


class LinearClassifier(nn.Module):
    """A linear layer on frozen features (no BatchNorm), weights N(0, 0.01), zero bias."""

    def __init__(self, dim, num_labels=1000):
        super().__init__()
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x):  # B x D -> B x num_labels
        return self.linear(x.flatten(1))


def linear_features(backbone, images, n_last_blocks, avgpool_patchtokens):
    """The linear-probe feature of the frozen backbone. B x D"""
    return backbone.forward_return_n_last_blocks(images, n_last_blocks, avgpool_patchtokens)


def feature_dim(encode, image_size, device):
    """D of ``encode`` at ``image_size``, from one blank image; a bad --n_last_blocks is a UserError."""
    try:
        with torch.no_grad():
            return encode(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1]
    except ValueError as e:
        raise utils.UserError(f"cannot compute the linear-probe features: {e}") from None


def train_one_epoch(classifier, encode, optimizer, loader, epoch, device, print_freq=20, criterion=F.cross_entropy):
    """One epoch of the linear layer on ``encode(inputs)`` (frozen, no gradient), loss ``criterion(logits,
    targets)``; mean stats."""
    classifier.train()
    metric_logger = utils.MetricLogger()
    for inputs, targets in metric_logger.log_every(loader, print_freq, f'Epoch: [{epoch}]'):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.no_grad():
            features = encode(inputs)                      # B x D
        loss = criterion(classifier(features), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        metric_logger.update(loss=loss.item(), lr=optimizer.param_groups[0]['lr'])
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {name: metric_logger.meters[name].global_avg for name in ('loss', 'lr')}


def accuracy_stats(logits, labels):
    """Loss, top-1 and top-5 accuracy (%) of logits N x L against labels N (top-5: min(5, L) classes)."""
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {'loss': F.cross_entropy(logits, labels).item(),
            'acc1': 100.0 * hits[:, 0].float().mean().item(),
            'acc5': 100.0 * hits.any(dim=1).float().mean().item()}


class ValidationSet:
    """Accuracy on the whole validation set under the current classifier: from cached ``features`` and
    ``labels``, or from ``encode(images)`` over the val ``loader`` (every rank sees each sample once)."""

    def __init__(self, loader=None, encode=None, features=None, labels=None):
        self.loader, self.encode, self.features, self.labels = loader, encode, features, labels

    def logits(self, classifier, images):  # B x num_labels
        return classifier(self.encode(images))

    @torch.no_grad()
    def evaluate(self, classifier, device):
        classifier.eval()
        if self.loader is None:
            return accuracy_stats(classifier(self.features), self.labels)
        return accuracy_stats(*extract_features(classifier, self.loader, device, forward=self.logits))


def restore(path, classifier, optimizer, scheduler):
    """(epoch, best accuracy) of a saved probe, loaded into the running objects."""
    checkpoint = utils.load_checkpoint(path)
    missing = {'state_dict', 'optimizer', 'scheduler', 'epoch', 'best_acc'} - set(checkpoint)
    if missing:
        raise utils.UserError(f"{path} is not a linear-probe checkpoint (no {', '.join(sorted(missing))})")
    utils.load_state_dict_checked(classifier, checkpoint['state_dict'], f"linear classifier {path}")
    optimizer.load_state_dict(checkpoint['optimizer'])
    scheduler.load_state_dict(checkpoint['scheduler'])
    return int(checkpoint['epoch']), float(checkpoint['best_acc'])


def probe_optimization(args, classifier):
    """(the classifier to train: DDP-wrapped when distributed, SGD with momentum 0.9 at lr x total batch / 256,
    cosine schedule to 0, the checkpoint path in --output_dir, start epoch, best score), restored from that
    checkpoint when it exists (rerunning a command resumes)."""
    trained = classifier
    if utils.is_dist():
        trained = nn.parallel.DistributedDataParallel(classifier,
                                                      device_ids=[args.gpu] if args.device.type == 'cuda' else None)
    total_batch = args.batch_size_per_gpu * utils.get_world_size()
    optimizer = torch.optim.SGD(trained.parameters(), args.lr * total_batch / 256., momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0)
    checkpoint_path = os.path.join(args.output_dir, CHECKPOINT_NAME)
    start_epoch, best = 0, 0.0
    if os.path.isfile(checkpoint_path):
        start_epoch, best = restore(checkpoint_path, classifier, optimizer, scheduler)
        print(f"Resumed from {checkpoint_path} at epoch {start_epoch}")
    return trained, optimizer, scheduler, checkpoint_path, start_epoch, best


class CachedFeatureBatches:
    """Shuffled mini-batches of cached (features N x D, labels N), this rank's share when distributed; one
    indexing per batch. ``set_epoch(epoch)`` reshuffles, as for the image loader."""

    def __init__(self, features, labels, batch_size, seed=0):
        dataset = TensorDataset(features, labels)
        self.sampler = DistributedEpochSampler(dataset, seed) if utils.is_dist() else EpochRandomSampler(dataset, seed)
        self.batches = BatchSampler(self.sampler, batch_size, drop_last=False)
        self.features, self.labels = features, labels

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for indices in self.batches:
            yield self.features[indices], self.labels[indices]


def build_probe_data(args, backbone, probe_features, train_set, val_set):
    """(train batches, encode: their inputs -> features, validation). With ``--cache_features`` the
    features of both sets are computed once (no augmentation) and ``encode`` is the identity."""
    device = args.device
    val_loader = build_eval_loader(val_set, args.batch_size_per_gpu, args.num_workers)
    if not args.cache_features:
        train_loader = build_loader(train_set, args.batch_size_per_gpu, args.num_workers, utils.is_dist(),
                                    seed=args.seed, drop_last=False)
        encode = partial(probe_features, backbone)
        return train_loader, encode, ValidationSet(val_loader, encode)
    print("Caching the features of the val and train sets (no augmentation)...")
    val_features, val_labels = extract_features(backbone, val_loader, device, forward=probe_features)
    validation = ValidationSet(features=val_features, labels=val_labels)
    if args.evaluate:
        return None, None, validation
    train_loader = build_eval_loader(train_set, args.batch_size_per_gpu, args.num_workers)
    train_features, train_labels = extract_features(backbone, train_loader, device, forward=probe_features)
    train_batches = CachedFeatureBatches(train_features, train_labels, args.batch_size_per_gpu, args.seed)
    return train_batches, nn.Identity(), validation


def start_probe(args):
    """Processes, seeds, the checked schedule options and the output directory of a trained probe."""
    utils.init_distributed_mode(args)
    utils.fix_random_seeds(args.seed)  # the same random init (backbone, classifier) on every rank
    if args.n_last_blocks < 1 or args.epochs < 1 or args.val_freq < 1:
        raise utils.UserError("--n_last_blocks, --epochs and --val_freq must be at least 1")
    utils.make_output_dir(args.output_dir)


def eval_linear(args):
    start_probe(args)
    device = args.device

    # ============ frozen backbone and data ============
    backbone = build_frozen_backbone(model_config(args), args.pretrained_weights, args.checkpoint_key).to(device)
    probe_features = partial(linear_features, n_last_blocks=args.n_last_blocks,
                             avgpool_patchtokens=args.avgpool_patchtokens)  # (backbone, images) -> B x D
    dim = feature_dim(partial(probe_features, backbone), args.image_size, device)
    val_view = eval_transform(args.image_size, args.resize_size)
    train_view = val_view if args.cache_features else probe_train_transform(args.image_size)
    train_set, val_set = build_train_val_datasets(args.data_path, train_view, val_view, args.zip_mode)
    num_labels = args.num_labels or len(train_set.classes)
    if num_labels < len(train_set.classes):
        raise utils.UserError(f"--num_labels {num_labels} is smaller than the {len(train_set.classes)} classes")
    print(f"Data loaded: {len(train_set)} train and {len(val_set)} val images, {len(train_set.classes)} classes; "
          f"features of dimension {dim}.")
    train_batches, encode, validation = build_probe_data(args, backbone, probe_features, train_set, val_set)

    # ============ the linear classifier ============
    classifier = LinearClassifier(dim, num_labels).to(device)
    trained, optimizer, scheduler, checkpoint_path, start_epoch, best_acc = probe_optimization(args, classifier)
    if args.evaluate:
        if start_epoch == 0:
            raise utils.UserError(f"--evaluate needs a trained classifier in {checkpoint_path}")
        stats = validation.evaluate(classifier, device)
        print(f"* Acc@1 {stats['acc1']:.2f} Acc@5 {stats['acc5']:.2f} loss {stats['loss']:.3f}")
        return stats

    # ============ training ============
    log = utils.TrainingLog(args.output_dir, enabled=utils.is_main_process())
    for epoch in range(start_epoch, args.epochs):
        if args.cache_features:
            train_batches.set_epoch(epoch)
        else:
            set_epoch(train_batches, epoch)
        train_stats = train_one_epoch(trained, encode, optimizer, train_batches, epoch, device, args.print_freq)
        scheduler.step()
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch}
        log.scalars(epoch, **{'train/loss': train_stats['loss'], 'train/lr': train_stats['lr']})
        if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
            test_stats = validation.evaluate(classifier, device)
            best_acc = max(best_acc, test_stats['acc1'])
            print(f"Accuracy at epoch {epoch} on the {len(val_set)} val images: {test_stats['acc1']:.2f}% "
                  f"(best {best_acc:.2f}%)")
            log_stats.update({f'test_{k}': v for k, v in test_stats.items()})
            log.scalars(epoch, **{f'val/{k}': v for k, v in test_stats.items()})
        log.epoch(log_stats)
        utils.save_checkpoint({'epoch': epoch + 1, 'state_dict': classifier.state_dict(),
                               'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                               'best_acc': best_acc, 'args': utils.plain_args(args)}, checkpoint_path)
    log.close()
    print(f"Linear probe on frozen features done. Best top-1 accuracy on val: {best_acc:.2f}%")
    return {'best_acc': best_acc}
