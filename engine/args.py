"""The options of pretraining (main_esvit.py): the original's flags, their defaults, and the demo's settings."""
import argparse

import utils
from config import DEMO_CFG

# What a bare `python main_esvit.py` trains: the small Swin of the demo yaml on the embedded Fashion-MNIST subset.
# Batch 16 (lr 1e-3 x 16/256): on 2 CPU cores a step is mostly fixed cost, so smaller batches give more steps per
# minute; teacher momentum 0.98 learnt more in a few thousand steps than 0.99 or 0.97 (README, Fashion-MNIST).
DEMO_DEFAULTS = dict(arch='swin', use_dense_prediction=True, out_dim=4096, head_hidden_dim=512,
                     head_bottleneck_dim=128, local_crops_number=[4],
                     local_crops_size=[32], local_crops_scale=[0.2, 0.5], global_crops_scale=[0.5, 1.0],
                     batch_size_per_gpu=16, lr=0.001, warmup_epochs=0, momentum_teacher=0.98,
                     weight_decay=0.04, weight_decay_end=0.1, norm_last_layer=False, num_workers=2,
                     epochs=5, saveckp_freq=0)


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
    p.add_argument('--use_bn_in_head', default=False, type=utils.bool_flag)
    p.add_argument('--head_hidden_dim', default=2048, type=int, help='width of the heads\' hidden layers')
    p.add_argument('--head_bottleneck_dim', default=256, type=int,
                   help='width of the heads\' last hidden layer, before the out_dim prototypes')
    p.add_argument('--use_dense_prediction', default=False, type=utils.bool_flag,
                   help='add the region-level matching loss (EsViT V+R)')

    # teacher temperature
    p.add_argument('--warmup_teacher_temp', default=0.04, type=float)
    p.add_argument('--teacher_temp', default=0.04, type=float)
    p.add_argument('--warmup_teacher_temp_epochs', default=0, type=int)

    # optimisation
    p.add_argument('--use_fp16', default=True, type=utils.bool_flag,
                   help='mixed precision with --precision auto: fp16 + GradScaler on CUDA, bf16 on a CPU where it is faster')
    p.add_argument('--precision', default='auto', choices=['auto', 'fp32', 'bf16', 'fp16'],
                   help='auto (with --use_fp16) = fp16 on CUDA; on CPU bf16 where a bf16 matmul is at least 1.5x '
                        'as fast as float32 (measured at start), else fp32')
    p.add_argument('--weight_decay', default=0.04, type=float)
    p.add_argument('--weight_decay_end', default=0.4, type=float)
    p.add_argument('--clip_grad', default=3.0, type=float, help='gradient clipping norm, 0 disables')
    p.add_argument('--clip_mode', default='per_tensor', choices=['per_tensor', 'global'],
                   help="per_tensor clips each parameter's gradient (the original); global clips their joint norm")
    p.add_argument('--batch_size_per_gpu', default=64, type=int)
    p.add_argument('--accum_iter', default=1, type=int,
                   help='micro-batches per optimizer step (gradient accumulation): the effective batch is '
                        'batch_size_per_gpu x processes x accum_iter, and lr scales with it')
    p.add_argument('--epochs', default=100, type=int)
    p.add_argument('--freeze_last_layer', default=1, type=int,
                   help='epochs during which the last layer of the heads stays fixed')
    p.add_argument('--lr', default=0.0005, type=float, help='peak lr for a total batch of 256 (scaled linearly)')
    p.add_argument('--warmup_epochs', default=10, type=int)
    p.add_argument('--min_lr', default=1e-6, type=float)
    p.add_argument('--optimizer', default='adamw', choices=['adamw', 'sgd', 'lars'])
    p.add_argument('--fused_optimizer', default=True, type=utils.bool_flag,
                   help='fused AdamW / SGD kernels (False: the per-tensor loop)')

    # multi-crop
    p.add_argument('--global_crops_scale', type=float, nargs='+', default=(0.4, 1.))
    p.add_argument('--local_crops_number', type=int, nargs='+', default=(8,),
                   help='local crops of each size in --local_crops_size, e.g. 6 2')
    p.add_argument('--local_crops_scale', type=float, nargs='+', default=(0.05, 0.4))
    p.add_argument('--local_crops_size', type=int, nargs='+', default=(96,), help='e.g. 96 128')
    p.add_argument('--aug-opt', type=str, default='dino_aug', help='augmentation policy (dino_aug)')

    # data
    p.add_argument('--data_path', default=None, type=str,
                   help='ImageFolder root (or zip with --zip_mode); default: the embedded demo data')
    p.add_argument('--dataset', default='imagenet1k', type=str,
                   help="accepted for the original's command lines and ignored: --data_path and --zip_mode say "
                        "what the data are")
    p.add_argument('--zip_mode', default=False, type=utils.bool_flag)
    p.add_argument('--on_bad_image', default='skip', choices=['skip', 'fail'],
                   help='a corrupt image is replaced by another sample and logged (skip) or stops the run')

    # misc
    p.add_argument('--pretrained_weights_ckpt', default='', type=str,
                   help='start from this checkpoint (e.g. a view-only run continued with V+R)')
    p.add_argument('--output_dir', default='.', type=str)
    p.add_argument('--saveckp_freq', default=5, type=int, help='also keep checkpoint{epoch:04}.pth every N epochs')
    p.add_argument('--saveckp_iters', default=0, type=int,
                   help='also write checkpoint.pth every N optimizer steps inside an epoch; a resume continues '
                        'from that step (0: only at the end of each epoch)')
    p.add_argument('--seed', default=0, type=int)
    p.add_argument('--num_workers', default=10, type=int)
    p.add_argument('--nice_workers', default=True, type=utils.bool_flag,
                   help='on a CPU run, DataLoader workers at the lowest priority (nice 19), so that they do not '
                        'preempt the OpenMP threads of the step (1.5x faster demo steps on 2 cores)')
    p.add_argument('--print_freq', default=10, type=int)
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
    p.add_argument('--dist_url', default='env://', type=str)
    p.add_argument('--local_rank', '--local-rank', default=0, type=int, help='set by torch.distributed.launch')
    p.add_argument('opts', default=None, nargs=argparse.REMAINDER, help='config overrides: KEY VALUE ...')
    return p


def parse_args(argv=None):
    """Parse main_esvit.py's command line; with no --cfg, --arch or --data_path, the demo's settings."""
    parser = argparse.ArgumentParser('EsViT', parents=[get_args_parser()])
    args = parser.parse_args(argv)
    if args.cfg is None and args.arch is None and args.data_path is None:
        parser.set_defaults(**DEMO_DEFAULTS, cfg=DEMO_CFG)
        args = parser.parse_args(argv)
        args.demo = True
    if args.knn_freq is None:
        args.knn_freq = args.epochs if getattr(args, 'demo', False) else 0
    return args
