"""Scale-out on CPU: the multi-node launcher forwards every flag; 2 processes, gradient accumulation, a
SIGTERM + resume and a killed worker under torchrun all end in the state of one uninterrupted process."""
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import main_esvit_mnodes
import utils
from config import load_config
from datasets import DistributedEpochSampler, EpochRandomSampler, build_loader, set_epoch
from engine import Trainer, get_args_parser, parse_args
from helpers import ROOT, TINY, TINY_OPTS, run_training

LAUNCHER_ENV = ('OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_RANK', 'SLURM_NNODES', 'SLURM_NODEID', 'SLURM_JOB_NODELIST',
                'SLURM_JOB_ID', 'MASTER_ADDR', 'MASTER_PORT', 'NODE_RANK')


# ---------------------------------------------------------------- the launcher

@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def split_command(output):
    """(torchrun options, arguments given to main_esvit.py) of the command the launcher printed last."""
    command = shlex.split(output.strip().splitlines()[-1])
    assert command[0] == 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1'
    assert os.path.realpath(command[1]) == os.path.realpath(sys.executable)  # `python` or `python3`: the same one
    assert command[2:4] == ['-m', 'torch.distributed.run']
    script = next(i for i, a in enumerate(command) if a.endswith('main_esvit.py'))
    return command[4:script], command[script + 1:]


def dry_run(argv, capsys):
    main_esvit_mnodes.launch(argv + ['--dry_run'])
    return split_command(capsys.readouterr().out)


def non_default_value(action):
    """Command-line words setting ``action`` (a main_esvit.py option) to a value other than its default."""
    if action.nargs == 0:  # a switch (--resplit)
        return []
    if action.choices:
        return [next(c for c in action.choices if c != action.default)]
    if action.type is utils.bool_flag:
        return [str(not action.default)]
    if action.nargs in ('+', 2):
        return ['3', '5'] if action.type is int else ['0.25', '0.75']
    if action.type is int:
        return [str((action.default or 0) + 7)]
    if action.type is float:
        return [repr((action.default or 0.0) + 0.125)]
    return [f'value_of_{action.dest}']


def test_dry_run_forwards_every_flag(clean_env, capsys):
    parser = get_args_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != 'help']
    training_argv = []
    for action in options:
        training_argv += [action.option_strings[0], *non_default_value(action)]
    cut = training_argv.index('--epochs')
    opts = ['MODEL.NUM_CLASSES', '0', 'MODEL.SPEC.DEPTHS', '[1, 1]']
    torchrun, forwarded = dry_run(training_argv[:cut] + ['--num_gpus_per_node', '3'] + training_argv[cut:]
                                  + ['--max_restarts', '2'] + opts, capsys)
    assert {'--nproc_per_node=3', '--max_restarts=2', '--standalone'} <= set(torchrun)
    assert forwarded == training_argv + opts
    received, expected = vars(parse_args(forwarded)), vars(parse_args(training_argv + opts))
    assert received == expected and received['opts'] == opts
    assert all(received[a.dest] != a.default for a in options)  # every option really was set


ORIGINAL_README = ('--num_nodes 2 --num_gpus_per_node 16 --data_path data/train --output_dir out/continued '
                   '--batch_size_per_gpu 16 --arch swin_small --zip_mode True --epochs 300 --teacher_temp 0.07 '
                   '--warmup_epochs 10 --warmup_teacher_temp_epochs 30 --norm_last_layer false '
                   '--cfg experiments/imagenet/swin/swin_small_patch4_window14_224.yaml --use_dense_prediction True '
                   '--pretrained_weights_ckpt out/checkpoint0200.pth').split()


@pytest.mark.parametrize('node_rank', [0, 1])
def test_original_multi_node_command_under_openmpi(clean_env, capsys, node_rank):
    clean_env.setenv('OMPI_COMM_WORLD_SIZE', '2')
    clean_env.setenv('OMPI_COMM_WORLD_RANK', str(node_rank))
    clean_env.setenv('MASTER_ADDR', '10.1.2.3')
    clean_env.setenv('MASTER_PORT', '6001')
    torchrun, forwarded = dry_run(ORIGINAL_README, capsys)
    assert {'--nnodes=2', '--nproc_per_node=16', '--rdzv_backend=c10d', '--rdzv_endpoint=10.1.2.3:6001',
            f'--rdzv_conf=is_host={"true" if node_rank == 0 else "false"}'} <= set(torchrun)
    assert forwarded == ORIGINAL_README[4:]
    args = parse_args(forwarded)
    assert (args.lr, args.batch_size_per_gpu, args.zip_mode, args.norm_last_layer) == (0.0005, 16, True, False)


