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
    undocumented, unmarked = [], []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        if not (action.help or '').strip() or action.help == argparse.SUPPRESS:
            undocumented.append(name)
        elif action.type is utils.bool_flag and 'True/False' not in formatter._get_help_string(action):
            unmarked.append(name)
    assert not undocumented, f"{script}: options without help: {undocumented}"
    assert not unmarked, f"{script}: boolean options that do not say True/False: {unmarked}"
    assert '(default:' in parser.format_help()
