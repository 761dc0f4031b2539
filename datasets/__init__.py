"""Data pipeline of self-supervised pre-training: multi-crop transforms, datasets, loader, demo data.

    transform = build_transform(args, global_crops_size=224)  # args.aug_opt: 'dino_aug' | 'deit_aug'
    transform = DataAugmentationDINO(global_crops_scale, local_crops_scale, local_crops_number,
                                     local_crops_size, global_crops_size=224, blur_radius=(0.1, 2.0))
        transform(pil_image) -> [global1, global2, *locals]  # tensors 3 x S x S, S = transform.crop_sizes()[i]
    dataset = build_dataset(data_path, transform, zip_mode=False, on_bad_image='skip', zip_prefix='')
        -> ImageFolderDataset(data_path) or ZipImageFolder(data_path if a file else data_path/train.zip);
           items (PIL image in RGB, or 'L' for one grey band, class_index); .num_bad_images, .bad_images;
           DataError for unusable paths
    dataset = build_dataset(data_path, transform, labelled=False, tsv_mode=False, shard_options=dict(...))
        -> pre-training: also an unlabelled folder or a list of paths (FileImagesDataset, target -1), the
           original's TSV files (tsv.TSVDataset, .chunk_sizes) or WebDataset shards (shards.ShardDataset, a
           stream with its own loader); see datasets/sources.py
    transform = DataAugmentationDINO(..., colour_on_device=True)  # views: (3 x S x S uint8, 12 colour draws)
    DeviceColour(device)(crops) -> the views coloured and normalised on the training device, batched
        (datasets/device_colour.py; `--colour_augment_on device`)
    transform = DataAugmentationDEIT(local_crops_number, local_crops_size, global_crops_size, **timm_options)
    to_normalized_tensor(pil_image) -> 3 x H x W, ImageNet-normalised (the last step of every transform)
    normalize(images) / denormalize(images)  # [0, 1] RGB tensors <-> the backbone's input
    eval_transform(image_size, resize_size=None)  # the evaluation view: resize, center crop, normalise
    center_view(image_size, resize_size=None)     # the same view as a PIL image
    probe_train_transform(image_size)             # the linear probe's training view
    colour_jitter()                               # the colour steps of DINO's views (a list of PIL transforms)
    loader = build_loader(dataset, batch_size, num_workers, distributed: bool, seed=0, drop_last=True,
                          step_batches=1, nice=worker_nice(device), sampler='distributed' | 'chunk')
        -> DataLoader with DistributedEpochSampler (distributed) or EpochRandomSampler; the same global
           order and per-sample augmentation seeds (seed, epoch, index) for any number of processes;
           pinned memory when CUDA is available; epochs of whole steps of `step_batches` micro-batches;
           workers at the lowest scheduling priority when the model runs on the CPU; a WorkerLoader
    WorkerLoader(dataset, num_workers, nice, **DataLoader options)  # workers capped at the CPUs; an error in a
        worker ends the iteration with the worker's one-line message and no worker left behind
    set_epoch(loader, epoch, start_batch=0)  # before each epoch: reproducible order and augmentations,
                                             # also after a resume (start_batch: mid-epoch)
    demo_data_path(split='train' | 'val', cache_dir=None) -> ImageFolder root of the committed
        Fashion-MNIST demo (train: 10 classes x 200, val: 10 classes x 100; 28 x 28 grayscale PNGs)
    fashion_mnist_folder(root, split='train' | 'test', out_dir, per_class=None) -> out_dir, the full
        Fashion-MNIST split exported from the IDX files (root None: /usr/share/datasets/fashion-mnist)

    build_scenes(out_dir, ...) / demo_scenes_path() -> a scene benchmark of Fashion-MNIST garments on canvases
        (datasets/scenes.py): VOC layout with exact masks, pretrain/ and largest/ ImageFolders
    VOCSegmentation(root, split, transform) -> (image, mask) pairs of the Pascal VOC layout (datasets/voc.py),
        with segmentation_train_transform / segmentation_val_transform (image and mask together)

Data sources and licences: see datasets/fashion_mnist.py.
"""
from .fashion_mnist import (FASHION_MNIST_CLASSES, demo_data_path, fashion_mnist_folder,
                            load_fashion_mnist)
from .folder import DataError, ImageFolderDataset, ZipImageFolder
from .sources import FileImagesDataset, build_dataset, image_list, unlabelled_folder
from .loader import (DistributedEpochSampler, EpochRandomSampler, WorkerLoader, build_loader, cap_workers, set_epoch,
                     worker_init, worker_nice)
from .deit_aug import DataAugmentationDEIT
from .device_colour import DeviceColour
from .transforms import (BoxedViews, DataAugmentationDINO, MultiCropTransform, build_transform,
                         center_view, colour_jitter, denormalize, eval_transform, matches_by_position, normalize,
                         probe_train_transform,
                         to_normalized_tensor)

__all__ = [
    'FASHION_MNIST_CLASSES', 'demo_data_path', 'fashion_mnist_folder', 'load_fashion_mnist',
    'DataError', 'ImageFolderDataset', 'ZipImageFolder', 'build_dataset', 'FileImagesDataset', 'image_list',
    'unlabelled_folder',
    'DistributedEpochSampler', 'EpochRandomSampler', 'WorkerLoader', 'build_loader', 'cap_workers', 'set_epoch',
    'worker_init', 'worker_nice',
    'BoxedViews', 'DataAugmentationDEIT', 'DataAugmentationDINO', 'DeviceColour', 'MultiCropTransform', 'build_transform',
    'center_view', 'colour_jitter', 'denormalize', 'eval_transform', 'matches_by_position', 'normalize', 'probe_train_transform',
    'to_normalized_tensor',
]
