"""The original's command-line surface: every option of its four parsers is accepted here and listed in the
README's table; its DeiT augmentation and its mixup of the student's views (shapes, mixing weights, the loss
against an independent computation, a demo epoch with each)."""
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, command, read_log, run_training, subset_folder

# Every option of the original's parsers (microsoft/esvit: main_esvit.py, eval_knn.py, eval_linear.py and
# analyze_models.py, which its scripts/scripts_local/run_analysis.sh runs), in their order.
ORIGINAL_OPTIONS = {
    'main_esvit.py': [
        '--cfg', '--arch', '--patch_size', '--out_dim', '--norm_last_layer', '--momentum_teacher', '--use_bn_in_head',
        '--use_dense_prediction', '--warmup_teacher_temp', '--teacher_temp', '--warmup_teacher_temp_epochs',
        '--use_fp16', '--weight_decay', '--weight_decay_end', '--clip_grad', '--batch_size_per_gpu', '--epochs',
        '--freeze_last_layer', '--lr', '--warmup_epochs', '--min_lr', '--optimizer', '--global_crops_scale',
        '--local_crops_number', '--local_crops_scale', '--local_crops_size', '--aug-opt', '--color-jitter', '--aa',
        '--train-interpolation', '--reprob', '--remode', '--recount', '--resplit', '--use_mixup',
        '--num_mixup_views', '--mixup', '--cutmix', '--cutmix-minmax', '--mixup-prob', '--mixup-switch-prob',
        '--mixup-mode', '--smoothing', '--dataset', '--zip_mode', '--tsv_mode', '--sampler', '--data_path',
        '--pretrained_weights_ckpt', '--output_dir', '--saveckp_freq', '--seed', '--num_workers', '--dist_url',
        '--local_rank'],
    'eval_knn.py': [
        '--cfg', '--arch', '--batch_size_per_gpu', '--nb_knn', '--temperature', '--pretrained_weights', '--use_cuda',
        '--patch_size', '--checkpoint_key', '--dump_features', '--load_features', '--num_workers', '--dist_url',
        '--local_rank', '--data_path', '--zip_mode'],
    'eval_linear.py': [
        '--cfg', '--arch', '--n_last_blocks', '--avgpool_patchtokens', '--patch_size', '--pretrained_weights',
        '--checkpoint_key', '--epochs', '--lr', '--batch_size_per_gpu', '--dist_url', '--local_rank', '--data_path',
        '--num_workers', '--val_freq', '--output_dir', '--zip_mode', '--num_labels'],
    'run_analysis.py': [
        '--cfg', '--arch', '--use_saved_aug', '--vis_correspondence', '--measure_correspondence', '--vis_attention',
        '--vis_entropy', '--seed', '--patch_size', '--pretrained_weights', '--checkpoint_key', '--learning',
        '--image_path', '--image_path2', '--output_dir', '--threshold', '--batch_size_per_gpu', '--data_path',
        '--num_workers', '--rank'],
}


def our_parsers():
    import eval_knn
    import eval_linear
    import run_analysis
    from engine.args import get_args_parser
    return {'main_esvit.py': get_args_parser(), 'eval_knn.py': eval_knn.get_args_parser(),
            'eval_linear.py': eval_linear.get_args_parser(), 'run_analysis.py': run_analysis.get_args_parser()}


def test_every_option_of_the_original_parsers_is_accepted():
    for script, parser in our_parsers().items():
        missing = [flag for flag in ORIGINAL_OPTIONS[script] if flag not in parser._option_string_actions]
        assert not missing, f"{script} lacks {missing}"
    from engine import parse_args  # the original's spelling of the new flags parses into the original's names
    args = parse_args(['--aug-opt', 'deit_aug', '--color-jitter', '0.3', '--cutmix-minmax', '0.2', '0.8',
                       '--mixup-switch-prob', '0.1', '--tsv_mode', 'True', '--sampler', 'chunk', '--resplit'])
    assert (args.aug_opt, args.color_jitter, args.cutmix_minmax, args.mixup_switch_prob) == \
        ('deit_aug', 0.3, [0.2, 0.8], 0.1)
    assert args.tsv_mode and args.sampler == 'chunk' and args.resplit


