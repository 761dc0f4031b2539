"""Launch EsViT pretraining on one node of a (multi-node) job: torch.distributed.run with a c10d rendezvous.

    python main_esvit_mnodes.py --num_nodes 2 --num_gpus_per_node 16 --node_rank 0 --master_addr node0 \\
        --data_path imagenet/train --output_dir out --arch swin_small --cfg experiments/...yaml ...

Run it once on every node. Every argument that is not one of this launcher's is forwarded unchanged to
main_esvit.py, trailing ``KEY VALUE`` config overrides included (and checked by main_esvit's parser here, before
anything starts). The node count, node rank and rendezvous address come from the flags, else from the
environment: ``MASTER_ADDR``/``MASTER_PORT``/``NODE_RANK``, OpenMPI (``OMPI_COMM_WORLD_SIZE``/``_RANK``: one
launcher process per node, as the original) or SLURM (``SLURM_NNODES``/``SLURM_NODEID``/``SLURM_JOB_NODELIST``:
``srun --ntasks-per-node=1``). Node 0 hosts the rendezvous store; one node runs ``--standalone``.
``--max_restarts N`` restarts all workers (from checkpoint.pth) after a failure; ``--dry_run`` prints the
command (with the environment it sets) instead of running it.
"""
import argparse
import os
import re
import shlex
import sys

import torch

import utils
from engine import parse_args as parse_training_args

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PORT = 29500
# torchrun's restarts reuse the rendezvous TCPStore by default, and its stale keys can give the restarted
# workers the previous round's gloo / NCCL addresses (pytorch/pytorch#135712): a new store per round instead
TORCHRUN_ENV = {'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'}


def get_args_parser():
    p = argparse.ArgumentParser('EsViT multi-node launcher', allow_abbrev=False, add_help=False,
                                formatter_class=utils.HelpFormatter)
    p.add_argument('--num_nodes', default=None, type=int,
                   help='nodes of the job (default: OMPI_COMM_WORLD_SIZE, SLURM_NNODES, else 1)')
    p.add_argument('--num_gpus_per_node', default=None, type=int,
                   help='training processes on this node (default: the visible GPUs, 1 without one)')
    p.add_argument('--node_rank', default=None, type=int,
                   help='this node in [0, num_nodes) (default: NODE_RANK, OMPI_COMM_WORLD_RANK, SLURM_NODEID); '
                        'node 0 hosts the rendezvous')
    p.add_argument('--master_addr', default=None, type=str,
                   help="node 0's address (default: MASTER_ADDR, else the first host of SLURM_JOB_NODELIST)")
    p.add_argument('--master_port', default=None, type=int, help=f'default: MASTER_PORT, else {DEFAULT_PORT}')
    p.add_argument('--job_name', default=None, type=str,
                   help='rendezvous id, the same on all nodes (default: SLURM_JOB_ID, else "esvit")')
    p.add_argument('--max_restarts', default=0, type=int,
                   help='restarts of all workers after a worker failure; they resume from checkpoint.pth')
    p.add_argument('--shutdown_timeout', default=120, type=int,
                   help='seconds the workers get on SIGTERM / SIGINT to end their step and save a checkpoint')
    p.add_argument('--dry_run', action='store_true', help='print the command instead of running it')
    p.add_argument('-h', '--help', action='store_true', help="this help, then main_esvit.py's")
    return p


def first_slurm_host(nodelist):
    """The first host of a SLURM node list: 'gpu-[003-005,9],cpu1' -> 'gpu-003'."""
    match = re.match(r'([^,\[]+)(?:\[([^,\]-]+))?', nodelist)
    if not match:
        raise utils.UserError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}: set --master_addr")
    return match.group(1) + (match.group(2) or '')


