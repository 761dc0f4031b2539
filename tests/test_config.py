"""What --arch, --cfg and KEY VALUE pairs build: sized names without a yaml, size and family checks, the note on
the original's unread yaml keys, and the demo config from any working directory."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import timm
import torch

from config import ConfigError, DEMO_CFG, load_config
from helpers import ROOT
from models import build_model

SWIN_YAML = str(ROOT / 'experiments/imagenet/swin/swin_{}_patch4_window7_224.yaml')


def arch_args(arch=None, cfg=None, *opts):
    return SimpleNamespace(arch=arch, cfg=cfg, opts=list(opts))


def parameters_on_meta(build):
    with torch.device('meta'):
        return sum(p.numel() for p in build().parameters())


@pytest.mark.parametrize('arch', ['swin_tiny', 'swin_small', 'swin_base'])
def test_a_sized_arch_without_cfg_builds_that_size(arch, capsys):
    config = load_config(arch_args(arch))
    assert f"--arch {arch}: building experiments/imagenet/swin/swin_{arch[5:]}_patch4_window7_224.yaml" in \
        capsys.readouterr().out
    # timm's Swin of that size (with its 1000-class head, as the yaml's MODEL.NUM_CLASSES) is an independent count
    expected = parameters_on_meta(lambda: timm.create_model(f'{arch}_patch4_window7_224'))
    assert parameters_on_meta(lambda: build_model(config)) == expected


def test_a_yaml_of_another_size_is_a_one_line_error():
    with pytest.raises(ConfigError) as error:
        load_config(arch_args('swin_small', SWIN_YAML.format('tiny')))
    message = str(error.value)
    assert '\n' not in message and '--arch swin_small' in message and 'swin_tiny' in message
    # the command line can make it the named size
    config = load_config(arch_args('swin_small', SWIN_YAML.format('tiny'), 'MODEL.SPEC.DEPTHS', '[2, 2, 18, 2]'))
    assert list(config.MODEL.SPEC.DEPTHS) == [2, 2, 18, 2]


def test_a_size_of_ones_own_and_family_names():
    assert load_config(arch_args('swin_tiny', DEMO_CFG)).MODEL.SPEC.DIM_EMBED == 32  # the demo's small Swin
    assert load_config(arch_args('swin', DEMO_CFG)).MODEL.NAME == 'swin_transformer'
    with pytest.raises(ConfigError, match='names a family, not a size'):
        load_config(arch_args('swin'))
    with pytest.raises(ConfigError, match='is a cvt_v4_transformer model'):
        load_config(arch_args('cvt_tiny', DEMO_CFG))
    with pytest.raises(ConfigError, match="unknown --arch 'swin_huge'.*swin_small"):
        load_config(arch_args('swin_huge'))
    assert load_config(arch_args('resnet50')).MODEL.NAME == 'resnet50'


def test_unsupported_spec_values_fail_before_any_weight_is_built():
    with pytest.raises(ConfigError, match='SHIFT'):
        load_config(arch_args('cvt_tiny', None, 'MODEL.SPEC.SHIFT', '[True, False, False, False]'))


def test_the_originals_unread_keys_are_named_once(capsys):
    load_config(arch_args('swin_tiny'))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith('note:')]
    assert len(notes) == 1
    for key, flag in (('TRAIN.LR', '--lr'), ('TRAIN.BATCH_SIZE_PER_GPU', '--batch_size_per_gpu'),
                      ('TRAIN.END_EPOCH', '--epochs')):
        assert f'{key} ({flag})' in notes[0]
    load_config(arch_args('swin', DEMO_CFG))  # the project's own yamls set only what is read
    assert 'note:' not in capsys.readouterr().out


def test_the_demo_runs_from_another_working_directory(tmp_path):
    """`python <checkout>/main_esvit.py` with the demo's settings from an unrelated folder: config, demo data
    and output resolve (0 epochs: everything is built, nothing is trained)."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    done = subprocess.run([sys.executable, str(ROOT / 'main_esvit.py'), '--epochs', '0', '--output_dir', 'out',
                           '--num_workers', '0'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / 'out' / 'config.yaml').is_file()
    assert 'Data loaded: 2000 images' in done.stdout
