"""The options of pretraining (main_esvit.py): the original's flags, their defaults, and the demo's settings."""
import argparse

import utils
from config import DEMO_CFG

# What a bare `python main_esvit.py` trains: the small Swin of the demo yaml on the embedded Fashion-MNIST subset.
# Batch 16 (lr 1e-3 x 16/256): on 2 CPU cores a step is mostly fixed cost, so smaller batches give more steps per
# minute; teacher momentum 0.98 learnt more in a few thousand steps than 0.99 or 0.97 (README, Fashion-MNIST).
# The heads' last layer stays at its random init for the whole run (freeze_last_layer > any demo's epochs): once
# it trained (from the second epoch), the loss rose towards uniform outputs on Fashion-MNIST part A (README,
# "Demo settings on data they were not chosen on"), and a frozen one gave a higher k-NN there for V and V+R.
DEMO_DEFAULTS = dict(arch='swin', use_dense_prediction=True, out_dim=4096, head_hidden_dim=512,
                     head_bottleneck_dim=128, local_crops_number=[4],
                     local_crops_size=[32], local_crops_scale=[0.2, 0.5], global_crops_scale=[0.5, 1.0],
                     batch_size_per_gpu=16, lr=0.001, warmup_epochs=0, momentum_teacher=0.98,
                     weight_decay=0.04, weight_decay_end=0.1, norm_last_layer=False, num_workers=2,
                     epochs=5, saveckp_freq=0, freeze_last_layer=1000)


