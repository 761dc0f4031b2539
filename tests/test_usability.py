"""What a newcomer trips over (issue 20): errors in DataLoader workers, the demo on one's own folder, k-NN's k on
a small bank, short error lines, every option's help, checkpoint files, the progress counter after a resume, and
the training-health signals."""
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers import ROOT, TINY, TINY_OPTS, command


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
