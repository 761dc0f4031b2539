"""Checkpoints in and out: the original's training checkpoints (numpy lr / weight decay, a pickled Namespace, the
scaler) load for evaluation, continuation and resume; exports load into timm and torchvision; a backbone file
initialises pretraining; nothing but the allowlist is ever unpickled."""
import argparse
import importlib.util
import math
import os
import pickle
import types
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torch.nn as nn
import torchvision

import eval_knn
import run_analysis
import utils
from analysis.run import analyze
from config import load_config
from engine import build_trainer, parse_args
from engine.loop import resume
from evaluation import build_frozen_backbone, knn, model_config, parse_eval_args
from evaluation.checkpoints import export_backbone, load_backbone_weights
from helpers import ROOT, TINY_OPTS, command
from models import build_model

CROPS = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)] + \
        [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2, 4)]
TORCH_1X_ADAMW_OPTIONS = ('lr', 'betas', 'eps', 'weight_decay', 'amsgrad', 'params')  # the original's param groups
# the tiny Swin of the tests (helpers.TINY_OPTS) as timm builds it, with EsViT's LayerNorm eps
TIMM_TINY = dict(num_classes=0, embed_dim=16, depths=(1, 1), num_heads=(1, 2), img_size=32, window_size=4,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6))


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / 'scripts' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_trainer(tmp_path, *flags, seed=0, view_only=False):
    """(trainer, args, config) of the tiny V+R run (fp32, 2 x 32 px + 2 x 16 px crops, batch 8), built as
    main_esvit.py builds it, with a CPU loss scaler standing in for the CUDA one (to restore its state)."""
    os.makedirs(tmp_path, exist_ok=True)
    args = parse_args(command('--output_dir', str(tmp_path), '--epochs', '2', *flags, view_only=view_only))
    utils.init_distributed_mode(args)
    config = load_config(args)
    torch.manual_seed(seed)
    trainer = build_trainer(args, config, steps_per_epoch=4)
    trainer.scaler = torch.amp.GradScaler('cpu', init_scale=2. ** (10 + seed))
    return trainer, args, config