def get_args_parser():
    p = argparse.ArgumentParser('EsViT', add_help=False)
    p.add_argument('--cfg', default=None, type=str, help='experiment yaml (MODEL.NAME, MODEL.SPEC, TRAIN.IMAGE_SIZE)')

    # model
    p.add_argument('--arch', default=None, type=str, help="""swin_tiny/small/base/large, cvt_tiny, vil_2262/1281/14121,
        deit_tiny/small or vit_base (ViTs: no yaml, see --patch_size) or a torchvision ResNet name. Without --cfg a
        sized name builds the original's yaml of that size; with --cfg it must agree with the yaml's family and
        size (swin, cvt_small, vil: a family, any size)""")
    p.add_argument('--patch_size', default=16, type=int, help="""Size in pixels of the square patches of the ViTs
        (deit_tiny, deit_small, vit_base; sets MODEL.SPEC.PATCH_SIZE; ignored by other archs), default 16. 8 gives
        better features at 4x the tokens (more memory and time); with it, consider --use_fp16 False if the loss
        is unstable.""")
    p.add_argument('--out_dim', default=65536, type=int, help='output dimension of the DINO heads')
    p.add_argument('--norm_last_layer', default=True, type=utils.bool_flag,
                   help='weight-normalise the last layer of the heads with a frozen gain')
    p.add_argument('--momentum_teacher', default=0.996, type=float,
                   help='base EMA momentum of the teacher, raised to 1 with a cosine schedule')
    p.add_argument('--use_bn_in_head', default=False, type=utils.bool_flag,
                   help='BatchNorm in the heads\' hidden layers (DINO: False, unless the backbone is a ResNet)')
    p.add_argument('--head_hidden_dim', default=2048, type=int, help='width of the heads\' hidden layers')
    p.add_argument('--head_bottleneck_dim', default=256, type=int,
                   help='width of the heads\' last hidden layer, before the out_dim prototypes')
    p.add_argument('--use_dense_prediction', default=False, type=utils.bool_flag,
                   help='add the region-level matching loss (EsViT V+R)')
    p.add_argument('--region_loss_weight', default=0.5, type=float,
                   help="""with --use_dense_prediction: the loss is (1 - w) x view loss + w x region loss; 0.5 (the
        original's) weighs them equally. Larger w puts more of the gradient on the region tokens (what a dense
        probe reads), smaller on the pooled view (what k-NN and linear probes read). On the README's scene study,
        with --region_matching feature 0.8 did worse on the dense probe than 0.5 or 0.2 (the view head starved and
        the mostly wrong matches took over); with --region_matching position 0.8 did best (0.5, 0.9 and 1.0 a few
        tenths lower).""")

    p.add_argument('--region_matching', default='feature', choices=['feature', 'position'],
                   help="""with --use_dense_prediction: which teacher token each student region token learns from.
        'feature' (the original's): the teacher token of the other view whose backbone feature is most
        cosine-similar; early in training, and in short runs, these matches are mostly wrong (on the README's
        scenes they find the same place of the image for about 4 tokens in 10). 'position': the teacher token that
        covers the same point of the image, from the views' crop boxes (by feature where the other view does not
        hold that point: about 1 token in 10 with the demo's crops). On the README's scenes it raised the dense
        probe by about 1 mIoU at equal steps and made --region_loss_weight 0.8 the best weight. Needs --aug-opt
        dino_aug and no --use_mixup.""")

    # teacher temperature
    p.add_argument('--warmup_teacher_temp', default=0.04, type=float,
                   help='teacher temperature at the start of the warm-up; try 0.04 and lower it if the loss does not '
                        'decrease at the start')
    p.add_argument('--teacher_temp', default=0.04, type=float,
                   help='teacher temperature after the warm-up; 0.04 works well in most cases, above 0.07 training '
                        'tends to be unstable and the teacher to collapse to uniform (see the health signals)')
    p.add_argument('--region_teacher_temp', default=None, type=float,
                   help='with --use_dense_prediction: the region head\'s teacher temperature after the warm-up '
                        '(default: --teacher_temp, as the original); the warm-up starts at --warmup_teacher_temp '
                        'for both heads. A higher value keeps the matched teacher tokens\' targets soft: on the '
                        'README\'s scene study 0.07 brought the view-to-view correspondences above random init, '
                        'not the dense probe')
    p.add_argument('--warmup_teacher_temp_epochs', default=0, type=int,
                   help='epochs of the linear warm-up from --warmup_teacher_temp to --teacher_temp (the original\'s '
                        'recipes: 30)')

    # optimisation
    p.add_argument('--use_fp16', default=True, type=utils.bool_flag,
                   help='mixed precision with --precision auto: fp16 + GradScaler on CUDA, bf16 on a CPU where it is faster')
    p.add_argument('--precision', default='auto', choices=['auto', 'fp32', 'bf16', 'fp16'],
                   help='auto (with --use_fp16) = fp16 on CUDA; on CPU bf16 where a bf16 matmul is at least 1.5x '
                        'as fast as float32 (measured at start), else fp32')
    p.add_argument('--weight_decay', default=0.04, type=float,
                   help='initial weight decay, raised to --weight_decay_end with a cosine schedule; a smaller value '
                        'works well for ViTs')
    p.add_argument('--weight_decay_end', default=0.4, type=float,
                   help='final weight decay; DINO found that raising the decay during training improves ViTs')
    p.add_argument('--clip_grad', default=3.0, type=float, help='gradient clipping norm, 0 disables')
    p.add_argument('--clip_mode', default='per_tensor', choices=['per_tensor', 'global'],
                   help="per_tensor clips each parameter's gradient (the original); global clips their joint norm")
    p.add_argument('--batch_size_per_gpu', default=64, type=int,
                   help='images per process and micro-batch; the lr scales with the total batch')
    p.add_argument('--accum_iter', default=1, type=int,
                   help='micro-batches per optimizer step (gradient accumulation): the effective batch is '
                        'batch_size_per_gpu x processes x accum_iter, and lr scales with it')
    p.add_argument('--epochs', default=100, type=int, help='training epochs (the original\'s recipes: 300)')
    p.add_argument('--freeze_last_layer', default=1, type=int,
                   help="""epochs during which the last layer of the heads (the out_dim prototypes) stays at its
        init; more than --epochs keeps it fixed for the whole run (the CPU demo's 1000): try that when the loss
        rises after the first epoch, a sign of collapse towards uniform outputs in short runs""")
    p.add_argument('--lr', default=0.0005, type=float, help='peak lr for a total batch of 256 (scaled linearly)')
    p.add_argument('--warmup_epochs', default=10, type=int, help='epochs of the linear lr warm-up to its peak')
    p.add_argument('--min_lr', default=1e-6, type=float,
                   help='lr at the end of the cosine schedule; a fraction of the peak lr in practice')
    p.add_argument('--optimizer', default='adamw', choices=['adamw', 'sgd', 'lars'],
                   help='adamw is advised for transformers; sgd or lars for ResNets')
    p.add_argument('--fused_optimizer', default=True, type=utils.bool_flag,
                   help='fused AdamW / SGD kernels (False: the per-tensor loop)')

    # multi-crop
    p.add_argument('--global_crops_scale', type=float, nargs='+', default=(0.4, 1.),
                   help='area range of the 2 global crops (RandomResizedCrop scale); below 1.0 up to the image')
    p.add_argument('--local_crops_number', type=int, nargs='+', default=(8,),
                   help='local crops of each size in --local_crops_size, e.g. 6 2')
    p.add_argument('--local_crops_scale', type=float, nargs='+', default=(0.05, 0.4),
                   help='area range of the local crops; its upper end should be below the lower end of '
                        '--global_crops_scale')
    p.add_argument('--local_crops_size', type=int, nargs='+', default=(96,), help='e.g. 96 128')
    p.add_argument('--blur_radius', type=float, nargs=2, default=(0.1, 2.0), metavar=('MIN', 'MAX'),
                   help='''range of the Gaussian blur's radius in pixels of a view (the original's 0.1 2, made for
                   224 px global and 96 px local views; blur applies to the first global view always, to the
                   local views half the time). On small views scale it with the view: at 64 / 32 px the
                   original's range blurs 3.5-7x as much of the view, e.g. 0.03 0.57 (x 64/224) for 64 px
                   (on the README's scene study that did not beat the default)''')
    p.add_argument('--aug-opt', type=str, default='dino_aug', help='augmentation policy (dino_aug)')
    p.add_argument('--colour_augment_on', default='auto', choices=['auto', 'workers', 'device'],
                   help='''where the colour steps of the dino_aug views run (jitter, grayscale, blur, solarisation):
                   workers (PIL in the DataLoader workers, as the original) or device (batched on the training
                   device; the workers then only decode, crop, resize and flip, and send uint8: 2.2-2.4x the
                   images per worker core of workers, 3.8-4.2x the original's, so fewer cores keep a GPU fed). The
                   random draws are the same either way, the pixels equal up to rounding. auto: device on CUDA, workers elsewhere (on a CPU the work would
                   only move from the workers to the training process)''')

    # data
    p.add_argument('--data_path', default=None, type=str,
                   help='ImageFolder root (or zip with --zip_mode); default: the embedded demo data')
    p.add_argument('--dataset', default='imagenet1k', type=str,
                   help="accepted for the original's command lines and ignored: --data_path and --zip_mode say "
                        "what the data are")
    p.add_argument('--zip_mode', default=False, type=utils.bool_flag,
                   help='--data_path is a zip of class folders (or a folder with train.zip), read lazily')
    p.add_argument('--on_bad_image', default='skip', choices=['skip', 'fail'],
                   help='a corrupt image is replaced by another sample and logged (skip) or stops the run')

    # misc
    p.add_argument('--pretrained_weights_ckpt', default='', type=str,
                   help='start from this checkpoint (e.g. a view-only run continued with V+R)')
    p.add_argument('--output_dir', default='.', type=str,
                   help='where checkpoints, log.txt, args.json, config.yaml and tb/ go; rerun to resume')
    p.add_argument('--saveckp_freq', default=5, type=int, help='also keep checkpoint{epoch:04}.pth every N epochs')
    p.add_argument('--saveckp_iters', default=0, type=int,
                   help='also write checkpoint.pth every N optimizer steps inside an epoch; a resume continues '
                        'from that step (0: only at the end of each epoch)')
    p.add_argument('--seed', default=0, type=int, help='seed of the initial weights, the data order and the crops')
    p.add_argument('--num_workers', default=10, type=int,
                   help='DataLoader worker processes per training process (at most the CPUs available)')
    p.add_argument('--nice_workers', default=True, type=utils.bool_flag,
                   help='on a CPU run, DataLoader workers at the lowest priority (nice 19), so that they do not '
                        'preempt the OpenMP threads of the step (1.5x faster demo steps on 2 cores)')
    p.add_argument('--print_freq', default=10, type=int, help='progress line every N steps')
    p.add_argument('--health_signals', default=True, type=utils.bool_flag,
                   help='log the training-health signals (view and region loss, teacher entropy, KL, center norms, '
                        'distinct prototypes) per step and warn once when the run looks collapsed')
    p.add_argument('--knn_freq', default=None, type=int,
                   help='k-NN accuracy of the teacher every N epochs and after the last; 0: never '
                        '(default 0, the demo: after the last epoch)')
    p.add_argument('--vis_freq', default=0, type=int,
                   help="log an attention picture of the first training image to TensorBoard every N epochs (0: never)")
    p.add_argument('--compile', default=False, type=utils.bool_flag,
                   help='torch.compile the backbones (forward_features); faster steps after a slow first one')
    p.add_argument('--malloc', default='auto', choices=utils.MALLOC_CHOICES,
                   help='auto: restart with tcmalloc (when the system has it) or the cmeel-mimalloc wheel\'s mimalloc '
                        'preloaded, so that freed blocks are reused instead of page-faulted in again (faster CPU '
                        'steps); system: glibc malloc')
    p.add_argument('--flush_denormal', default=True, type=utils.bool_flag,
                   help='flush float32 denormals to zero on the CPU (tiny softmax tails otherwise slow matmuls 100x)')
    p.add_argument('--knn_data_path', default=None, type=str,
                   help='folder with train/ and val/ for --knn_freq (default for the demo: the demo data)')
    p.add_argument('--dist_url', default='env://', type=str,
                   help='init method of the process group (env://: the variables torchrun sets)')
    p.add_argument('--local_rank', '--local-rank', default=0, type=int, help='set by torch.distributed.launch')
    add_augmentation_args(p)
    add_data_source_args(p)
    p.add_argument('opts', default=None, nargs=argparse.REMAINDER, help='config overrides: KEY VALUE ...')
    return p