def readme_table():
    """{script: [flags]} of the README's table of the original's options (rows '| `script` | `--flag` | ...')."""
    table = {}
    for line in (ROOT / 'README.md').read_text().splitlines():
        row = re.match(r'\| `([a-z_]+\.py)` \| `(--[\w-]+)` \|', line)
        if row:
            table.setdefault(row.group(1), []).append(row.group(2))
    return table


def test_the_readme_table_lists_exactly_the_original_options():
    table = readme_table()
    assert set(table) == set(ORIGINAL_OPTIONS)
    for script, flags in ORIGINAL_OPTIONS.items():
        assert sorted(table[script]) == sorted(flags), script


def test_original_only_analysis_flags_are_one_line_errors(capsys):
    import run_analysis
    assert run_analysis.parse_args(['--rank', '3', '--vis_entropy', 'False']).rank == 3
    with pytest.raises(SystemExit) as exit_info:
        run_analysis.parse_args(['--vis_entropy', 'True'])
    assert exit_info.value.code != 0 and '--vis_entropy True is not supported' in capsys.readouterr().err


# ---------------------------------------------------------------- DeiT augmentation

def test_deit_views_sizes_policy_and_random_erasing():
    from timm.data.random_erasing import RandomErasing
    from engine import parse_args
    from datasets import build_transform
    from PIL import Image
    args = parse_args(['--aug-opt', 'deit_aug', '--local_crops_number', '3', '1', '--local_crops_size', '24', '40',
                       '--reprob', '1.0', '--remode', 'const', '--data_path', 'unused'])
    transform = build_transform(args, global_crops_size=48)
    image = Image.fromarray(torch.randint(0, 256, (60, 50, 3), dtype=torch.uint8).numpy())
    views = transform(image)
    assert [tuple(v.shape) for v in views] == [(3, 48, 48)] * 2 + [(3, 24, 24)] * 3 + [(3, 40, 40)]
    steps = [type(step).__name__ for step in transform.global_views[0].transforms]
    assert 'RandAugment' in steps and isinstance(transform.global_views[0].transforms[-1], RandomErasing)
    # --reprob 1 --remode const: every view has an erased (zero after normalisation) rectangle
    assert all((v == 0).all(dim=0).sum() > 0 for v in views)
    no_policy = build_transform(parse_args(['--aug-opt', 'deit_aug', '--aa', 'none', '--data_path', 'unused']), 32)
    assert 'RandAugment' not in [type(s).__name__ for s in no_policy.global_views[0].transforms]
    import utils
    with pytest.raises(utils.UserError, match='--aa bogus'):
        build_transform(parse_args(['--aug-opt', 'deit_aug', '--aa', 'bogus', '--data_path', 'unused']), 32)


# ---------------------------------------------------------------- mixup of the student's views

def mixup_args(*flags):
    from engine import parse_args
    return parse_args(['--use_mixup', 'True', '--batch_size_per_gpu', '4', '--data_path', 'unused', *flags])


def test_mixup_mixes_copies_with_the_reversed_batch_and_targets_give_the_weights():
    from engine.mixup import build_view_mixup
    crops = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 4, 4)]
    clean = [c.clone() for c in crops]
    mixup = build_view_mixup(mixup_args('--cutmix', '0', '--num_mixup_views', '2'))
    torch.manual_seed(0)
    mixed, targets = mixup(crops)
    assert targets.shape == (3, 4, 4)
    assert all(torch.equal(c, k) for c, k in zip(crops, clean))  # the teacher's crops stay clean
    torch.testing.assert_close(targets.sum(-1), torch.ones(3, 4))
    for v in range(2):  # mixup: image b = lam * b + (1 - lam) * (B-1-b), lam read off the targets
        lam = targets[v, 0, 0]
        assert 0 <= lam <= 1 and torch.allclose(targets[v], lam * torch.eye(4) + (1 - lam) * torch.eye(4).flip(1))
        torch.testing.assert_close(mixed[v], lam * clean[v] + (1 - lam) * clean[v].flip(0))
    assert torch.equal(mixed[2], clean[2]) and torch.equal(targets[2], torch.eye(4))

    cutmix = build_view_mixup(mixup_args('--mixup', '0', '--mixup-mode', 'elem'))
    mixed, targets = cutmix([c.clone() for c in clean[:2]])
    for v in range(2):  # cutmix: the target weight of image b is the share of its own pixels
        own = (mixed[v] == clean[v]).all(dim=1).float().mean(dim=(1, 2))
        from_partner = (mixed[v] == clean[v].flip(0)).all(dim=1).float().mean(dim=(1, 2))
        torch.testing.assert_close(targets[v].diagonal(), own)
        torch.testing.assert_close(targets[v].flip(1).diagonal(), from_partner)
    assert build_view_mixup(mixup_args('--mixup', '0', '--cutmix', '0')) is None
    import utils
    with pytest.raises(utils.UserError, match='must be even'):
        build_view_mixup(mixup_args('--batch_size_per_gpu', '3'))