def test_slurm_environment_and_launcher_errors(clean_env, capsys):
    clean_env.setenv('SLURM_NNODES', '4')
    clean_env.setenv('SLURM_NODEID', '2')
    clean_env.setenv('SLURM_JOB_NODELIST', 'gpu-[003-006],cpu1')
    clean_env.setenv('SLURM_JOB_ID', '4242')
    torchrun, _ = dry_run(['--num_gpus_per_node', '8', '--arch', 'swin_tiny'], capsys)
    assert {'--nnodes=4', '--rdzv_endpoint=gpu-003:29500', '--rdzv_id=4242',
            '--rdzv_conf=is_host=false'} <= set(torchrun)

    def error_of(argv):
        with pytest.raises(SystemExit) as exit_info:
            utils.run_main(main_esvit_mnodes.launch, argv + ['--dry_run'])
        assert exit_info.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]
    assert 'run one launcher per node' in error_of(['--num_nodes', '3'])
    assert 'not in [0, 4)' in error_of(['--node_rank', '4'])
    assert 'unrecognized arguments: --samples_per_gpu' in error_of(['--samples_per_gpu', '2'])
    clean_env.delenv('SLURM_JOB_NODELIST')
    assert "node 0's address" in error_of([])


def test_pretraining_script_runs_its_recipe_through_the_launcher(clean_env, tmp_path):
    clean_env.chdir(ROOT)
    env = {**os.environ, 'DATA_PATH': 'imagenet/train', 'OUT_PATH': str(tmp_path), 'ARCH': 'cvt_tiny',
           'DENSE': 'False', 'GPUS': '4'}
    result = subprocess.run(['bash', 'scripts/pretrain.sh', '--dry_run'], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'main_esvit_mnodes.py' in result.stderr  # the script shows what it runs
    torchrun, forwarded = split_command(result.stdout)
    assert '--nproc_per_node=4' in torchrun and '--standalone' in torchrun
    args = parse_args(forwarded)
    assert load_config(args).MODEL.NAME == 'cvt_v4_transformer'  # the yaml exists and fits --arch
    assert (args.cfg, args.use_dense_prediction, args.epochs, args.batch_size_per_gpu, args.teacher_temp,
            args.opts) == ('experiments/imagenet/cvt_v4/s1.yaml', False, 300, 32, 0.07, ['MODEL.NUM_CLASSES', '0'])


# ---------------------------------------------------------------- data order

class RandomValues(torch.utils.data.Dataset):
    """Item i: (a random draw, i): the draw shows which random stream the item was computed under."""

    def __len__(self):
        return 21

    def __getitem__(self, index):
        return torch.rand(()), index


def test_global_order_and_augmentations_do_not_depend_on_processes_or_workers():
    dataset, batch, accum, world = RandomValues(), 2, 2, 2
    single = EpochRandomSampler(dataset, seed=5)
    single.batch_size = batch * accum * world
    shards = [DistributedEpochSampler(dataset, seed=5, num_replicas=world, rank=r) for r in range(world)]
    for sampler in [single] + shards:
        sampler.set_epoch(3)
    for shard in shards:
        shard.batch_size, shard.step_batches = batch, accum
    def steps(order, size):
        return [set(order[i:i + size]) for i in range(0, len(order) - size + 1, size)]
    single_steps = steps(list(single), single.batch_size)
    rank_steps = [steps(list(shard), batch * accum) for shard in shards]
    assert len(single_steps) == 2 and all(len(s) == 2 for s in rank_steps)
    assert [set.union(*parts) for parts in zip(*rank_steps)] == single_steps

    def epoch_items(num_workers, start_batch=0):
        loader = build_loader(dataset, batch, num_workers, distributed=False, seed=5, step_batches=accum)
        set_epoch(loader, 3, start_batch=start_batch)
        return {i: v for values, indices in loader for v, i in zip(values.tolist(), indices.tolist())}
    items = epoch_items(0)
    assert len(items) == 20 and epoch_items(2) == items  # the same draws in workers
    resumed = epoch_items(0, start_batch=4)
    assert len(resumed) == 12 and all(items[i] == v for i, v in resumed.items())


# ---------------------------------------------------------------- training equivalences

@pytest.fixture(scope='module')
def data8(tiny_data, tmp_path_factory):
    """8 images: 2 optimizer steps of 4 per epoch."""
    root = tmp_path_factory.mktemp('data8')
    for cls in sorted(os.listdir(tiny_data)):
        os.makedirs(root / cls)
        for name in sorted(os.listdir(os.path.join(tiny_data, cls)))[:2]:
            shutil.copy(os.path.join(tiny_data, cls, name), root / cls / name)
    return str(root)


def training_argv(data, out, *flags):
    """The tiny Swin of test_train.py, 2 epochs of 2 steps of 4 images, with ``flags``."""
    return (TINY + ['--data_path', data, '--output_dir', out, '--epochs', '2', '--saveckp_freq', '0',
                    '--batch_size_per_gpu', '4', *flags] + TINY_OPTS)


def loss_curve(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(out, 'tb'))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars('train/loss')]