def add_augmentation_args(p):
    """The original's DeiT augmentation and mixup flags (its names and defaults; datasets/deit_aug.py,
    engine/mixup.py)."""
    deit = p.add_argument_group('DeiT augmentation (with --aug-opt deit_aug: timm\'s training transform for every '
                                'view, the crops sized by --local_crops_size and the yaml\'s image size)')
    deit.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT',
                      help='colour jitter factor (default: 0.4; ignored while --aa is set, as in timm)')
    deit.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME',
                      help='timm auto-augment policy: rand-..., augmix-..., v0, original, or none '
                           '(default: rand-m9-mstd0.5-inc1)')
    deit.add_argument('--train-interpolation', type=str, default='bicubic',
                      help='resize interpolation of the random crops: random, bilinear or bicubic (default: bicubic)')
    deit.add_argument('--reprob', type=float, default=0.25, metavar='PCT',
                      help='random-erasing probability (default: 0.25)')
    deit.add_argument('--remode', type=str, default='pixel', choices=['pixel', 'rand', 'const'],
                      help='random-erasing fill: pixel, rand or const (default: pixel)')
    deit.add_argument('--recount', type=int, default=1, help='random-erasing count (default: 1)')
    deit.add_argument('--resplit', action='store_true', default=False,
                      help='accepted and without effect, as in the original and DeiT: it only spares the clean '
                           'split of AugMix split batches, which neither uses (default: False)')
    mix = p.add_argument_group('mixup / cutmix of the student\'s views (targets: the images of the batch)')
    mix.add_argument('--use_mixup', type=utils.bool_flag, default=False,
                     help='mix the images of the batch in the first --num_mixup_views student views; the teacher '
                          'sees them unmixed (default: False)')
    mix.add_argument('--num_mixup_views', type=int, default=10,
                     help='how many student views (globals first) are mixed (default: 10)')
    mix.add_argument('--mixup', type=float, default=0.8, help='mixup alpha, mixup enabled if > 0 (default: 0.8)')
    mix.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha, cutmix enabled if > 0 (default: 1.0)')
    mix.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                     help='cutmix min/max box ratio, overrides alpha and enables cutmix if set (default: None)')
    mix.add_argument('--mixup-prob', type=float, default=1.0,
                     help='probability of mixing a view at all (default: 1.0)')
    mix.add_argument('--mixup-switch-prob', type=float, default=0.5,
                     help='probability of cutmix instead of mixup when both are enabled (default: 0.5)')
    mix.add_argument('--mixup-mode', type=str, default='batch', choices=['batch', 'pair', 'elem'],
                     help='one mixing weight per view (batch), per image pair (pair) or per image (elem) '
                          '(default: batch)')
    mix.add_argument('--smoothing', type=float, default=0.0,
                     help='label smoothing of the mixing targets over the batch (default: 0.0)')


