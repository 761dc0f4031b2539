"""What a newcomer trips over (issue 20): errors in DataLoader workers, the demo on one's own folder, k-NN's k on
a small bank, short error lines, every option's help, checkpoint files, the progress counter after a resume, and
the training-health signals."""
import io
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import ROOT, TINY, TINY_OPTS, command, read_log, run_training


def truncated_jpeg():
    buffer = io.BytesIO()
    Image.new('RGB', (32, 32), (200, 30, 30)).save(buffer, format='JPEG')
    return buffer.getvalue()[:300]


@pytest.fixture
def corrupt_data(tiny_data, tmp_path):
    """tiny_data (32 images) with one image replaced by a truncated JPEG: every epoch reads it."""
    root = tmp_path / 'corrupt'
    shutil.copytree(tiny_data, root)
    first_class = sorted(root.iterdir())[0]
    os.remove(sorted(first_class.iterdir())[0])
    (first_class / 'truncated.jpg').write_bytes(truncated_jpeg())
    return root


def run_in_own_group(argv, timeout=30):
    """(exit code, stderr, seconds, whether any process of its group outlived it) of ``python argv``."""
    start = time.time()
    process = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"python {' '.join(argv[:3])} ... did not end within {timeout} s")
    seconds = time.time() - start
    time.sleep(0.5)
    try:
        os.killpg(process.pid, 0)
        left = True
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        left = False
    return process.returncode, stderr, seconds, left


def test_error_in_a_worker_ends_the_run_naming_the_file(corrupt_data, tmp_path):
    """--on_bad_image fail with 2 workers: exit 2 within 30 s on one line naming the file, no worker left; the
    same for the evaluation's feature extraction."""
    train = command('--num_workers', '2', '--on_bad_image', 'fail', '--epochs', '1', '--data_path',
                    str(corrupt_data), '--output_dir', str(tmp_path / 'out'))
    code, stderr, seconds, left = run_in_own_group(['main_esvit.py', *train])
    assert code == 2 and not left and seconds < 30
    assert stderr.strip().splitlines()[-1].startswith('error: unreadable image') and 'truncated.jpg' in stderr

    knn_data = tmp_path / 'knn'  # the evaluation skips bad images; a val split of only bad ones is an error
    shutil.copytree(corrupt_data, knn_data / 'train')
    for image in Path(knn_data / 'train').glob('*/*'):
        (knn_data / 'val' / image.parent.name).mkdir(parents=True, exist_ok=True)
        (knn_data / 'val' / image.parent.name / f'{image.stem}.jpg').write_bytes(truncated_jpeg())
    knn = [*TINY[:4], '--image_size', '32', '--num_workers', '2', '--data_path', str(knn_data), '--nb_knn', '5',
           '--output_dir', str(tmp_path / 'knn_out'), *TINY_OPTS]
    code, stderr, seconds, left = run_in_own_group(['eval_knn.py', *knn])
    assert code == 2 and not left and seconds < 30, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == f"error: no readable image left in {knn_data / 'val'}"