def step(trainer, it):
    utils.fix_random_seeds(1000 + it)
    return trainer.step(CROPS, epoch=it // 4, it=it)


SCALAR = np.float64(0).__reduce__()[0]  # numpy's scalar constructor, numpy._core.multiarray.scalar in numpy 2


class Numpy1Pickler(pickle._Pickler):
    """Pickles numpy scalars under numpy 1.x's module name, as the original's files have them."""

    def save_global(self, obj, name=None):
        if obj is SCALAR:
            self.write(pickle.GLOBAL + b'numpy.core.multiarray\nscalar\n')
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def save_as_the_original(trainer, epoch, path, **args_changes):
    """``trainer``'s state written as the original's train_esvit writes it: numpy float64 lr and weight decay in
    the optimizer's param groups (torch 1.x options, integer steps), args as an argparse.Namespace, the loss
    scaler's state, numpy 1.x's pickle names."""
    state = trainer.state_dict(epoch)
    state['args'] = argparse.Namespace(**{**state['args'], **args_changes})
    for i, group in enumerate(state['optimizer']['param_groups']):
        for option in set(group) - set(TORCH_1X_ADAMW_OPTIONS):
            del group[option]
        group['lr'] = np.float64(group['lr'])
        if i == 0:
            group['weight_decay'] = np.float64(group['weight_decay'])
    for param_state in state['optimizer']['state'].values():
        param_state['step'] = int(param_state['step'])
    pickle_module = types.ModuleType('numpy1_pickle')
    pickle_module.Pickler = Numpy1Pickler
    torch.save(state, path, pickle_module=pickle_module)
    with open(path, 'rb') as f:
        assert b'numpy.core.multiarray' in f.read()
    return state


@pytest.fixture(scope='module')
def original(tmp_path_factory):
    """(path, trainer after a step, its state) of a tiny V+R run saved as the original saves it, whose stored
    --cfg is another machine's path."""
    folder = tmp_path_factory.mktemp('original')
    trainer, _, _ = tiny_trainer(folder)
    step(trainer, 0)
    path = str(folder / 'checkpoint0001.pth')
    state = save_as_the_original(trainer, 1, path, cfg='/home/someone/esvit/experiments/cpu/swin_demo.yaml')
    return path, trainer, state


# -------------------------------------------------------------------------------------------------------
# file-level safety
# -------------------------------------------------------------------------------------------------------
def test_original_file_loads_with_plain_numbers_and_other_numpy_objects_are_refused(original, tmp_path):
    path, _, _ = original
    content = utils.load_checkpoint(path)
    assert isinstance(content['args'], argparse.Namespace) and content['epoch'] == 1
    lr = content['optimizer']['param_groups'][0]['lr']
    assert type(lr) is float and type(content['optimizer']['param_groups'][0]['weight_decay']) is float
    assert set(content) == {'student', 'teacher', 'optimizer', 'epoch', 'args', 'dino_loss', 'fp16_scaler'}
    with pytest.raises(Exception, match='Unsupported global'):  # plain weights_only refuses the original's file
        torch.load(path, weights_only=True)
    torch.save({'student': {}, 'bank': np.zeros(3)}, tmp_path / 'array.pth')  # an array is not on the allowlist
    with pytest.raises(utils.UserError, match=r'\(numpy\._core\.multiarray\._reconstruct\), refused for safety'):
        utils.load_checkpoint(str(tmp_path / 'array.pth'))


class Payload:
    """Unpickling this object would run `touch <marker>`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def test_a_malicious_pickle_is_refused_by_every_loader(tmp_path, original, capsys):
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth'
    _, trainer, state = original
    torch.save({**state, 'args': Payload(marker)}, evil)  # a real training checkpoint with a payload in args
    evil_run = tmp_path / 'run'
    evil_run.mkdir()
    (evil_run / 'checkpoint.pth').write_bytes(evil.read_bytes())
    resume_args = parse_args(command('--output_dir', str(evil_run)))
    continuation_args = parse_args(command('--output_dir', str(tmp_path / 'new'), '--pretrained_weights_ckpt', str(evil)))
    config = load_config(resume_args)
    pretrained_config = load_config(parse_args(command('MODEL.PRETRAINED', str(evil))))
    new_args = parse_args(command('--output_dir', str(tmp_path / 'new')))
    eval_args = parse_eval_args(eval_knn.get_args_parser(), ['--pretrained_weights', str(evil)])
    export = load_script('export_backbone')
    inspect = load_script('inspect_checkpoint')
    loaders = {
        'utils.load_checkpoint': lambda: utils.load_checkpoint(str(evil)),
        'memory-mapped': lambda: utils.load_checkpoint(str(evil), mmap=True),
        'evaluation backbone': lambda: build_frozen_backbone(config, str(evil)),
        'model of the checkpoint': lambda: model_config(eval_args),
        'resume': lambda: resume(trainer, resume_args, config),
        '--pretrained_weights_ckpt': lambda: resume(trainer, continuation_args, config),
        'MODEL.PRETRAINED': lambda: resume(trainer, new_args, pretrained_config),
        'export_backbone.py': lambda: export.main(export.get_args_parser().parse_args(
            ['--pretrained_weights', str(evil), '--output', str(tmp_path / 'out.pth')])),
        'inspect_checkpoint.py': lambda: inspect.main(inspect.get_args_parser().parse_args([str(evil)])),
    }
    for name, load in loaders.items():
        with pytest.raises(utils.UserError, match='refused for safety'):
            load()
        assert not marker.exists(), name
    assert not os.path.exists(tmp_path / 'out.pth')


# -------------------------------------------------------------------------------------------------------
# the original's checkpoint: resume, continue, evaluate, inspect
# -------------------------------------------------------------------------------------------------------
def test_resuming_the_originals_checkpoint_gives_the_uninterrupted_runs_next_steps(original, tmp_path, capsys):
    path, _, _ = original
    uninterrupted, _, _ = tiny_trainer(tmp_path / 'straight')
    losses = [step(uninterrupted, it) for it in range(2)]

    run_dir = tmp_path / 'resumed'
    resumed, args, config = tiny_trainer(run_dir, seed=1)  # other initial weights and loss scale
    run_dir.joinpath('checkpoint.pth').write_bytes(open(path, 'rb').read())  # "copy it into --output_dir, rerun"
    assert resume(resumed, args, config) == (1, 0)
    assert 'Resumed from' in capsys.readouterr().out
    groups = resumed.optimizer.param_groups
    assert type(groups[0]['lr']) is float and type(groups[0]['weight_decay']) is float
    assert groups[0]['fused'] == uninterrupted.optimizer.param_groups[0]['fused']  # this run's option kept
    assert resumed.scaler.get_scale() == uninterrupted.scaler.get_scale() == 2. ** 10
    assert step(resumed, 1) == pytest.approx(losses[1], rel=1e-6, abs=0)  # the loss of the restored state
    for name in ('student', 'teacher'):  # after an update with the restored Adam moments, lr, momentum and scale
        ours, theirs = getattr(resumed, name).state_dict(), getattr(uninterrupted, name).state_dict()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=f'{name} {key}')
    torch.testing.assert_close(resumed.loss_fn.center_grid, uninterrupted.loss_fn.center_grid)


def test_a_view_only_original_checkpoint_continues_with_the_region_loss(tmp_path, capsys):
    view_only, _, _ = tiny_trainer(tmp_path / 'v', view_only=True)
    step(view_only, 0)
    path = str(tmp_path / 'checkpoint0200.pth')
    save_as_the_original(view_only, 1, path)
    continued, args, config = tiny_trainer(tmp_path / 'vr', '--pretrained_weights_ckpt', path)
    fresh_dense_head = {k: v.clone() for k, v in continued.student.head_dense.state_dict().items()}
    assert resume(continued, args, config) == (0, 0)
    for name in ('student', 'teacher'):
        expected = getattr(view_only, name).state_dict()
        for key, value in getattr(continued, name).state_dict().items():
            if not key.startswith('head_dense.'):
                torch.testing.assert_close(value, expected[key], msg=key)
    for key, value in continued.student.head_dense.state_dict().items():
        torch.testing.assert_close(value, fresh_dense_head[key])
    torch.testing.assert_close(continued.loss_fn.center, view_only.loss_fn.center)
    assert not continued.optimizer.state  # rebuilt for the new parameters
    assert math.isfinite(step(continued, 0))


def test_evaluating_the_originals_checkpoint_needs_no_architecture(original, tiny_data, tmp_path, capsys,
                                                                   monkeypatch):
    """k-NN features of the original-layout file with the model from its stored Namespace (whose yaml path is of
    another machine) equal those of this project's file of the same state with --arch / --cfg; the analysis
    runs on it as well; an --arch that disagrees with it is a one-line error."""
    monkeypatch.chdir(ROOT)
    path, trainer, _ = original
    ours = str(tmp_path / 'ours.pth')
    utils.save_checkpoint(trainer.state_dict(1), ours)
    data = tmp_path / 'data'
    data.mkdir()
    for split in ('train', 'val'):
        os.symlink(tiny_data, data / split)
    common = ['--data_path', str(data), '--image_size', '32', '--nb_knn', '1', '--num_workers', '0']
    features = {}
    for name, flags in (('original', ['--pretrained_weights', path]),
                        ('ours', ['--pretrained_weights', ours, '--cfg', 'experiments/cpu/swin_demo.yaml', *TINY_OPTS])):
        knn.eval_knn(parse_eval_args(eval_knn.get_args_parser(), common + ['--dump_features', str(tmp_path / name)]
                                     + flags))
        features[name] = utils.load_checkpoint(str(tmp_path / name / 'trainfeat.pth'))
    out = capsys.readouterr().out
    assert f"Model of {path} from its stored arguments; its yaml /home/someone/esvit/experiments/cpu/swin_demo.yaml " \
           f"is not here, experiments/cpu/swin_demo.yaml is used: --arch swin --cfg experiments/cpu/swin_demo.yaml " \
           f"{' '.join(TINY_OPTS)}" in out
    assert torch.equal(features['original'], features['ours'])

    image = sorted(Path(tiny_data).rglob('*.png'))[0]
    analyze(run_analysis.parse_args(['--pretrained_weights', path, '--image_path', str(image), '--image_size', '32',
                                     '--output_dir', str(tmp_path / 'analysis'), '--vis_attention', 'True']))
    assert f"Model of {path} from its stored arguments" in capsys.readouterr().out
    assert (tmp_path / 'analysis' / image.stem / 'index.html').is_file()

    wrong = parse_eval_args(eval_knn.get_args_parser(), common + ['--pretrained_weights', path, '--arch', 'swin_tiny'])
    with pytest.raises(SystemExit) as exit_info:
        utils.run_main(knn.eval_knn, wrong)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert 'another model than' in err[0] and 'MODEL.SPEC.DEPTHS [2, 2, 6, 2] here, [1, 1] there' in err[0]


def test_inspect_names_the_layout_the_model_and_the_parts(original, monkeypatch):
    monkeypatch.chdir(ROOT)
    path, trainer, _ = original
    inspect = load_script('inspect_checkpoint')
    lines = inspect.inspect(path)
    assert lines[0].startswith(f"{path}: the original's training checkpoint, epochs done: 1, ")
    assert lines[1].startswith('  model: --arch swin --cfg experiments/cpu/swin_demo.yaml MODEL.SPEC.DEPTHS')
    backbone = sum(p.numel() for p in trainer.teacher.backbone.parameters()) / 1e6
    head = sum(p.numel() for p in trainer.teacher.head.parameters()) / 1e6
    assert f"  teacher: backbone {backbone:.2f}M, head {head:.2f}M, head_dense {head:.2f}M" in lines
    assert any(line.startswith('  args: use_dense_prediction True, out_dim 256') for line in lines)
    assert any(line.startswith('  loss state: center 1x256, center_grid 1x256, fp16 loss scale 1024.0') for line in lines)
    assert len(lines) <= 10


# -------------------------------------------------------------------------------------------------------
# export
# -------------------------------------------------------------------------------------------------------
def test_the_originals_checkpoint_exports_to_timm(original, tmp_path, capsys):
    path, trainer, _ = original
    export = load_script('export_backbone')
    output = tmp_path / 'export' / 'swin.safetensors'
    export.main(export.get_args_parser().parse_args(['--pretrained_weights', path, '--output', str(output)]))
    assert 'in timm keys' in capsys.readouterr().out
    twin = timm.create_model('swin_tiny_patch4_window7_224', **TIMM_TINY).eval()
    twin.load_state_dict(safetensors.torch.load_file(output), strict=True)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = trainer.teacher.backbone.eval().forward_features(images)[0]
        torch.testing.assert_close(twin(images), expected, rtol=1e-5, atol=1e-6)
    assert (tmp_path / 'export' / 'config.yaml').is_file()


def test_swin_tiny_exports_to_timm_and_resnet50_to_torchvision(tmp_path, capsys):
    """Full-size round trips: timm's swin_tiny_patch4_window7_224 and torchvision's resnet50 load the exported
    files strictly (the ResNet without its fc) and give this project's pooled features."""
    export = load_script('export_backbone')
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for arch, fmt, output in (('swin_tiny', 'timm', 'swin_tiny.safetensors'), ('resnet50', 'torchvision', 'r50.pth')):
        torch.manual_seed(0)
        config = load_config(argparse.Namespace(arch=arch, cfg=None, opts=['MODEL.NUM_CLASSES', '0']))
        backbone = build_model(config, is_teacher=True).eval()
        with torch.no_grad():
            for p in backbone.parameters():  # away from the init, so that every tensor matters
                p.add_(torch.randn_like(p) * 0.02)
        source = tmp_path / f'{arch}.pth'
        torch.save({'teacher': backbone.state_dict()}, source)
        export.main(export.get_args_parser().parse_args(
            ['--pretrained_weights', str(source), '--arch', arch, '--format', fmt, '--verify', 'False',
             '--output', str(tmp_path / arch / output), 'MODEL.NUM_CLASSES', '0']))
        with torch.no_grad():
            expected = backbone.forward_features(images)[0]
        if arch == 'swin_tiny':
            model = timm.create_model('swin_tiny_patch4_window7_224', num_classes=0).eval()
            model.load_state_dict(safetensors.torch.load_file(tmp_path / arch / output), strict=True)
            for eps, tolerance in ((1e-5, 5e-5), (1e-6, 2e-6)):  # timm's LayerNorm eps, then EsViT's
                for module in model.modules():
                    if isinstance(module, nn.LayerNorm):
                        module.eps = eps
                with torch.no_grad():
                    assert ((model(images) - expected).norm() / expected.norm()).item() < tolerance
        else:
            weights = torch.load(tmp_path / arch / output, weights_only=True)
            model = torchvision.models.resnet50().eval()
            result = model.load_state_dict(weights, strict=False)
            assert result.missing_keys == ['fc.weight', 'fc.bias'] and not result.unexpected_keys
            model.fc = nn.Identity()
            with torch.no_grad():
                torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
    out = capsys.readouterr().out
    assert "model = timm.create_model('swin_tiny_patch4_window7_224', num_classes=0, norm_layer=" in out
    assert "torchvision.models.resnet50(); model.fc = torch.nn.Identity()" in out


def test_cvt_exports_a_bare_state_dict_with_its_config_and_refuses_timm(tmp_path):
    config = load_config(argparse.Namespace(arch=None, cfg=str(ROOT / 'experiments/cpu/cvt_tiny_cpu.yaml'), opts=[]))
    backbone = build_model(config, is_teacher=True).eval()
    with pytest.raises(utils.UserError, match='has no timm twin'):
        export_backbone(backbone, config, 'timm', str(tmp_path / 'cvt.safetensors'))
    assert not os.listdir(tmp_path)
    export_backbone(backbone, config, 'state_dict', str(tmp_path / 'cvt.safetensors'))
    rebuilt_config = load_config(argparse.Namespace(arch=None, cfg=str(tmp_path / 'config.yaml'), opts=[]))
    rebuilt = build_model(rebuilt_config, is_teacher=True).eval()
    load_backbone_weights(rebuilt, str(tmp_path / 'cvt.safetensors'))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.forward_features(images)[0], backbone.forward_features(images)[0])
    other = load_config(argparse.Namespace(arch=None, cfg=str(ROOT / 'experiments/cpu/swin_demo.yaml'), opts=[]))
    with pytest.raises(utils.UserError, match='describes another model'):
        export_backbone(build_model(other), other, 'state_dict', str(tmp_path / 'swin.pth'))


