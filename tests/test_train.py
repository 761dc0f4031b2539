"""End-to-end pretraining on CPU: training lowers the loss, checkpoints, logs, resume, torchrun."""
import os
import subprocess
import sys

import pytest
import torch

import engine.precision
import utils
from config import load_config
from engine import Trainer, build_trainer, parse_args, train_esvit
from engine.losses import DDINOLoss
from helpers import ROOT, command, read_log, run_training as run


def test_two_epochs_lower_the_loss_and_write_checkpoint_and_log(tiny_data, tmp_path):
    out = str(tmp_path / 'run')
    run(command('--data_path', tiny_data, '--output_dir', out, '--epochs', '2'))
    log = read_log(out)
    assert [entry['epoch'] for entry in log] == [0, 1]
    assert log[1]['train_loss'] < log[0]['train_loss']
    for name in ('checkpoint.pth', 'checkpoint0000.pth', 'checkpoint0001.pth', 'config.yaml'):
        assert os.path.isfile(os.path.join(out, name)), name
    assert os.listdir(os.path.join(out, 'tb'))
    ckpt = torch.load(os.path.join(out, 'checkpoint.pth'), weights_only=True)
    assert set(ckpt) == {'student', 'teacher', 'optimizer', 'epoch', 'args', 'dino_loss'}
    assert ckpt['epoch'] == 2 and isinstance(ckpt['args'], dict)
    assert all(k.startswith('module.') for k in ckpt['student'])
    assert not any(k.startswith('module.') for k in ckpt['teacher'])  # no BatchNorm: bare teacher, as the original
    assert {'center', 'center_grid'} <= set(ckpt['dino_loss'])
    assert any(k.startswith('module.head_dense.') for k in ckpt['student'])


class Killed(Exception):
    pass


def test_resume_after_epoch_one_reaches_the_same_state(tiny_data, tmp_path, monkeypatch):
    straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
    run(command('--data_path', tiny_data, '--epochs', '2', '--output_dir', straight))

    train_one_epoch = Trainer.train_one_epoch

    def killed_in_second_epoch(self, data_loader, epoch, log):
        if epoch == 1:
            raise Killed
        return train_one_epoch(self, data_loader, epoch, log)
    monkeypatch.setattr(Trainer, 'train_one_epoch', killed_in_second_epoch)
    with pytest.raises(Killed):
        run(command('--data_path', tiny_data, '--epochs', '2', '--output_dir', resumed))
    monkeypatch.undo()
    run(command('--data_path', tiny_data, '--epochs', '2', '--output_dir', resumed))  # the same command again resumes at the second epoch
    assert [entry['epoch'] for entry in read_log(resumed)] == [0, 1]
    a = torch.load(os.path.join(straight, 'checkpoint.pth'), weights_only=True)
    b = torch.load(os.path.join(resumed, 'checkpoint.pth'), weights_only=True)
    assert a['epoch'] == b['epoch'] == 2
    for part in ('student', 'teacher', 'dino_loss'):
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=1e-5, atol=1e-6, msg=f'{part} {key}')


def test_training_step_lowers_the_loss_on_a_fixed_batch(tiny_data, tmp_path):
    args = parse_args(command('--data_path', tiny_data, '--output_dir', str(tmp_path), '--epochs', '10'))
    utils.init_distributed_mode(args)
    torch.manual_seed(0)
    trainer = build_trainer(args, load_config(args), steps_per_epoch=4)
    crops = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32), torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    losses = [trainer.step(crops, epoch=1, it=4 + i) for i in range(6)]
    assert losses[-1] < losses[0]