# ---------------------------------------------------------------------------------------------------------
# training health
# ---------------------------------------------------------------------------------------------------------
def test_health_signals_of_known_teachers():
    """A uniform teacher has entropy log K; KL and the distinct prototypes against direct computations."""
    from engine.health import HealthMonitor
    K, B, V = 64, 5, 4
    monitor = HealthMonitor(K)
    uniform = torch.full((2 * B, K), 1. / K)
    ce = torch.rand(2, V) + math.log(K)
    mask = torch.ones(2, V, dtype=torch.bool)
    mask[0, 0] = mask[1, 1] = False
    monitor.observe(ce, mask, uniform)
    signals = monitor.end_step(torch.nn.Module())
    assert signals['teacher_entropy_view'] == pytest.approx(math.log(K), rel=1e-6)
    assert signals['entropy_max'] == math.log(K)
    assert signals['kl_view'] == pytest.approx((ce[mask] - math.log(K)).mean().item(), rel=1e-5)
    assert signals['view_loss'] == pytest.approx(ce[mask].mean().item(), rel=1e-6)

    torch.manual_seed(0)
    teacher = torch.softmax(torch.randn(2 * B, K) * 3, -1)
    student = torch.randn(V * B, K)
    student_logp = torch.log_softmax(student / 0.1, -1).view(V, B, K)
    ce = torch.stack([torch.stack([-(teacher.view(2, B, K)[i] * student_logp[v]).sum(-1).mean()
                                   for v in range(V)]) for i in range(2)])                      # 2 x V
    region = torch.softmax(torch.randn(B, 2, 3, K), -1)
    region[0, 0, 0] = region[1, 1, 2] = torch.eye(K)[7]  # two rows pick prototype 7
    monitor.observe(ce, mask, teacher, ce * 2, region)
    signals = monitor.end_step(torch.nn.Module())
    kl = [sum(teacher.view(2, B, K)[i, b] @ (teacher.view(2, B, K)[i, b].log() - student_logp[v, b])
              for b in range(B)) / B for i in range(2) for v in range(V) if mask[i, v]]
    assert signals['kl_view'] == pytest.approx(torch.stack(kl).mean().item(), rel=1e-4)
    assert signals['teacher_entropy_view'] == pytest.approx(-(teacher * teacher.log()).sum(-1).mean().item(), rel=1e-5)
    assert signals['distinct_view'] == pytest.approx(len(set(teacher.argmax(-1).tolist())) / (2 * B))
    assert signals['distinct_region'] == pytest.approx(len(set(region.argmax(-1).flatten().tolist())) / 30)
    assert signals['region_loss'] == pytest.approx(2 * signals['view_loss'], rel=1e-6)


def test_collapse_warns_once_and_a_healthy_teacher_never():
    from engine.health import HealthMonitor
    K, B = 32, 4
    mask = torch.tensor([[False, True, True], [True, False, True]])
    peaked = torch.softmax(torch.randn(2 * B, K) * 2, -1)  # entropy well inside (0, log K)
    for probs, expected in ((torch.full((2 * B, K), 1. / K), 1), (torch.eye(K)[[0] * 2 * B], 1),
                            (peaked, 0)):
        warnings = []
        monitor = HealthMonitor(K, patience=5, warn=warnings.append)
        for _ in range(12):
            monitor.observe(torch.full((2, 3), math.log(K)), mask, probs)
            monitor.end_step(torch.nn.Module())
        assert len(warnings) == expected
        if expected:
            assert 'collapsed' in warnings[0] and '--teacher_temp' in warnings[0]


def test_health_signals_leave_the_loss_bit_identical(tiny_data, tmp_path):
    """The same run with and without the signals: the same loss at every step; the signals in log.txt, the
    view and region losses adding up to the loss."""
    losses = {}
    for signals in ('True', 'False'):
        out = tmp_path / signals
        run_training(command('--epochs', '1', '--data_path', tiny_data, '--output_dir', str(out),
                             '--health_signals', signals, '--saveckp_freq', '0'))
        losses[signals] = scalars(out / 'tb', 'train/loss')
    assert len(losses['True']) == 4 and losses['True'] == losses['False']
    stats = read_log(tmp_path / 'True')[0]
    assert stats['train_loss'] == pytest.approx(0.5 * (stats['train_view_loss'] + stats['train_region_loss']),
                                                rel=1e-5)
    assert 0 < stats['train_teacher_entropy_view'] <= stats['train_entropy_max'] == pytest.approx(math.log(256))
    assert 'train_view_loss' not in read_log(tmp_path / 'False')[0]
    assert len(scalars(tmp_path / 'True' / 'tb', 'health/kl_view')) == 4