def add_data_source_args(p):
    """Where the images come from besides --data_path and --zip_mode (datasets/sources.py, tsv.py, shards.py)."""
    data = p.add_argument_group('data sources')
    data.add_argument('--tsv_mode', type=utils.bool_flag, default=False,
                      help='--data_path is the original\'s TSV layout: train.tsv, a folder of .tsv files or one '
                           '.tsv, lines of key, label, base64 image, with .lineidx offsets beside (default: False)')
    data.add_argument('--sampler', default='distributed', choices=['distributed', 'chunk'],
                      help='distributed: one shuffled order of all images; chunk: chunk by chunk (one chunk per '
                           '.tsv file), shuffled inside each, so a step reads one file (default: distributed)')
    data.add_argument('--shard_epoch_images', default=0, type=int,
                      help='WebDataset shards: images per epoch (all processes), which fixes the steps per epoch; '
                           '0 counts the images of local shards once at start (default: 0)')
    data.add_argument('--shard_shuffle_buffer', default=1000, type=int,
                      help='WebDataset shards: samples held in each loader worker\'s shuffle buffer '
                           '(default: 1000; 0: shard order only)')


def parse_args(argv=None):
    """Parse main_esvit.py's command line; with no --cfg and no --arch, the demo model and its settings
    (``args.demo_model``), on the embedded demo data unless --data_path is given (``args.demo``: that data)."""
    parser = argparse.ArgumentParser('EsViT', parents=[get_args_parser()], formatter_class=utils.HelpFormatter)
    args = parser.parse_args(argv)
    if args.cfg is None and args.arch is None:
        parser.set_defaults(**DEMO_DEFAULTS, cfg=DEMO_CFG)
        args = parser.parse_args(argv)
        args.demo_model = True
        args.demo = args.data_path is None
    if args.knn_freq is None:
        args.knn_freq = args.epochs if getattr(args, 'demo', False) else 0
    return args
