"""The pretraining run of main_esvit.py: data, trainer, resume, then epochs until --epochs, each ending with its
log line, its checkpoint and, when asked, a k-NN accuracy and an attention picture of the teacher.

    train_esvit(args)   # args from engine.args.parse_args
"""
import datetime
import os
import time

import utils
from analysis import attention_figure, network_input
from config import load_config, save_config
from datasets import (build_dataset, build_loader, build_transform, demo_data_path, matches_by_position, normalize,
                      set_epoch, worker_nice)
from evaluation import OnlineKNN, load_backbone_weights
from .build import build_trainer, colour_on_device
from .optim import images_per_step
from .trainer import NonFiniteLoss, Stopped


def check_args(args):
    if args.accum_iter < 1 or args.saveckp_iters < 0:
        raise utils.UserError(f"--accum_iter {args.accum_iter} must be at least 1 and --saveckp_iters "
                              f"{args.saveckp_iters} not negative")
    if len(args.local_crops_number) != len(args.local_crops_size):
        raise utils.UserError(f"--local_crops_number {args.local_crops_number} and --local_crops_size "
                              f"{args.local_crops_size} must have the same length")
    if not 0 <= args.region_loss_weight <= 1:
        raise utils.UserError(f"--region_loss_weight {args.region_loss_weight} must be in [0, 1]")
    if args.region_teacher_temp is not None and args.region_teacher_temp <= 0:
        raise utils.UserError(f"--region_teacher_temp {args.region_teacher_temp} must be positive")
    if not 0 < args.blur_radius[0] <= args.blur_radius[1]:
        raise utils.UserError(f"--blur_radius {args.blur_radius[0]} {args.blur_radius[1]}: need 0 < MIN <= MAX")
    if args.knn_freq < 0:
        raise utils.UserError(f"--knn_freq must be 0 (never) or a number of epochs, got {args.knn_freq}")
    if matches_by_position(args) and (args.aug_opt != 'dino_aug' or args.use_mixup):
        raise utils.UserError(f"--region_matching position needs --aug-opt dino_aug (the views' crop boxes) and "
                              f"--use_mixup False, not {args.aug_opt} and {args.use_mixup}")
    if args.colour_augment_on == 'device' and args.aug_opt != 'dino_aug':
        raise utils.UserError(f"--colour_augment_on device needs --aug-opt dino_aug, not {args.aug_opt} (its "
                              f"views are timm's transforms, applied in the DataLoader workers)")
    if args.zip_mode and args.tsv_mode:
        raise utils.UserError("--zip_mode and --tsv_mode exclude each other: say which one --data_path is")
    if args.knn_freq and args.knn_data_path is None and args.data_path is not None:
        raise utils.UserError("--knn_freq needs --knn_data_path (a folder with train/ and val/)")


def build_data(args, config):
    """(dataset, loader) of the multi-crop views of --data_path (default: the demo data)."""
    data_path = args.data_path or demo_data_path('train')
    transform = build_transform(args, global_crops_size=config.TRAIN.IMAGE_SIZE[0],
                                colour_on_device=colour_on_device(args))
    dataset = build_dataset(data_path, transform, zip_mode=args.zip_mode, on_bad_image=args.on_bad_image,
                            tsv_mode=args.tsv_mode, labelled=False,
                            shard_options=dict(seed=args.seed, epoch_images=args.shard_epoch_images,
                                               shuffle_buffer=args.shard_shuffle_buffer))
    data_loader = build_loader(dataset, args.batch_size_per_gpu, args.num_workers,
                               distributed=utils.get_world_size() > 1, seed=args.seed, step_batches=args.accum_iter,
                               nice=worker_nice(args.device) if args.nice_workers else 0, sampler=args.sampler)
    if len(data_loader) == 0:
        raise utils.UserError(f"{len(dataset)} images in {data_path} are fewer than one optimizer step of "
                              f"{images_per_step(args)}: lower --batch_size_per_gpu or --accum_iter")
    print(f"Data loaded: {len(dataset)} images, {len(data_loader) // args.accum_iter} optimizer steps of "
          f"{images_per_step(args)} images per epoch.")
    return dataset, data_loader


