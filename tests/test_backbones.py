"""Every backbone family through the shared training path: V+R steps, ViL's mode switch, ResNet under DDP."""
import os
import subprocess
import sys

import pytest
import torch

import utils
from helpers import ROOT, build_trainer

# (--arch, --cfg or None, global crop size) for each family, at CPU sizes
BACKBONES = [
    ('swin', 'experiments/cpu/swin_demo.yaml', 64),
    ('cvt_tiny', 'experiments/cpu/cvt_tiny_cpu.yaml', 64),
    ('vil_2262', 'experiments/cpu/vil_tiny_cpu.yaml', 64),
    ('resnet18', None, 64),
]


@pytest.mark.parametrize('arch,cfg,size', BACKBONES, ids=[b[0] for b in BACKBONES])
def test_view_and_region_training_lowers_the_loss(arch, cfg, size, tmp_path):
    trainer = build_trainer(arch, cfg, tmp_path)
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(4, 3, size, size, generator=g) for _ in range(2)] + \
            [torch.randn(4, 3, size // 2, size // 2, generator=g) for _ in range(2)]
    losses = [trainer.step(crops, epoch=1, it=8 + i) for i in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


def test_vil_switches_to_full_attention_at_the_configured_epoch(tmp_path):
    trainer = build_trainer('vil', 'experiments/cpu/vil_tiny_cpu.yaml', tmp_path)   # MODE 1, switch 0.75
    batch = ([torch.randn(4, 3, 64, 64) for _ in range(2)] + [torch.randn(4, 3, 32, 32) for _ in range(2)], None)
    log = utils.TrainingLog(str(tmp_path), enabled=False)

    def modes(network):
        from models.vision_longformer import LongformerAttention
        return {m.mode for m in network.modules() if isinstance(m, LongformerAttention)}
    for epoch, expected in ((0, {1}), (2, {1}), (3, {0})):  # 0.75 x 4 epochs = epoch 3
        trainer.train_one_epoch([batch], epoch, log)
        assert modes(trainer.student) == modes(trainer.teacher) == expected, epoch


def test_resnet_ddp_two_processes_with_synchronised_batchnorm(tiny_data, tmp_path):
    """torchrun with 2 gloo processes: the ResNet's BatchNorms are synchronised (CPU-capable variant) and
    the checkpoint has the original's layout (teacher under `module.` as the original's DDP teacher)."""
    out = tmp_path / 'resnet_ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29541',
           'main_esvit.py', '--arch', 'resnet18', '--data_path', tiny_data, '--output_dir', str(out),
           '--epochs', '1', '--batch_size_per_gpu', '8', '--num_workers', '0', '--out_dim', '128',
           '--use_dense_prediction', 'True', '--local_crops_number', '2', '--local_crops_size', '32',
           '--print_freq', '1000', '--precision', 'fp32', 'TRAIN.IMAGE_SIZE', '[64, 64]']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert all(k.startswith('module.backbone.backbone.') or k.startswith(('module.head.', 'module.head_dense.'))
               for k in ckpt['student'])
    assert all(k.startswith('module.') for k in ckpt['teacher'])
    # the student's running statistics moved (BatchNorm in training mode, synchronised across ranks)
    assert ckpt['student']['module.backbone.backbone.bn1.num_batches_tracked'] > 0


def test_head_widths_follow_the_flags(tmp_path):
    trainer = build_trainer('swin', 'experiments/cpu/swin_demo.yaml', tmp_path,
                            ('--head_hidden_dim', '96', '--head_bottleneck_dim', '48'))
    for head in (trainer.student.head, trainer.student.head_dense, trainer.teacher.head_dense):
        linears = [m for m in head.mlp.modules() if isinstance(m, torch.nn.Linear)]
        assert [m.out_features for m in linears] == [96, 96, 48]
        assert head.last_layer.weight_v.shape == (128, 48)
