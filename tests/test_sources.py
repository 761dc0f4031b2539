"""Data sources of pre-training behind datasets.build_dataset: unlabelled folders, lists of image paths, the
original's TSV layout with --sampler chunk, WebDataset shards (scripts/make_shards.py); their errors."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, command, read_log, run_training, subset_folder


@pytest.fixture(scope='module')
def data8(tiny_data, tmp_path_factory):
    """8 images of 4 classes: one step of 8 (or of 4 per process) per epoch."""
    return subset_folder(tiny_data, tmp_path_factory.mktemp('data8'), per_class=2)


@pytest.fixture(scope='module')
def shards(data8, tmp_path_factory):
    """data8 in 4 shards of 2 images, written by scripts/make_shards.py."""
    out = tmp_path_factory.mktemp('shards')
    result = subprocess.run([sys.executable, 'scripts/make_shards.py', '--data_path', data8, '--output',
                             str(out / 'train-%06d.tar'), '--images_per_shard', '2'], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == [f'train-{i:06d}.tar' for i in range(4)]
    return str(out / 'train-{000000..000003}.tar')


# ---------------------------------------------------------------- map-style sources

def test_unlabelled_folder_list_and_tsv_read_the_same_images(data8, tmp_path):
    from datasets import FileImagesDataset, ImageFolderDataset, build_dataset
    from datasets.tsv import TSVDataset, write_tsv
    folder = build_dataset(data8, labelled=False)
    assert isinstance(folder, ImageFolderDataset) and len(folder) == 8
    pixels = sorted(folder.read_image(path).tobytes() for path, _ in folder.samples)

    flat = tmp_path / 'flat'  # images at the top and nested, no classes
    (flat / 'a' / 'b').mkdir(parents=True)
    for i, (path, _) in enumerate(folder.samples):
        shutil.copy(path, (flat if i < 3 else flat / 'a' / 'b') / f'{i}.png')
    unlabelled = build_dataset(flat, labelled=False)
    assert isinstance(unlabelled, FileImagesDataset) and set(unlabelled.targets) == {-1}
    assert sorted(unlabelled.read_image(p).tobytes() for p, _ in unlabelled.samples) == pixels

    listing = tmp_path / 'list' / 'train.txt'
    listing.parent.mkdir()
    lines = [f"{os.path.relpath(p, listing.parent)} {label}" for p, label in folder.samples[:4]]
    lines += ['# a comment', ''] + [p for p, _ in folder.samples[4:]]
    listing.write_text('\n'.join(lines) + '\n')
    listed = build_dataset(listing, labelled=False)
    assert listed.targets == folder.targets[:4] + [-1] * 4
    assert [listed.read_image(p).tobytes() for p, _ in listed.samples] == \
        [folder.read_image(p).tobytes() for p, _ in folder.samples]

    tsv_dir = tmp_path / 'tsv' / 'train'  # the original's folder of .tsv files
    tsv_dir.mkdir(parents=True)
    rows = [(str(i), label, open(path, 'rb').read()) for i, (path, label) in enumerate(folder.samples)]
    write_tsv(tsv_dir / 'part0.tsv', rows[:5])
    write_tsv(tsv_dir / 'part1.tsv', rows[5:])
    tsv = build_dataset(tsv_dir.parent, labelled=False, tsv_mode=True)
    assert isinstance(tsv, TSVDataset) and tsv.chunk_sizes == [5, 3]
    assert [tsv.read_image(s).tobytes() for s, _ in tsv.samples] == [folder.read_image(p).tobytes()
                                                                       for p, _ in folder.samples]


def test_chunk_sampler_reads_chunk_by_chunk_and_shares_one_order_over_processes():
    from datasets.samplers import ChunkEpochSampler
    sizes = [5, 3, 8]
    one = ChunkEpochSampler(sizes, seed=3)
    one.set_epoch(1)
    order = list(one)
    assert sorted(order) == list(range(16))
    chunk_of = [0] * 5 + [1] * 3 + [2] * 8
    runs = [chunk_of[i] for i in order]
    assert sum(a != b for a, b in zip(runs, runs[1:])) == 2  # each chunk is one contiguous run
    two = [ChunkEpochSampler(sizes, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for sampler in two:
        sampler.set_epoch(1)
    shares = [list(s) for s in two]
    assert [shares[i % 2][i // 2] for i in range(16)] == order  # process r takes every 2nd of the same order
    one.set_epoch(2)
    assert list(one) != order


def test_tsv_folder_and_chunk_sampler_train_a_demo_epoch(data8, tmp_path):
    from datasets import build_dataset
    from datasets.tsv import write_tsv
    folder = build_dataset(data8, labelled=False)
    rows = [(str(i), label, open(path, 'rb').read()) for i, (path, label) in enumerate(folder.samples)]
    write_tsv(tmp_path / 'train.tsv', rows)
    out = str(tmp_path / 'run')
    run_training(command('--data_path', str(tmp_path), '--tsv_mode', 'True', '--sampler', 'chunk',
                         '--output_dir', out, '--epochs', '1'))
    assert read_log(out)[0]['epoch'] == 0


@pytest.mark.parametrize('layout', ['unlabelled', 'list'])
def test_unlabelled_folder_and_list_train_a_demo_epoch(data8, tmp_path, layout):
    from datasets.sources import image_files
    paths = image_files(data8)
    if layout == 'unlabelled':
        data = tmp_path / 'images'
        (data / 'deep').mkdir(parents=True)
        for i, path in enumerate(paths):
            shutil.copy(path, (data if i % 2 else data / 'deep') / f'{i}.png')
    else:
        data = tmp_path / 'images.txt'
        data.write_text('\n'.join(paths) + '\n')
    out = str(tmp_path / 'run')
    run_training(command('--data_path', str(data), '--output_dir', out, '--epochs', '1'))
    assert read_log(out)[0]['epoch'] == 0


# ---------------------------------------------------------------- WebDataset shards

def test_shards_deal_every_image_once_per_epoch_over_processes_and_workers(shards, data8):
    from datasets import build_dataset
    from datasets.shards import ShardDataset
    folder = build_dataset(data8)
    all_pixels = sorted(folder.read_image(path).tobytes() for path, _ in folder.samples)
    dataset = ShardDataset(shards, transform=None, seed=0, shuffle_buffer=3)
    assert dataset.epoch_images == 8 and len(dataset.urls) == 4
    dataset.configure(batch_size=2)
    orders = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for world, workers in ((1, 1), (2, 1), (2, 2), (1, 4)):
            dataset.world_size = world
            seen = [image.tobytes() for rank in range(world) for worker in range(workers)
                    for image, _ in dataset.stream(rank, worker, workers)]
            assert sorted(seen) == all_pixels  # each image once
        dataset.world_size = 1
        orders.append([image.tobytes() for image, _ in dataset.stream(0, 0, 1)])
    assert orders[0] != orders[1]  # shards and buffer reshuffled each epoch
    # a mid-epoch resume skips the batches done: the rest of the same epoch's stream
    dataset.set_epoch(1, start_batch=1)
    assert [image.tobytes() for image, _ in dataset.stream(0, 0, 1)] == orders[1][2:]


def test_shards_stream_from_a_pipe_and_a_url(shards):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    from datasets.shards import ShardDataset
    folder = os.path.dirname(shards)
    local = ShardDataset(shards, transform=None, shuffle_buffer=0)
    local.configure(batch_size=4)
    expected = [image.tobytes() for image, _ in local.stream(0, 0, 1)]
    handler = functools.partial(SimpleHTTPRequestHandler, directory=folder)
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sources = [f"pipe:cat {shards}"]
    if shutil.which('curl'):  # webdataset reads URLs through curl
        sources.append(f"http://127.0.0.1:{server.server_address[1]}/{os.path.basename(shards)}")
    try:
        for source in sources:
            remote = ShardDataset(source, transform=None, shuffle_buffer=0, epoch_images=8)
            remote.configure(batch_size=4)
            assert [image.tobytes() for image, _ in remote.stream(0, 0, 1)] == expected, source
    finally:
        server.shutdown()


def two_process_run(argv, out):
    result = subprocess.run([sys.executable, 'main_esvit_mnodes.py', '--num_gpus_per_node', '2'] + argv, cwd=ROOT,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_log(out)


def test_two_processes_over_shards_match_the_folder_and_resume(shards, data8, tmp_path):
    """2 gloo processes x 4 images over 4 shards, against 1 process x 8 images of the folder: one step per epoch
    holds every image, with the augmentations of the folder's image indices, so the losses agree whatever the
    order in which the shards deal the images out (a missing or repeated image would change them). The state
    after epoch 1, resumed by the same 2-process command, trains epoch 2 to the same loss."""
    folder_out, shard_out, resumed = (str(tmp_path / name) for name in ('folder', 'shards', 'resumed'))
    run_training(command('--data_path', data8, '--output_dir', folder_out, '--epochs', '3', '--batch_size_per_gpu',
                         '8', '--saveckp_freq', '0'))

    def shard_run(out):
        return two_process_run(command('--data_path', shards, '--output_dir', out, '--batch_size_per_gpu', '4',
                                       '--saveckp_freq', '1', '--shard_shuffle_buffer', '2', '--epochs', '3'), out)
    log = shard_run(shard_out)
    assert [line['epoch'] for line in log] == [0, 1, 2]
    torch.testing.assert_close([line['train_loss'] for line in log],
                               [line['train_loss'] for line in read_log(folder_out)], rtol=1e-4, atol=0)
    os.makedirs(resumed)
    shutil.copy(os.path.join(shard_out, 'checkpoint0001.pth'), os.path.join(resumed, 'checkpoint.pth'))
    (resumed_epoch,) = shard_run(resumed)
    assert resumed_epoch['epoch'] == 2
    torch.testing.assert_close(resumed_epoch['train_loss'], log[2]['train_loss'], rtol=1e-5, atol=0)


# ---------------------------------------------------------------- errors

def run_error(argv, capsys):
    import utils
    from engine import parse_args, train_esvit
    os.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        utils.run_main(train_esvit, parse_args(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code != 0 and len(err) == 1 and err[0].startswith('error: ')
    return err[0]


def test_bad_shards_missing_lineidx_and_empty_lists_are_one_line_errors(shards, tmp_path, capsys):
    bad = tmp_path / 'bad'
    bad.mkdir()
    shutil.copy(shards.replace('{000000..000003}', '000000'), bad / 'train-000000.tar')
    (bad / 'train-000001.tar').write_bytes(b'not a tar file at all' * 50)
    out = str(tmp_path / 'out')
    assert 'train-000001.tar is not a readable tar file' in run_error(
        command('--data_path', str(bad / 'train-{000000..000001}.tar'), '--output_dir', out), capsys)
    assert 'shard' in run_error(command('--data_path', str(bad / 'train-{000000..000009}.tar'), '--output_dir', out),
                                capsys)
    assert '1 shards are fewer than 1 processes x 2 loader workers' in run_error(
        command('--data_path', str(bad / 'train-000000.tar'), '--num_workers', '2', '--output_dir', out), capsys)
    assert '--shard_epoch_images' in run_error(
        command('--data_path', f'pipe:cat {bad}/train-000000.tar', '--output_dir', out), capsys)
    tsv = tmp_path / 'tsv'
    tsv.mkdir()
    (tsv / 'train.tsv').write_text('0\t0\taGVsbG8=\n')
    assert 'has no line index' in run_error(command('--data_path', str(tsv), '--tsv_mode', 'True',
                                                    '--output_dir', out), capsys)
    empty = tmp_path / 'empty.txt'
    empty.write_text('# nothing\n\n')
    assert 'lists no images' in run_error(command('--data_path', str(empty), '--output_dir', out), capsys)