def run_summary(args, config, trainer, num_images, steps_per_epoch):
    """The few lines that say what this run does (every argument is in output_dir/args.json)."""
    cfg = args.cfg and (os.path.relpath(args.cfg) if os.path.abspath(args.cfg).startswith(os.getcwd()) else args.cfg)
    model = ' '.join(filter(None, [f'--arch {args.arch}' if args.arch else '', f'--cfg {cfg}' if cfg else '',
                                   ' '.join(args.opts or [])]))
    loss = 'view + region loss (V+R)' if args.use_dense_prediction else 'view loss (V)'
    precision = str(trainer.autocast_dtype or 'float32').replace('torch.', '')
    return '\n'.join([
        f"Model: {model} ({config.MODEL.NAME}, {config.TRAIN.IMAGE_SIZE[0]} px), "
        f"{sum(p.numel() for p in trainer.student.parameters()) / 1e6:.3g}M parameters, {loss}, out_dim {args.out_dim}",
        f"Data: {args.data_path or 'the embedded demo data'}, {num_images} images, colour steps of the views "
        f"{'on the ' + args.device.type if trainer.view_colour else 'in the DataLoader workers'}",
        f"Steps: {args.epochs} epoch{'s' if args.epochs != 1 else ''} x {steps_per_epoch} steps of {images_per_step(args)} images, "
        f"lr {args.lr} per 256 images, {precision} on {args.device}",
        f"Output: {args.output_dir} (all arguments in args.json)"])


def resume(trainer, args, config):
    """(epoch, images of that epoch done): from output_dir/checkpoint.pth when there is one (the same command
    resumes; this project's or the original's), else (0, 0) after initialising from --pretrained_weights_ckpt (a
    continuation: networks and centers) or else from MODEL.PRETRAINED (the backbones only; heads fresh)."""
    pretrained = config.MODEL.PRETRAINED if config.MODEL.INIT_WEIGHTS else ''
    if pretrained and list(config.MODEL.PRETRAINED_LAYERS) != ['*']:
        raise utils.UserError(f"MODEL.PRETRAINED_LAYERS {list(config.MODEL.PRETRAINED_LAYERS)}: only ['*'] (the "
                              f"whole backbone) is supported")
    checkpoint_path = os.path.join(args.output_dir, 'checkpoint.pth')
    if os.path.isfile(checkpoint_path):
        start_epoch, start_images = trainer.load_state(checkpoint_path)
        print(f"Resumed from {checkpoint_path} at epoch {start_epoch}, image {start_images} of the epoch")
        return start_epoch, start_images
    if args.pretrained_weights_ckpt:
        trainer.load_state(args.pretrained_weights_ckpt, continuation=True)
        print(f"Initialised from {args.pretrained_weights_ckpt}"
              + (f" (MODEL.PRETRAINED {pretrained} is not used)" if pretrained else ''))
    elif pretrained:
        loaded = load_backbone_weights(trainer.student.backbone, pretrained)
        trainer.teacher.backbone.load_state_dict(trainer.student.backbone.state_dict())
        print(f"Initialised the student and teacher backbones from MODEL.PRETRAINED {loaded}; heads fresh")
    return 0, 0