# -------------------------------------------------------------------------------------------------------
# pretraining from a backbone file
# -------------------------------------------------------------------------------------------------------
def test_pretraining_starts_from_a_timm_swin_file_with_fresh_heads(tmp_path, capsys):
    torch.manual_seed(5)
    supervised = timm.create_model('swin_tiny_patch4_window7_224', **{**TIMM_TINY, 'num_classes': 10}).eval()
    path = str(tmp_path / 'timm_swin.safetensors')
    safetensors.torch.save_file(supervised.state_dict(), path)  # timm's own keys, with its classifier head.fc
    plain, _, _ = tiny_trainer(tmp_path / 'plain')
    trainer, args, config = tiny_trainer(tmp_path / 'run', 'MODEL.PRETRAINED', path)
    assert resume(trainer, args, config) == (0, 0)
    assert f"backbones from MODEL.PRETRAINED {path} (timm keys" in capsys.readouterr().out
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = supervised.forward_head(supervised.forward_features(images), pre_logits=True)
        for network in (trainer.student, trainer.teacher):
            torch.testing.assert_close(network.backbone.eval().forward_features(images)[0], expected,
                                       rtol=1e-5, atol=1e-6)
    for key, value in trainer.student.head.state_dict().items():  # the heads are those of a run without it
        torch.testing.assert_close(value, plain.student.head.state_dict()[key])
    layers = parse_args(command('MODEL.PRETRAINED', path, 'MODEL.PRETRAINED_LAYERS', "['layers']"))
    with pytest.raises(utils.UserError, match=r"PRETRAINED_LAYERS \['layers'\]: only \['\*'\]"):
        resume(trainer, layers, load_config(layers))


