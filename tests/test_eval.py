"""Evaluation: weighted k-NN, feature extraction across processes, linear probe, pretrained-weight loading,
eval_knn.py / eval_linear.py end to end, and the online k-NN of pretraining."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import eval_knn
import eval_linear
import utils
from config import load_config
from engine import build_student_teacher, parse_args, train_esvit
from evaluation import knn, linear, parse_eval_args
from evaluation.backbone import build_frozen_backbone, load_pretrained_backbone
from evaluation.checkpoints import backbone_state_dict
from helpers import ROOT, TINY_MODEL, TINY_OPTS, make_config
from models import build_model
TRAIN_PER_CLASS, VAL_PER_CLASS = (7, 7, 7, 6), (3, 3, 3, 2)  # odd totals: DistributedSampler pads the shards


def tiny_config():
    return make_config('experiments/cpu/swin_demo.yaml', TINY_OPTS)


def eval_command(*flags, data=None, weights=None):
    """Flags of a tiny evaluation run (the config overrides come last)."""
    common = ['--image_size', '32', '--num_workers', '0', '--batch_size_per_gpu', '4']
    if data:
        common += ['--data_path', data]
    if weights:
        common += ['--pretrained_weights', weights]
    return TINY_MODEL + common + list(flags) + TINY_OPTS


def linear_command(*flags, **kwargs):
    """eval_command for eval_linear.py: the tiny Swin has 2 blocks, so --n_last_blocks 2."""
    return eval_command('--n_last_blocks', '2', *flags, **kwargs)


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    """train/ (27 images) and val/ (11 images) of 4 classes, real Fashion-MNIST from the demo data."""
    from datasets import demo_data_path
    root = tmp_path_factory.mktemp('eval_data')
    for split, counts in (('train', TRAIN_PER_CLASS), ('val', VAL_PER_CLASS)):
        source = demo_data_path(split)
        for cls, count in zip(sorted(os.listdir(source))[:4], counts):
            os.makedirs(root / split / cls)
            for name in sorted(os.listdir(source / cls))[:count]:
                shutil.copy(source / cls / name, root / split / cls / name)
    return str(root)


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised tiny model saved in the original layout (student under module., with heads)."""
    torch.manual_seed(3)
    args = parse_args(TINY_MODEL + ['--out_dim', '64', '--use_dense_prediction', 'True'] + TINY_OPTS)
    args.device = torch.device('cpu')
    student, teacher = build_student_teacher(args, load_config(args))
    path = tmp_path_factory.mktemp('ckpt') / 'checkpoint.pth'
    torch.save({'student': {f'module.{k}': v for k, v in student.state_dict().items()},
                'teacher': teacher.state_dict(), 'epoch': 1}, path)
    return str(path), teacher.backbone.state_dict()