class EpochMonitor:
    """What the end of an epoch measures on the teacher's backbone: the k-NN accuracy every --knn_freq epochs
    and after the last (--knn_data_path, by default the demo data's train/val when pretraining on the demo
    data), an attention picture of the first training image every --vis_freq epochs."""

    def __init__(self, args, config, dataset):
        self.args = args
        image_size = config.TRAIN.IMAGE_SIZE[0]
        self.online_knn = None
        if args.knn_freq:
            self.online_knn = OnlineKNN(args.knn_data_path, image_size, batch_size=args.batch_size_per_gpu,
                                        num_workers=args.num_workers, zip_mode=args.zip_mode)
        self.vis_image = None
        if args.vis_freq:
            first_image = (dataset.first_image() if hasattr(dataset, 'first_image')  # a stream of shards
                           else dataset.read_image(dataset.samples[0][0]))
            self.vis_image = normalize(network_input(first_image, image_size))

    def __call__(self, backbone, epoch, log, step):
        """Stats of ``epoch`` (its k-NN accuracy, or none); pictures go to TensorBoard at ``step``, the optimizer
        steps done (the step axis of the train/* scalars)."""
        args, stats = self.args, {}
        if self.online_knn is not None and ((epoch + 1) % args.knn_freq == 0 or epoch + 1 == args.epochs):
            stats = self.online_knn(backbone, epoch)
            log.scalars(step, **{'knn/top1': stats['knn_top1']})
        if self.vis_image is not None and epoch % args.vis_freq == 0:
            log.image('attention', attention_figure(backbone, self.vis_image), step)
        return stats


def train_epochs(trainer, data_loader, monitor, start_epoch, start_images):
    """Epochs ``start_epoch`` (from image ``start_images`` of its order) to --epochs. Each epoch's log line goes
    before its checkpoint: a crash in between reruns the epoch (and the resumed run drops the line) instead of
    losing the line for good."""
    args = trainer.args
    log = utils.TrainingLog(args.output_dir, enabled=utils.is_main_process(), first_epoch=start_epoch)
    try:
        for epoch in range(start_epoch, args.epochs):
            start_step = start_images // images_per_step(args) if epoch == start_epoch else 0
            set_epoch(data_loader, epoch, start_batch=start_step * args.accum_iter)
            train_stats = trainer.train_one_epoch(data_loader, epoch, log)
            steps_done = (epoch + 1) * trainer.schedules.iters_per_epoch
            epoch_stats = monitor(trainer.teacher.backbone, epoch, log, step=steps_done)
            log.epoch({**{f'train_{k}': v for k, v in train_stats.items()}, **epoch_stats, 'epoch': epoch})
            latest = trainer.save(epoch + 1)
            if args.saveckp_freq and epoch % args.saveckp_freq == 0:  # the same state: a hard link, not a 2nd write
                utils.keep_copy(latest, os.path.join(args.output_dir, f'checkpoint{epoch:04}.pth'))
    finally:
        log.close()


def train_esvit(args):
    utils.init_distributed_mode(args)
    utils.fix_random_seeds(args.seed)  # every process builds the same networks (the teacher is not in DDP)
    check_args(args)
    utils.make_output_dir(args.output_dir)
    config = load_config(args)
    if utils.is_main_process():
        save_config(config, os.path.join(args.output_dir, 'config.yaml'))
        utils.save_json(utils.plain_args(args), os.path.join(args.output_dir, 'args.json'))
    if getattr(args, 'demo_model', False) and args.data_path is not None:
        print(f"No --arch or --cfg: the demo model ({args.cfg}) with the demo's settings on {args.data_path}")

    dataset, data_loader = build_data(args, config)
    trainer = build_trainer(args, config, steps_per_epoch=len(data_loader) // args.accum_iter)
    print(run_summary(args, config, trainer, len(dataset), len(data_loader) // args.accum_iter))
    start_epoch, start_images = resume(trainer, args, config)
    monitor = EpochMonitor(args, config, dataset)

    start_time = time.time()
    print(f"Starting EsViT training from epoch {start_epoch}")
    with trainer.stop:  # SIGTERM / SIGINT: the current step ends, checkpoint.pth is written, exit 128 + signal
        try:
            train_epochs(trainer, data_loader, monitor, start_epoch, start_images)
        except Stopped as e:
            print(f"{e}: state saved to {os.path.join(args.output_dir, 'checkpoint.pth')}; the same command "
                  f"resumes from there", force=True)
            raise SystemExit(128 + e.signum) from None
        except NonFiniteLoss as e:
            nan_path = trainer.save(e.epoch + 1, name='checkpoint_NaN.pth')
            raise utils.UserError(f"{e}: training stopped, state saved to {nan_path}; try a lower --lr, "
                                  f"--clip_grad, or --use_fp16 false") from None
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