def test_mixup_view_loss_is_the_cross_entropy_with_the_mixed_teacher_targets():
    from engine.losses import DINOLoss
    torch.manual_seed(0)
    views, batch, k = 4, 6, 16
    loss_fn = DINOLoss(k, views, 0.04, 0.04, 0, 10)
    student, teacher = torch.randn(views * batch, k), torch.randn(2 * batch, k)
    targets = torch.softmax(torch.randn(views, batch, batch), dim=-1)
    loss = loss_fn(student, teacher, 0, targets)
    q = torch.softmax(teacher / 0.04, dim=-1).view(2, batch, k)
    logp = F.log_softmax(student / 0.1, dim=-1).view(views, batch, k)
    terms = [-(targets[v] @ q[t] * logp[v]).sum(-1).mean() for t in range(2) for v in range(views) if v != t]
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    identity = torch.eye(batch).expand(views, batch, batch)
    torch.testing.assert_close(loss_fn(student, teacher, 0, identity), loss_fn(student, teacher, 0))


def test_mixup_region_loss_mixes_the_terms_against_both_source_images():
    from engine.losses import DDINOLoss
    torch.manual_seed(0)
    batch, k, c, tokens_t, tokens_s = 4, 8, 5, 4, 1
    loss_fn = DDINOLoss(k, 3, 0.04, 0.04, 0, 10)
    s_npatch, t_npatch = [tokens_t, tokens_s], [tokens_t]
    student = (torch.randn(3 * batch, k), torch.randn(batch * (2 * tokens_t + tokens_s), k),
               torch.randn(batch * (2 * tokens_t + tokens_s), c), s_npatch)
    teacher = (torch.randn(2 * batch, k), torch.randn(2 * batch * tokens_t, k), torch.randn(2 * batch * tokens_t, c),
               t_npatch)

    def flipped(out):  # the teacher's outputs of the reversed batch
        cls, region, fea, npatch = out
        return (cls.view(2, batch, -1).flip(1).flatten(0, 1), region.view(2, batch, tokens_t, -1).flip(1).flatten(0, 2),
                fea.view(2, batch, tokens_t, -1).flip(1).flatten(0, 2), npatch)

    eye = torch.eye(batch).expand(3, batch, batch)
    plain = loss_fn(student, teacher, 0)
    torch.testing.assert_close(loss_fn(student, teacher, 0, eye), plain)
    swapped = loss_fn(student, flipped(teacher), 0)
    torch.testing.assert_close(loss_fn(student, teacher, 0, eye.flip(-1)), swapped)
    lam = 0.3  # half-way targets: the region and view terms are the same mixtures of both
    torch.testing.assert_close(loss_fn(student, teacher, 0, lam * eye + (1 - lam) * eye.flip(-1)),
                               lam * plain + (1 - lam) * swapped)


@pytest.mark.parametrize('flags', [('--aug-opt', 'deit_aug'), ('--use_mixup', 'True', '--mixup-mode', 'pair')],
                         ids=['deit_aug', 'mixup'])
def test_a_demo_epoch_trains_with_deit_aug_and_with_mixup(tiny_data, tmp_path, flags):
    out = str(tmp_path / 'run')
    data = subset_folder(tiny_data, tmp_path / 'data', per_class=4)  # 2 steps of 8
    run_training(command('--data_path', data, '--output_dir', out, '--epochs', '1', *flags))
    (log,) = read_log(out)
    assert log['epoch'] == 0 and torch.isfinite(torch.tensor(log['train_loss']))