def run_script(script, argv, nproc=1, port=29541):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ['-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={port}']
    return subprocess.run(launcher + [script] + argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


# ---------------------------------------------------------------------------------------------------------
# k-NN
# ---------------------------------------------------------------------------------------------------------
def unit(degrees):
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_weighted_vote_matches_a_hand_computation():
    # bank on the unit circle: class 0 at 0 deg, class 1 at 10 and 12 deg, class 2 at 90 deg
    train = torch.tensor([unit(0), unit(10), unit(12), unit(90)])
    train_labels = torch.tensor([0, 1, 1, 2])
    test = torch.tensor([unit(3)])
    similarities = [math.cos(math.radians(a)) for a in (3, 7, 9)]  # the 3 nearest: classes 0, 1, 1
    for T in (0.07, 0.01, 0.005):  # exp(1 / 0.005) overflows float32: the scores must not
        score_0 = math.exp(similarities[0] / T)
        score_1 = math.exp(similarities[1] / T) + math.exp(similarities[2] / T)
        expected = 0 if score_0 > score_1 else 1
        for label in (0, 1):
            top1, top5 = knn.knn_classifier(train, train_labels, test, torch.tensor([label]), k=3, T=T,
                                                 num_classes=3)
            assert top1 == (100.0 if label == expected else 0.0) and top5 == 100.0
    # the weighting matters: two slightly farther neighbours outvote the nearest at T=0.07, not at T=0.01
    assert knn.knn_classifier(train, train_labels, test, torch.tensor([1]), 3, 0.07, 3)[0] == 100.0
    assert knn.knn_classifier(train, train_labels, test, torch.tensor([0]), 3, 0.01, 3)[0] == 100.0
    assert knn.knn_classifier(train, train_labels, test, torch.tensor([0]), 1, 0.07, 3)[0] == 100.0


def test_top5_counts_the_five_best_classes():
    # 6 neighbours of 6 classes at decreasing similarity: the 5th-ranked class is a top-5 hit, the 6th not
    train = torch.tensor([unit(a) for a in (1, 2, 3, 4, 5, 6)])
    test = torch.tensor([unit(0), unit(0)])
    top1, top5 = knn.knn_classifier(train, torch.arange(6), test, torch.tensor([4, 5]), 6, 0.07, 6)
    assert (top1, top5) == (0.0, 50.0)


def naive_knn(train, train_labels, test, test_labels, k, T, num_classes):
    hits = 0
    for x, y in zip(test.tolist(), test_labels.tolist()):
        sims = sorted(((sum(a * b for a, b in zip(x, t)), label) for t, label in
                       zip(train.tolist(), train_labels.tolist())), reverse=True)[:k]
        scores = [sum(math.exp(s / T) for s, label in sims if label == c) for c in range(num_classes)]
        hits += max(range(num_classes), key=scores.__getitem__) == y
    return 100.0 * hits / len(test_labels)


def test_chunked_knn_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(60, 8, generator=g), dim=1)
    test = F.normalize(torch.randn(25, 8, generator=g), dim=1)
    train_labels, test_labels = torch.randint(0, 4, (60,), generator=g), torch.randint(0, 4, (25,), generator=g)
    results = knn.knn_accuracies(train, train_labels, test, test_labels, [1, 5, 20], 0.1, 4,
                                      chunk_elements=7 * 60)  # 7 test rows per chunk
    for k in (1, 5, 20):
        assert results[k][0] == pytest.approx(naive_knn(train, train_labels, test, test_labels, k, 0.1, 4))
    assert results == knn.knn_accuracies(train, train_labels, test, test_labels, [1, 5, 20], 0.1, 4)
    with pytest.raises(ValueError):
        knn.knn_accuracies(train, train_labels, test, test_labels, [61], 0.1, 4)


# ---------------------------------------------------------------------------------------------------------
# loading pretrained weights
# ---------------------------------------------------------------------------------------------------------
MANIFEST_MODELS = {  # reference manifest -> (yaml, opts) of the same model here
    'swin_tiny_w7': ('experiments/imagenet/swin/swin_tiny_patch4_window7_224.yaml', []),
    'cvt_tiny': ('experiments/imagenet/cvt_v4/s1.yaml', []),
    'vil_2262': ('experiments/imagenet/vil/vil_2262.yaml', []),
    'resnet50': (None, ['MODEL.NAME', 'resnet50']),
}


def meta_backbone(name):
    cfg, opts = MANIFEST_MODELS[name]
    with torch.device('meta'):
        return build_model(make_config(cfg, opts + ['MODEL.NUM_CLASSES', '0']), is_teacher=True)


def meta_state_dict(key_shapes):
    with torch.device('meta'):
        return {key: torch.empty(shape) for key, shape in key_shapes}


@pytest.mark.parametrize('name', list(MANIFEST_MODELS))
@pytest.mark.parametrize('entry', ['state_dict', 'teacher_state_dict'])
def test_original_checkpoint_layout_loads_completely(reference, name, entry):
    manifest = reference(f'state_dict_{name}.json')
    backbone = meta_backbone(name)
    weights = backbone_state_dict(meta_state_dict(manifest[entry]), set(backbone.state_dict()))
    assert list(weights) == list(backbone.state_dict())
    utils.load_state_dict_checked(backbone, weights, name)


def test_wrong_architecture_fails_with_the_key_list(reference):
    backbone = meta_backbone('swin_tiny_w7')
    for other, named_key in (('swin_small_w7', 'layers.2.blocks.6.'), ('cvt_tiny', 'patch_embed.proj.weight')):
        weights = backbone_state_dict(meta_state_dict(reference(f'state_dict_{other}.json')['state_dict']),
                                      set(backbone.state_dict()))
        with pytest.raises(utils.UserError, match='does not match the model') as error:
            utils.load_state_dict_checked(backbone, weights, other)
        assert named_key in str(error.value)