def scalars(tb_dir, tag):
    """[(step, value)] of a TensorBoard scalar."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


# ---------------------------------------------------------------------------------------------------------
# --help
# ---------------------------------------------------------------------------------------------------------
def entry_scripts():
    """Every script with a command line: the top-level *.py and scripts/*.py that use argparse."""
    return sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob('*.py'), *ROOT.glob('scripts/*.py')]
                  if 'argparse' in p.read_text() and "__name__ == '__main__'" in p.read_text())


class ParserCaught(Exception):
    pass


def script_parser(script, monkeypatch):
    """The ArgumentParser that ``script`` parses its command line with (caught at its first parse)."""
    import argparse
    import runpy

    def catch(parser, *args, **kwargs):
        raise ParserCaught(parser)
    monkeypatch.setattr(argparse.ArgumentParser, 'parse_known_args', catch)
    monkeypatch.setattr(sys, 'argv', [script])
    monkeypatch.syspath_prepend(str((ROOT / script).parent))  # as `python scripts/x.py` puts scripts/ first
    with pytest.raises(ParserCaught) as caught:
        runpy.run_path(str(ROOT / script), run_name='__main__')
    return caught.value.args[0]


@pytest.mark.parametrize('script', entry_scripts())
def test_every_option_has_a_help_with_its_default(script, monkeypatch):
    """Each option of each entry script says what it does, its default, and True/False for a boolean."""
    import argparse
    import utils
    parser = script_parser(script, monkeypatch)
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), script
    formatter = parser._get_formatter()
    undocumented, unmarked, no_default = [], [], []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        if not (action.help or '').strip() or action.help == argparse.SUPPRESS:
            undocumented.append(name)
        elif action.type is utils.bool_flag and 'True/False' not in formatter._get_help_string(action):
            unmarked.append(name)
        elif action.option_strings and 'default' not in formatter._get_help_string(action).lower():
            no_default.append(name)
    assert not undocumented, f"{script}: options without help: {undocumented}"
    assert not unmarked, f"{script}: boolean options that do not say True/False: {unmarked}"
    assert not no_default, f"{script}: options whose help does not give the default: {no_default}"


# ---------------------------------------------------------------------------------------------------------
# the demo on one's own folder, k-NN's k, error lines, checkpoint files, the progress counter
# ---------------------------------------------------------------------------------------------------------
def test_no_arch_and_no_cfg_trains_the_demo_model_on_the_given_folder(tiny_data, tmp_path, capsys):
    import json
    from config import DEMO_CFG
    from engine.args import DEMO_DEFAULTS
    out = tmp_path / 'mine'
    args = run_training(['--data_path', tiny_data, '--output_dir', str(out), '--epochs', '2', '--num_workers', '0',
                         '--precision', 'fp32', '--out_dim', '256'])
    printed = capsys.readouterr().out
    assert args.cfg == DEMO_CFG and args.arch == DEMO_DEFAULTS['arch'] and args.knn_freq == 0
    assert args.batch_size_per_gpu == DEMO_DEFAULTS['batch_size_per_gpu'] and args.out_dim == 256
    lines = [line for line in printed.splitlines() if 'No --arch or --cfg' in line]
    assert lines == [f"No --arch or --cfg: the demo model ({DEMO_CFG}) with the demo's settings on {tiny_data}"]
    assert f"Data: {tiny_data}, 32 images" in printed and 'None' not in printed.split('Starting')[0]
    assert json.loads((out / 'args.json').read_text())['data_path'] == tiny_data  # the full dump, not printed
    assert 'local_crops_scale' not in printed
    # the demo keeps the heads' last layer (the prototypes) at its init for the whole run, past the first epoch:
    # the teacher's, an average of the student's, is still the student's; the rest of the heads moved
    import torch
    checkpoint = torch.load(out / 'checkpoint.pth', map_location='cpu', weights_only=False)
    student, teacher = checkpoint['student'], checkpoint['teacher']
    pairs = {k: (v, teacher[k.removeprefix('module.')]) for k, v in student.items() if '.head' in k}
    assert all(torch.allclose(s, t, atol=1e-6) for k, (s, t) in pairs.items() if 'last_layer' in k)
    assert args.freeze_last_layer > args.epochs
    assert not all(torch.equal(s, t) for k, (s, t) in pairs.items() if 'mlp' in k)


def test_knn_k_is_clamped_to_the_bank_before_the_features(tiny_data, tmp_path, capsys, monkeypatch):
    import json
    import evaluation.knn
    sys.path.insert(0, str(ROOT))
    from eval_knn import get_args_parser
    from evaluation import eval_knn, parse_eval_args
    data = tmp_path / 'data'
    for split in ('train', 'val'):
        shutil.copytree(tiny_data, data / split)
    warned_before = []
    extract = evaluation.knn.extract_features

    def extract_after_warning(*args, **kwargs):
        warned_before.append('exceeds the 32 training images' in capsys.readouterr().err)
        return extract(*args, **kwargs)
    monkeypatch.setattr(evaluation.knn, 'extract_features', extract_after_warning)
    argv = [*TINY[:4], '--image_size', '32', '--num_workers', '0', '--data_path', str(data),
            '--nb_knn', '5', '20', '100', '200', '--output_dir', str(tmp_path / 'knn'), *TINY_OPTS]
    accuracies = eval_knn(parse_eval_args(get_args_parser(), argv))
    assert warned_before[0] and list(accuracies) == [5, 20, 32]
    assert list(json.loads((tmp_path / 'knn' / 'knn.json').read_text())['knn']) == ['5', '20', '32']


def test_error_lines_are_short_and_name_the_file_and_cause(tmp_path, capsys):
    import utils
    path = tmp_path / 'checkpoint.pth'
    torch.save({'weights': torch.zeros(200, 200)}, path)
    path.write_bytes(path.read_bytes()[:5000])  # an interrupted copy
    with pytest.raises(SystemExit) as exit_info:
        utils.run_main(lambda args: utils.load_checkpoint(str(path)), None)
    line = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and '\n' not in line and len(line) - len(str(path)) < 100
    assert str(path) in line and 'truncated' in line

    def long_error(args):
        raise utils.UserError('x' * 5000 + '\nsecond line')
    with pytest.raises(SystemExit):
        utils.run_main(long_error, None)
    line = capsys.readouterr().err.strip()
    assert len(line) <= len('error: ') + utils.ERROR_LINE_CHARS and line.endswith(' ...')


def test_numbered_checkpoints_link_the_state_and_the_counter_goes_on_after_a_resume(tiny_data, tmp_path, capsys,
                                                                                   monkeypatch):
    """--saveckp_freq 1: checkpoint0001.pth is checkpoint.pth's file (a hard link), checkpoint0000.pth keeps
    epoch 1's state. A run stopped after step 2 of 4 resumes with the counter at [2/4] and an ETA for 2 steps."""
    from engine.trainer import Trainer
    out = tmp_path / 'run'
    argv = command('--epochs', '2', '--data_path', tiny_data, '--output_dir', str(out), '--print_freq', '1')
    step = Trainer.step

    def step_then_sigterm(self, *micro_batches, epoch, it):
        if it == 5:  # the second step of the second epoch completes, then the run stops
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, *micro_batches, epoch=epoch, it=it)
    monkeypatch.setattr(Trainer, 'step', step_then_sigterm)
    with pytest.raises(SystemExit):
        run_training(argv)
    monkeypatch.undo()
    epoch0, latest = out / 'checkpoint0000.pth', out / 'checkpoint.pth'
    assert os.stat(epoch0).st_nlink == 1 and torch.load(epoch0, weights_only=True)['epoch'] == 1
    capsys.readouterr()
    run_training(argv)
    counters = [line.split()[2] for line in capsys.readouterr().out.splitlines() if line.startswith('Epoch: [1/2] [')]
    assert counters == ['[2/4]', '[3/4]']
    assert os.path.samefile(out / 'checkpoint0001.pth', latest) and not os.path.samefile(epoch0, latest)
    assert torch.load(epoch0, weights_only=True)['epoch'] == 1 and torch.load(latest, weights_only=True)['epoch'] == 2


def test_workers_are_capped_at_the_cpus_saying_so_once(capsys):
    from datasets import WorkerLoader
    from datasets.loader import usable_cpus
    loaders = [WorkerLoader(range(4), num_workers=10_000, batch_size=2) for _ in range(2)]
    assert [loader.num_workers for loader in loaders] == [usable_cpus()] * 2
    assert capsys.readouterr().out.count('--num_workers 10000 capped at') == 1
    assert WorkerLoader(range(4), num_workers=0).num_workers == 0