def from_environment(value, flag, *names, convert=str):
    """``value`` if given, else the first of the environment variables ``names`` that is set (or None)."""
    if value is not None:
        return value
    for name in names:
        if os.environ.get(name):
            try:
                return convert(os.environ[name])
            except ValueError:
                raise utils.UserError(f"{name}={os.environ[name]!r} is not a valid {flag}") from None
    return None


def resolve_topology(args):
    """Fill num_nodes, num_gpus_per_node, node_rank, master_addr, master_port and job_name."""
    launched_nodes = from_environment(None, '--num_nodes', 'OMPI_COMM_WORLD_SIZE', 'SLURM_NNODES', convert=int)
    if args.num_nodes is not None and launched_nodes is not None and args.num_nodes != launched_nodes:
        raise utils.UserError(f"--num_nodes {args.num_nodes}, but the job launched {launched_nodes} launcher "
                              f"processes (OMPI_COMM_WORLD_SIZE / SLURM_NNODES): run one launcher per node")
    args.num_nodes = args.num_nodes or launched_nodes or 1
    if args.num_gpus_per_node is None:
        args.num_gpus_per_node = max(torch.cuda.device_count(), 1)
    if args.num_nodes < 1 or args.num_gpus_per_node < 1:
        raise utils.UserError(f"--num_nodes {args.num_nodes} and --num_gpus_per_node {args.num_gpus_per_node} "
                              f"must be at least 1")
    if args.num_nodes == 1:
        return args
    args.node_rank = from_environment(args.node_rank, '--node_rank', 'NODE_RANK', 'OMPI_COMM_WORLD_RANK',
                                      'SLURM_NODEID', convert=int)
    if args.node_rank is not None and not 0 <= args.node_rank < args.num_nodes:
        raise utils.UserError(f"--node_rank {args.node_rank} is not in [0, {args.num_nodes})")
    args.master_addr = from_environment(args.master_addr, '--master_addr', 'MASTER_ADDR')
    if args.master_addr is None and os.environ.get('SLURM_JOB_NODELIST'):
        args.master_addr = first_slurm_host(os.environ['SLURM_JOB_NODELIST'])
    if args.master_addr is None:
        raise utils.UserError("a multi-node run needs node 0's address: --master_addr or MASTER_ADDR")
    args.master_port = from_environment(args.master_port, '--master_port', 'MASTER_PORT', convert=int) or DEFAULT_PORT
    args.job_name = from_environment(args.job_name, '--job_name', 'SLURM_JOB_ID') or 'esvit'
    return args


def torchrun_command(args, training_args):
    """The torch.distributed.run command line of this node."""
    command = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={args.num_gpus_per_node}',
               f'--max_restarts={args.max_restarts}', f'--shutdown_timeout={args.shutdown_timeout}']
    if args.num_nodes == 1:
        command.append('--standalone')
    else:
        command += [f'--nnodes={args.num_nodes}', '--rdzv_backend=c10d',
                    f'--rdzv_endpoint={args.master_addr}:{args.master_port}', f'--rdzv_id={args.job_name}']
        if args.node_rank is not None:  # else torch guesses the host from the hostname
            command.append(f'--rdzv_conf=is_host={str(args.node_rank == 0).lower()}')
    return command + [os.path.join(HERE, 'main_esvit.py')] + training_args


def launch(argv):
    """Print this node's command and become it (only print it with --dry_run)."""
    parser = get_args_parser()
    args, training_args = parser.parse_known_args(argv)
    if args.help:
        parser.print_help()
        print()
        parse_training_args(['--help'])
    parse_training_args(training_args)  # a misspelt or invalid flag stops here, on every node
    command = torchrun_command(resolve_topology(args), training_args)
    env = {name: os.environ.get(name, value) for name, value in TORCHRUN_ENV.items()}
    print(shlex.join([f'{name}={value}' for name, value in env.items()] + command), flush=True)
    if not args.dry_run:
        os.execve(command[0], command, {**os.environ, **env})


if __name__ == '__main__':
    utils.run_main(launch, sys.argv[1:])