def test_released_layout_reproduces_the_original_outputs(reference, tmp_path):
    """The fidelity weights saved as an original checkpoint (teacher bare, student under module. with heads)
    load into the frozen backbone, which then gives the original's outputs."""
    fidelity, data = reference('fidelity_swin_tiny.json'), reference('fidelity_swin_tiny.pt')
    weights = data['state_dict']
    heads = {'head.last_layer.weight_v': torch.zeros(4, 3), 'head_dense.mlp.0.bias': torch.zeros(3)}
    path = tmp_path / 'released.pth'
    torch.save({'teacher': weights, 'student': {f'module.{k}': v for k, v in {**weights, **heads}.items()}}, path)
    config = make_config(fidelity['cfg'], fidelity['opts'])
    for key in ('teacher', 'student'):
        backbone = build_frozen_backbone(config, str(path), key)
        assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
        pooled = backbone.forward_features(data['x224'])[0]
        torch.testing.assert_close(pooled, data['out224_pooled'], rtol=1e-5, atol=1e-5)


def test_bare_and_dino_style_files_load_and_bad_keys_fail(tiny_checkpoint, tmp_path):
    _, expected = tiny_checkpoint
    for name, content in (('bare.pth', expected),
                          ('dino.pth', {'teacher': {f'backbone.{k}': v for k, v in expected.items()}})):
        torch.save(content, tmp_path / name)
        backbone = build_model(tiny_config(), is_teacher=True)
        load_pretrained_backbone(backbone, str(tmp_path / name))
        for key, value in backbone.state_dict().items():
            torch.testing.assert_close(value, expected[key])

    torch.save({'model': expected, 'epoch': 3}, tmp_path / 'other.pth')
    with pytest.raises(utils.UserError, match="no 'teacher' entry"):
        load_pretrained_backbone(build_model(tiny_config()), str(tmp_path / 'other.pth'))
    partial = {k: v for k, v in expected.items() if 'layers.1' not in k}
    torch.save({'teacher': partial}, tmp_path / 'partial.pth')
    with pytest.raises(utils.UserError, match=r'missing keys: layers\.1\.'):
        load_pretrained_backbone(build_model(tiny_config()), str(tmp_path / 'partial.pth'))


def test_random_init_warns(capsys):
    build_frozen_backbone(tiny_config())
    assert 'randomly initialised' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# the scripts
