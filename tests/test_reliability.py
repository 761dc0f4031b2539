"""Bad input gives one clear line and a non-zero exit; checkpoints are atomic and never run code."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st

import utils
from engine import parse_args, train_esvit
from helpers import ROOT, command, make_config

SWIN_YAML = 'experiments/imagenet/swin/swin_tiny_patch4_window7_224.yaml'


def run_main_esvit(argv, capsys):
    """Run main_esvit as its __main__ does; returns (exit code, stderr lines)."""
    os.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        utils.run_main(train_esvit, parse_args(argv))
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def assert_one_line_error(code, err, *fragments):
    assert code not in (0, None)
    assert len(err) == 1, err
    for fragment in fragments:
        assert fragment in err[0], err[0]


@pytest.fixture
def bad_inputs(tmp_path, tiny_data):
    empty = tmp_path / 'empty'
    empty.mkdir()
    no_images = tmp_path / 'no_images' / 'class_a'
    no_images.mkdir(parents=True)
    (no_images / 'notes.txt').write_text('not an image')
    not_a_checkpoint = tmp_path / 'junk.pth'
    not_a_checkpoint.write_bytes(b'this is not a checkpoint')
    return {'empty': str(empty), 'no_images': str(tmp_path / 'no_images'), 'junk': str(not_a_checkpoint),
            'tiny': tiny_data, 'out': str(tmp_path / 'out')}


@pytest.mark.parametrize('case,flags_of,opts,fragments', [
    ('missing data path', lambda p: ['--data_path', '/nonexistent/data'], [], ['/nonexistent/data']),
    ('empty data folder', lambda p: ['--data_path', p['empty']], [], ['empty']),
    ('folder without images', lambda p: ['--data_path', p['no_images']], [], ['no_images']),
    ('unknown arch', lambda p: ['--arch', 'swin_huge_xl', '--cfg', SWIN_YAML], [], ['swin_huge_xl']),
    ('arch not matching yaml', lambda p: ['--arch', 'cvt_tiny', '--cfg', SWIN_YAML], [], ['cvt_tiny', 'swin_transformer']),
    ('arch size not matching yaml', lambda p: ['--arch', 'swin_small', '--cfg', SWIN_YAML], [], ['swin_small', 'swin_tiny']),
    ('unknown torchvision arch', lambda p: ['--arch', 'resnet9000'], [], ['resnet9000']),
    ('missing cfg file', lambda p: ['--cfg', 'experiments/nope.yaml'], [], ['experiments/nope.yaml']),
    ('unknown config key', lambda p: ['--cfg', SWIN_YAML], ['MODEL.SPEC.WINDOW_SIZ', '7'], ['MODEL.SPEC.WINDOW_SIZ']),
    ('wrongly typed value', lambda p: ['--cfg', SWIN_YAML], ['MODEL.SPEC.WINDOW_SIZE', 'seven'],
     ['MODEL.SPEC.WINDOW_SIZE', 'int']),
    ('truncated checkpoint', lambda p: ['--pretrained_weights_ckpt', p['junk']], [], ['junk.pth']),
])
def test_bad_input_is_one_line_and_nonzero_exit(case, flags_of, opts, fragments, bad_inputs, capsys):
    flags = flags_of(bad_inputs)
    if '--data_path' not in flags:
        flags += ['--data_path', bad_inputs['tiny']]
    flags += ['--output_dir', bad_inputs['out'], '--epochs', '1', '--num_workers', '0']
    argv = flags + opts if ('--cfg' in flags or '--arch' in flags) else command(*flags)  # default: the tiny Swin
    code, err = run_main_esvit(argv, capsys)
    assert_one_line_error(code, err, *fragments)


def test_checkpoint_of_another_architecture_lists_the_mismatched_keys(tiny_data, tmp_path, capsys):
    swin_out = str(tmp_path / 'swin')
    os.chdir(ROOT)
    train_esvit(parse_args(command('--data_path', tiny_data, '--output_dir', swin_out,
                                                         '--epochs', '1')))
    capsys.readouterr()
    code, err = run_main_esvit(['--arch', 'resnet18', '--data_path', tiny_data, '--output_dir', str(tmp_path / 'r'),
                                '--epochs', '1', '--num_workers', '0', '--out_dim', '256', '--batch_size_per_gpu', '8',
                                '--pretrained_weights_ckpt', os.path.join(swin_out, 'checkpoint.pth'),
                                'TRAIN.IMAGE_SIZE', '[32, 32]'], capsys)
    assert_one_line_error(code, err, 'does not match the model', 'missing keys', 'backbone.backbone.conv1.weight',
                          'unexpected keys', 'patch_embed')


def test_output_dir_not_writable(tiny_data, tmp_path, capsys):
    if os.geteuid() == 0:
        blocked = str(tmp_path / 'file_in_the_way' / 'out')
        (tmp_path / 'file_in_the_way').write_text('a file where a directory is needed')
    else:
        locked = tmp_path / 'locked'
        locked.mkdir(mode=0o500)
        blocked = str(locked / 'out')
    code, err = run_main_esvit(command('--data_path', tiny_data, '--output_dir', blocked, '--epochs', '1'), capsys)
    assert_one_line_error(code, err, 'output dir')


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / 'checkpoint.pth')
    utils.save_checkpoint({'epoch': 1, 'w': torch.ones(3)}, path)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', no_space)
    with pytest.raises(utils.UserError, match='No space left on device.*previous checkpoint is intact'):
        utils.save_checkpoint({'epoch': 2, 'w': torch.zeros(3)}, path)
    monkeypatch.undo()
    assert utils.load_checkpoint(path)['epoch'] == 1
    assert os.listdir(tmp_path) == ['checkpoint.pth']  # no temporary file left behind


class Payload:
    """Unpickling this object would run `touch <marker>`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        torch.save({'student': {'w': torch.ones(1)}, 'args': Payload(marker)}, f, pickle_protocol=2)
    with pytest.raises(utils.UserError, match='refused for safety'):
        utils.load_checkpoint(str(path))
    assert not marker.exists()
    with open(path, 'rb') as f:  # the payload is real: plain unpickling would have created the file
        assert b'system' in f.read()