def assert_same_training(out, reference_out, rtol=1e-4, atol=5e-5, compare_losses=True):
    """The same loss at every step and the same final student, teacher, centers and optimizer moments.

    Float tolerance: AdamW divides by the root of tiny second moments where gradients are near 0, so sums
    taken in another order move a few weights (of size ~0.1) by up to ~1e-5, a tenth of one step's update."""
    if compare_losses:
        losses, reference_losses = loss_curve(out), loss_curve(reference_out)
        assert [s for s, _ in losses] == [s for s, _ in reference_losses] == [0, 1, 2, 3]
        torch.testing.assert_close([v for _, v in losses], [v for _, v in reference_losses], rtol=rtol, atol=0)
    a = torch.load(os.path.join(out, 'checkpoint.pth'), weights_only=True)
    b = torch.load(os.path.join(reference_out, 'checkpoint.pth'), weights_only=True)
    assert a['epoch'] == b['epoch'] == 2 and 'epoch_images' not in a
    for part in ('student', 'teacher', 'dino_loss'):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=rtol, atol=atol, msg=f'{part} {key}')
    for index, state in b['optimizer']['state'].items():
        torch.testing.assert_close(a['optimizer']['state'][index]['exp_avg'], state['exp_avg'], rtol=rtol, atol=atol)


@pytest.fixture(scope='module')
def reference(data8, tmp_path_factory):
    """One process, batch 4, uninterrupted."""
    out = str(tmp_path_factory.mktemp('reference'))
    run_training(training_argv(data8, out))
    return out


def test_two_processes_through_the_launcher_match_one_process(reference, data8, tmp_path):
    out = str(tmp_path / 'two')
    argv = training_argv(data8, out, '--batch_size_per_gpu', '2')
    result = subprocess.run([sys.executable, 'main_esvit_mnodes.py', '--num_gpus_per_node', '2'] + argv, cwd=ROOT,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '--standalone' in result.stdout.splitlines()[0]
    ckpt = torch.load(os.path.join(out, 'checkpoint.pth'), weights_only=True)
    assert ckpt['args']['world_size'] == 2
    assert_same_training(out, reference)


def test_gradient_accumulation_matches_the_double_batch(reference, data8, tmp_path):
    out = str(tmp_path / 'accum')
    run_training(training_argv(data8, out, '--batch_size_per_gpu', '2', '--accum_iter', '2'))
    assert_same_training(out, reference)


def test_sigterm_mid_epoch_saves_and_the_same_command_resumes(reference, data8, tmp_path, monkeypatch):
    out = str(tmp_path / 'stopped')
    argv = training_argv(data8, out)
    step = Trainer.step

    def step_receiving_sigterm(self, *micro_batches, epoch, it):
        if it == 2:  # the first step of the second epoch: it still completes
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, *micro_batches, epoch=epoch, it=it)
    monkeypatch.setattr(Trainer, 'step', step_receiving_sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        run_training(argv)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == handler
    ckpt = torch.load(os.path.join(out, 'checkpoint.pth'), weights_only=True)
    assert (ckpt['epoch'], ckpt['epoch_images']) == (1, 4)
    monkeypatch.undo()
    run_training(argv)
    assert_same_training(out, reference)


KILLING_SCRIPT = '''
import os, signal, sys
sys.path.insert(0, {root!r})
import utils
from engine import Trainer, parse_args, train_esvit
step = Trainer.step

def step_or_die(self, *micro_batches, epoch, it):
    if it == 3 and os.environ['RANK'] == '1' and os.environ['TORCHELASTIC_RESTART_COUNT'] == '0':
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, *micro_batches, epoch=epoch, it=it)

Trainer.step = step_or_die
utils.run_main(train_esvit, parse_args())
'''


def test_killed_worker_restarts_from_the_mid_epoch_checkpoint(reference, data8, tmp_path):
    script = tmp_path / 'train_then_die.py'
    script.write_text(KILLING_SCRIPT.format(root=str(ROOT)))
    out = str(tmp_path / 'killed')
    argv = training_argv(data8, out, '--batch_size_per_gpu', '2', '--saveckp_iters', '1')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', **main_esvit_mnodes.TORCHRUN_ENV}
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone',
                             '--max-restarts=1', str(script)] + argv, cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Resumed from' in result.stdout and 'at epoch 1, image 4 of the epoch' in result.stdout
    assert_same_training(out, reference, compare_losses=False)  # the killed worker's last losses were not flushed