def test_position_matching_trains_on_the_boxes_of_the_loaders_views(tiny_data, tmp_path, monkeypatch):
    seen = []
    forward = DDINOLoss.forward

    def recording(self, student_output, teacher_output, epoch, mix_targets=None, boxes=None):
        seen.append((self.region_matching, boxes, [len(student_output[0]) // len(boxes)]))  # crops per image
        return forward(self, student_output, teacher_output, epoch, mix_targets, boxes=boxes)
    monkeypatch.setattr(DDINOLoss, 'forward', recording)
    out = str(tmp_path / 'run')
    args = run(command('--data_path', tiny_data, '--output_dir', out, '--epochs', '2', '--region_matching', 'position'))
    log = read_log(out)
    assert log[1]['train_loss'] < log[0]['train_loss']
    ncrops = 2 + sum(args.local_crops_number)
    assert seen and all(matching == 'position' for matching, _, _ in seen)
    boxes = torch.cat([b for _, b, _ in seen])                          # steps*B x V x 5
    assert boxes.shape[1:] == (ncrops, 5) and all(n == [ncrops] for _, _, n in seen)
    corner, size, flipped = boxes[..., :2], boxes[..., 2:4], boxes[..., 4]
    assert (corner >= 0).all() and (size > 0).all() and (corner + size <= 1 + 1e-6).all()
    assert set(flipped.unique().tolist()) == {0.0, 1.0}
    seen.clear()  # a view-only run ignores the option (as --region_loss_weight): plain views, no region loss
    run(command('--data_path', tiny_data, '--output_dir', str(tmp_path / 'v'), '--epochs', '1',
                '--region_matching', 'position', view_only=True))
    assert not seen and read_log(str(tmp_path / 'v'))[0]['epoch'] == 0


def test_view_only_run_continues_with_region_loss(tiny_data, tmp_path):
    view_only, continued = str(tmp_path / 'v'), str(tmp_path / 'vr')
    run(command('--data_path', tiny_data, '--output_dir', view_only, '--epochs', '1', view_only=True))
    v_ckpt = torch.load(os.path.join(view_only, 'checkpoint.pth'), weights_only=True)
    assert not any('head_dense' in k for k in v_ckpt['student'])
    run(command('--data_path', tiny_data, '--output_dir', continued, '--epochs', '2',
                '--pretrained_weights_ckpt', os.path.join(view_only, 'checkpoint.pth')))
    vr_ckpt = torch.load(os.path.join(continued, 'checkpoint.pth'), weights_only=True)
    assert any('head_dense' in k for k in vr_ckpt['student']) and 'center_grid' in vr_ckpt['dino_loss']


def test_non_finite_loss_saves_state_and_exits_with_a_message(tiny_data, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / 'nan')
    original = DDINOLoss.forward
    monkeypatch.setattr(DDINOLoss, 'forward', lambda self, *a: original(self, *a) * float('nan'))
    args = parse_args(command('--data_path', tiny_data, '--output_dir', out, '--epochs', '1'))
    with pytest.raises(SystemExit) as exit_info:
        utils.run_main(train_esvit, args)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'loss is nan' in err[0] and 'checkpoint_NaN.pth' in err[0]
    assert os.path.isfile(os.path.join(out, 'checkpoint_NaN.pth'))


def test_torchrun_two_processes_on_cpu(tiny_data, tmp_path):
    out = str(tmp_path / 'ddp')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29533',
           'main_esvit.py'] + command('--data_path', tiny_data, '--output_dir', out, '--epochs', '1',
                                      '--batch_size_per_gpu', '4')
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(out)
    assert len(log) == 1 and log[0]['train_loss'] > 0
    ckpt = torch.load(os.path.join(out, 'checkpoint.pth'), weights_only=True)
    assert ckpt['args']['world_size'] == 2


def test_vis_freq_logs_an_attention_picture_to_tensorboard(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path / 'vis')
    run(command('--data_path', tiny_data, '--output_dir', out, '--epochs', '1', '--vis_freq', '1'))
    events = EventAccumulator(os.path.join(out, 'tb'))
    events.Reload()
    assert 'attention' in events.Tags()['images']
    picture = events.Images('attention')[0]
    assert picture.width > 32 and picture.height > 32


@pytest.mark.parametrize('speedup,use_fp16,expected', [
    (2.5, 'True', torch.bfloat16),   # e.g. an AMD EPYC with AVX-512-BF16
    (0.5, 'True', None),             # e.g. a Xeon without AMX: bf16 would be slower
    (2.5, 'False', None),            # mixed precision off
])
def test_precision_auto_on_cpu_follows_the_measured_bf16_speedup(monkeypatch, speedup, use_fp16, expected):
    monkeypatch.setattr(engine.precision, 'bf16_matmul_speedup', lambda: speedup)
    args = parse_args(['--use_fp16', use_fp16])
    args.device = torch.device('cpu')
    assert engine.precision.resolve_precision(args) == (expected, False)
    args.precision = 'fp32'
    assert engine.precision.resolve_precision(args) == (None, False)


def test_bf16_matmul_speedup_is_measured():
    assert 0.05 < engine.precision.bf16_matmul_speedup(n=256, reps=2) < 100