def test_original_checkpoint_with_namespace_args_loads(tmp_path):
    import argparse
    path = tmp_path / 'original.pth'
    torch.save({'student': {'module.w': torch.ones(1)}, 'args': argparse.Namespace(arch='swin_tiny'), 'epoch': 3},
               path)
    ckpt = utils.load_checkpoint(str(path))
    assert ckpt['epoch'] == 3 and ckpt['args'].arch == 'swin_tiny'


# -------------------------------------------------------------------------------------------------------
# crash recovery: SIGKILL at random moments, then the same command again
# -------------------------------------------------------------------------------------------------------
def test_sigkill_at_random_moments_never_leaves_a_broken_checkpoint(tiny_data, tmp_path):
    out = str(tmp_path / 'crash')
    argv = [sys.executable, 'main_esvit.py'] + command('--data_path', tiny_data, '--output_dir', out, '--epochs', '4',
                                                       '--saveckp_freq', '0')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    rng = random.Random(0)
    for attempt in range(5):
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(3.0, 9.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for name in os.listdir(out) if os.path.isdir(out) else []:
            if name.endswith('.pth'):
                utils.load_checkpoint(os.path.join(out, name))  # every visible checkpoint is complete
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert utils.load_checkpoint(os.path.join(out, 'checkpoint.pth'))['epoch'] == 4
    with open(os.path.join(out, 'log.txt')) as f:
        epochs = [int(line.split('"epoch": ')[1].split('}')[0].split(',')[0]) for line in f]
    assert epochs == [0, 1, 2, 3]  # every epoch logged once, whatever the crashes


# -------------------------------------------------------------------------------------------------------
# trailing KEY VALUE opts: always merged or one clear ConfigError, never anything else
# -------------------------------------------------------------------------------------------------------
KEYS = ['MODEL.NUM_CLASSES', 'MODEL.SPEC.WINDOW_SIZE', 'MODEL.SPEC.DEPTHS', 'MODEL.SPEC.MLP_RATIO', 'TRAIN.LR',
        'TRAIN.IMAGE_SIZE', 'MODEL.NAME', 'AMP.ENABLED', 'MODEL.SPEC', 'MODEL', 'NOPE.KEY', 'TRAIN.LR_SCHEDULER.ARGS.x']
VALUES = st.one_of(st.sampled_from(['0', '7', '4.0', '[2, 2]', 'True', 'None', 'abc', '[', '{}', '1e-3', '',
                                    'swin_transformer', '(1, 2)']),
                   st.text(max_size=12), st.integers().map(str), st.floats(allow_nan=True).map(str))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=15)), VALUES), max_size=4))
def test_random_opts_merge_or_fail_with_one_line(pairs):
    from config import ConfigError
    opts = [x for pair in pairs for x in pair]
    try:
        config = make_config(SWIN_YAML, opts)
    except ConfigError as e:
        message = str(e)
        assert message and '\n' not in message
    else:
        assert config.is_frozen()


def test_resumed_log_drops_the_lines_of_epochs_that_run_again(tmp_path):
    lines = [json.dumps({'epoch': e, 'train_loss': 1.0}) for e in range(3)] + ['{"epoch": 3, "train_lo']
    (tmp_path / 'log.txt').write_text('\n'.join(lines) + '\n')
    utils.TrainingLog(str(tmp_path), first_epoch=2).close()
    assert [json.loads(line)['epoch'] for line in (tmp_path / 'log.txt').read_text().splitlines()] == [0, 1]