def test_a_vit_checkpoint_evaluates_with_its_own_patch_size(tmp_path, capsys):
    """A ViT's patch is an argument, not a config key: evaluation without --arch takes it from the checkpoint
    (its default --patch_size 16 would build another model)."""
    vit = ['--arch', 'deit_tiny', '--patch_size', '8', '--use_dense_prediction', 'True', '--out_dim', '64',
           '--output_dir', str(tmp_path), 'MODEL.SPEC.EMBED_DIM', '24', 'MODEL.SPEC.DEPTH', '1',
           'MODEL.SPEC.NUM_HEADS', '2']
    args = parse_args(vit)
    utils.init_distributed_mode(args)
    trainer = build_trainer(args, load_config(args), steps_per_epoch=1)
    path = trainer.save(1)
    eval_args = parse_eval_args(eval_knn.get_args_parser(), ['--pretrained_weights', path, '--data_path', 'x'])
    assert eval_args.patch_size == 16
    config = model_config(eval_args)
    assert config.MODEL.SPEC.PATCH_SIZE == 8 and config.MODEL.SPEC.EMBED_DIM == 24
    backbone = build_frozen_backbone(config, path)
    torch.testing.assert_close(backbone.state_dict(), trainer.teacher.backbone.state_dict(), rtol=0, atol=0)