# ---------------------------------------------------------------------------------------------------------
def test_eval_knn_gives_the_same_features_with_one_and_two_processes(tiny_data, tiny_checkpoint, tmp_path):
    weights, _ = tiny_checkpoint
    def command(nproc):
        return eval_command('--nb_knn', '1', '5', '--dump_features', str(tmp_path / f'features{nproc}'),
                            data=tiny_data, weights=weights)
    result = run_script('eval_knn.py', command(2), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'top-1' in result.stdout
    knn.eval_knn(parse_eval_args(eval_knn.get_args_parser(), command(1)))
    runs = {}
    for nproc in (1, 2):
        dump = tmp_path / f'features{nproc}'
        runs[nproc] = {name: torch.load(dump / file, weights_only=True)
                       for name, file in knn.FEATURE_FILES.items()}
        runs[nproc]['knn'] = json.loads((dump / 'knn.json').read_text())['knn']
    one, two = runs[1], runs[2]
    assert one['train_features'].shape == (sum(TRAIN_PER_CLASS), 32)
    torch.testing.assert_close(one['train_features'].norm(dim=1), torch.ones(sum(TRAIN_PER_CLASS)))
    expected_labels = torch.repeat_interleave(torch.arange(4), torch.tensor(TRAIN_PER_CLASS))
    assert torch.equal(one['train_labels'], expected_labels) and torch.equal(two['train_labels'], expected_labels)
    for name in ('train_features', 'test_features'):
        torch.testing.assert_close(one[name], two[name], rtol=1e-5, atol=1e-6)
    assert torch.equal(one['test_labels'], two['test_labels'])
    assert one['knn'] == two['knn'] and set(one['knn']) == {'1', '5'}

    # the saved features evaluate again without a model
    args = parse_eval_args(eval_knn.get_args_parser(), ['--load_features', str(tmp_path / 'features1'),
                                                            '--nb_knn', '1', '5', '--arch', 'swin_tiny'])
    accuracies = knn.eval_knn(args)
    assert {str(k): {'top1': t1, 'top5': t5} for k, (t1, t5) in accuracies.items()} == one['knn']


def test_corrupt_checkpoint_is_a_one_line_error(tiny_data, tiny_checkpoint, tmp_path, capsys):
    weights, _ = tiny_checkpoint
    truncated, garbage = tmp_path / 'truncated.pth', tmp_path / 'garbage.pth'
    content = open(weights, 'rb').read()
    truncated.write_bytes(content[:len(content) // 2])
    garbage.write_bytes(b'not a checkpoint at all')
    result = run_script('eval_knn.py', eval_command(data=tiny_data, weights=str(truncated)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: cannot read checkpoint') and str(truncated) in lines[0]

    args = parse_eval_args(eval_linear.get_args_parser(), linear_command(
        '--output_dir', str(tmp_path), data=tiny_data, weights=str(garbage)))
    with pytest.raises(SystemExit) as exit_info:
        utils.run_main(linear.eval_linear, args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and str(garbage) in lines[0]


def read_log(output_dir):
    return [json.loads(line) for line in (output_dir / 'log.txt').read_text().splitlines()]


def test_eval_linear_trains_validates_resumes_and_evaluates(tiny_data, tiny_checkpoint, tmp_path):
    weights, _ = tiny_checkpoint
    out = tmp_path / 'linear'
    result = run_script('eval_linear.py', linear_command('--output_dir', str(out), '--epochs', '2', '--lr', '1.0',
                                                       data=tiny_data, weights=weights))
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Best top-1 accuracy on val' in result.stdout
    log = read_log(out)
    assert [entry['epoch'] for entry in log] == [0, 1] and all('test_acc1' in entry for entry in log)
    assert os.listdir(out / 'tb')
    saved = torch.load(out / linear.CHECKPOINT_NAME, weights_only=True)
    assert saved['epoch'] == 2 and saved['best_acc'] == max(entry['test_acc1'] for entry in log)
    assert saved['state_dict']['linear.weight'].shape == (4, 16 + 32)  # both blocks of the tiny Swin (of 4)

    # the same command with more epochs goes on from epoch 2; --evaluate reproduces the last validation
    stats = linear.eval_linear(parse_eval_args(eval_linear.get_args_parser(), linear_command(
        '--output_dir', str(out), '--epochs', '3', '--lr', '1.0', '--val_freq', '5', data=tiny_data, weights=weights)))
    log = read_log(out)
    assert [entry['epoch'] for entry in log] == [0, 1, 2] and 'test_acc1' in log[2]
    assert stats['best_acc'] == max(entry['test_acc1'] for entry in log)
    evaluated = linear.eval_linear(parse_eval_args(eval_linear.get_args_parser(), linear_command(
        '--output_dir', str(out), '--evaluate', data=tiny_data, weights=weights)))
    assert evaluated['acc1'] == pytest.approx(log[2]['test_acc1'])


def test_cached_features_probe_matches_its_validation(tiny_data, tiny_checkpoint, tmp_path):
    weights, _ = tiny_checkpoint
    out = tmp_path / 'cached'
    args = parse_eval_args(eval_linear.get_args_parser(), linear_command(
        '--output_dir', str(out), '--epochs', '3', '--lr', '1.0', '--cache_features', 'True',
        data=tiny_data, weights=weights))
    linear.eval_linear(args)
    log = read_log(out)
    assert len(log) == 3 and log[-1]['train_loss'] < log[0]['train_loss']
    # the classifier trained on cached features gives the same accuracy when the backbone runs on images
    evaluated = linear.eval_linear(parse_eval_args(eval_linear.get_args_parser(), linear_command(
        '--output_dir', str(out), '--evaluate', data=tiny_data, weights=weights)))
    assert evaluated['acc1'] == pytest.approx(log[-1]['test_acc1'])


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(5, 32, generator=g)
    labels = torch.arange(5).repeat(80)
    features = centers[labels] + torch.randn(len(labels), 32, generator=g)
    train, test = slice(0, 300), slice(300, 400)
    classifier = linear.LinearClassifier(32, 5)
    optimizer = torch.optim.SGD(classifier.parameters(), 0.01, momentum=0.9)
    batches = linear.CachedFeatureBatches(features[train], labels[train], batch_size=32)
    for epoch in range(10):
        batches.set_epoch(epoch)
        linear.train_one_epoch(classifier, torch.nn.Identity(), optimizer, batches, epoch,
                                    torch.device('cpu'), print_freq=100)
    with torch.no_grad():
        stats = linear.accuracy_stats(classifier(features[test]), labels[test])
    assert stats['acc1'] > 95 and stats['acc5'] == 100.0


def test_bad_n_last_blocks_is_a_user_error(tiny_data, tmp_path):
    args = parse_eval_args(eval_linear.get_args_parser(), linear_command(
        '--output_dir', str(tmp_path), '--n_last_blocks', '0', data=tiny_data))
    with pytest.raises(utils.UserError):
        linear.eval_linear(args)


# ---------------------------------------------------------------------------------------------------------
# online k-NN during pretraining
# ---------------------------------------------------------------------------------------------------------
def test_knn_freq_defaults_to_the_last_epoch_of_the_demo_only():
    assert parse_args(['--epochs', '3']).knn_freq == 3
    assert parse_args(['--data_path', 'x']).knn_freq == 0
    assert parse_args(['--data_path', 'x', '--knn_freq', '2']).knn_freq == 2


def test_pretraining_logs_online_knn(tiny_data, tmp_path):
    out = tmp_path / 'pretrain'
    os.chdir(ROOT)
    args = parse_args(TINY_MODEL + [
        '--data_path', os.path.join(tiny_data, 'train'), '--output_dir', str(out), '--epochs', '3',
        '--knn_freq', '2', '--knn_data_path', tiny_data, '--batch_size_per_gpu', '8', '--num_workers', '0',
        '--out_dim', '64', '--local_crops_number', '2', '--local_crops_size', '16', '--saveckp_freq', '0',
        '--print_freq', '100'] + TINY_OPTS)
    train_esvit(args)
    log = read_log(out)
    assert ['knn_top1' in entry for entry in log] == [False, True, True]  # epoch 2 of 2, then the last
    assert all(0 <= entry['knn_top1'] <= 100 for entry in log[1:])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / 'tb'))
    events.Reload()
    steps = len(events.Scalars('train/loss')) // 3  # optimizer steps per epoch
    assert [e.step for e in events.Scalars('knn/top1')] == [2 * steps, 3 * steps]  # the train/* step axis

    with pytest.raises(utils.UserError, match='--knn_data_path'):
        train_esvit(parse_args(TINY_MODEL + [
            '--data_path', tiny_data, '--knn_freq', '1', '--batch_size_per_gpu', '8', '--num_workers', '0',
            '--output_dir', str(tmp_path / 'x')] + TINY_OPTS))


def test_online_knn_restores_the_training_mode(tiny_data):
    online_knn = knn.OnlineKNN(tiny_data, image_size=32, k=5, batch_size=8, num_workers=0)
    backbone = build_model(tiny_config())
    backbone.train()
    stats = online_knn(backbone, epoch=0)
    assert backbone.training and set(stats) == {'knn_top1', 'knn_top5'}


def test_avgpool_patchtokens_appends_the_pooled_last_stage(tiny_data, tmp_path):
    """As the original's ViT probe: n_last_blocks x dim, + dim with --avgpool_patchtokens. The tiny Swin's two
    blocks are 16 and 32 wide, its last stage 32."""
    for flag, expected_dim in (('False', 16 + 32), ('True', 16 + 32 + 32)):
        out = tmp_path / flag
        linear.eval_linear(parse_eval_args(eval_linear.get_args_parser(), linear_command(
            '--output_dir', str(out), '--epochs', '1', '--cache_features', 'True', '--avgpool_patchtokens', flag,
            data=tiny_data)))
        saved = torch.load(out / linear.CHECKPOINT_NAME, weights_only=True)
        assert saved['state_dict']['linear.weight'].shape == (4, expected_dim)
