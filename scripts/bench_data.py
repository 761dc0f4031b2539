"""Time the data pipeline as one DataLoader worker runs it: JPEG decode + DINO multi-crop (2 x 224 + 8 x 96 by
default) + collate, one process and one thread, on real photos at their full size, for this project and for
the original's ``DataAugmentationDINO`` (from a checkout of microsoft/esvit), interleaved round by round.

    python scripts/bench_data.py --original_repo /tmp/orig_esvit --rounds 3 --json data.json

Three pipelines: ``ours`` (every step in the worker, `--colour_augment_on workers`), ``ours_device`` (the
worker's share with `--colour_augment_on device`: decode, crop, resize, flip and the draws, uint8 out; the
colour steps of its batches, ``datasets.DeviceColour``, are timed apart on this CPU, one thread, as
``device_stage``: on a GPU they run on the GPU) and ``original``.

The photos are the public-domain colour photographs that scikit-image ships, kept as full-size JPEG files in
scripts/bench_photos/ (its README names their sources), so the benchmark needs no extra package.
This project's side decodes as its datasets do (``datasets.folder.load_image`` with the transform's
``decode_size``: reduced-size JPEG decoding where no crop needs the full size); the original's as
torchvision's ImageFolder does (``Image.open(path).convert('RGB')``). Each implementation runs in its own
process (both have a top-level ``datasets`` package). Reported: images per second of process CPU time (per
core; less sensitive to other loads on the machine than wall time) and of wall time, the median over rounds.
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTO_DIR = os.path.join(ROOT, 'scripts', 'bench_photos')
IMPLEMENTATIONS = ('ours', 'ours_device', 'original')


def get_args(argv=None):
    p = argparse.ArgumentParser('EsViT data-pipeline benchmark (decode + multi-crop + collate, one thread)',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--original_repo', default='', help='a checkout of microsoft/esvit (empty: time ours only)')
    p.add_argument('--photo_dir', default=PHOTO_DIR, help='the JPEG photos decoded and augmented')
    p.add_argument('--global_size', type=int, default=224, help='side of the 2 global crops')
    p.add_argument('--local_size', type=int, default=96, help='side of the local crops')
    p.add_argument('--local_crops_number', type=int, default=8, help='local crops per image')
    p.add_argument('--global_crops_scale', type=float, nargs=2, default=(0.4, 1.0),
                   help='area range of the global crops, as main_esvit.py')
    p.add_argument('--local_crops_scale', type=float, nargs=2, default=(0.05, 0.4),
                   help='area range of the local crops, as main_esvit.py')
    p.add_argument('--batch_size', type=int, default=6, help='images per collated batch')
    p.add_argument('--passes', type=int, default=2, help='passes over the photos per round')
    p.add_argument('--rounds', type=int, default=3, help='interleaved rounds of ours and the original (medians)')
    p.add_argument('--json', default='', help='write the results here')
    p.add_argument('--device_stage', default='',
                   help='only time the colour steps of --colour_augment_on device (datasets.DeviceColour) on this '
                        'device (e.g. cuda), on batches of --batch_size drawn from the photos (scripts/gpu_check.sh)')
    p.add_argument('--worker', choices=IMPLEMENTATIONS,
                   help='internal: time one implementation in this process (the rounds run each in a fresh one)')
    return p.parse_args(argv)


def photo_paths(photo_dir):
    """The .jpg files of ``photo_dir``, sorted."""
    paths = sorted(glob.glob(os.path.join(photo_dir, '*.jpg')))
    if not paths:
        sys.exit(f"no .jpg photos in --photo_dir {photo_dir}")
    return paths


def pipeline(args):
    """(load(path) -> PIL image, transform) of the implementation ``args.worker``."""
    from PIL import Image
    if args.worker.startswith('ours'):
        sys.path.insert(0, ROOT)
        from datasets import DataAugmentationDINO
        from datasets.folder import load_image
        transform = DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale, [args.local_crops_number],
                                         [args.local_size], args.global_size,
                                         colour_on_device=args.worker == 'ours_device')
        return (lambda path: load_image(path, transform.decode_size)), transform
    sys.path.insert(0, os.path.abspath(args.original_repo))
    from datasets.build import DataAugmentationDINO  # the original's (its datasets/build.py)
    if args.global_size != 224:
        sys.exit("the original's DataAugmentationDINO has 224-px global crops only")
    transform = DataAugmentationDINO(tuple(args.global_crops_scale), tuple(args.local_crops_scale),
                                     [args.local_crops_number], [args.local_size])
    return (lambda path: Image.open(path).convert('RGB')), transform  # torchvision's ImageFolder loader


def run_worker(args):
    """One round in this process: decode + transform + collate of every photo ``args.passes`` times (and, for
    ours_device, the device stage of each batch on this CPU, timed apart)."""
    import torch
    torch.set_num_threads(1)
    load, transform = pipeline(args)
    paths = photo_paths(args.photo_dir)
    torch.manual_seed(0)
    keep = args.worker == 'ours_device'  # its batches go through the device stage afterwards; others are dropped
    warm_up = torch.utils.data.default_collate([(transform(load(path)), 0) for path in paths[:2]])
    batches = []
    queue = paths * args.passes
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for start in range(0, len(queue), args.batch_size):
        paths_of_batch = queue[start:start + args.batch_size]
        batch = torch.utils.data.default_collate([(transform(load(path)), 0) for path in paths_of_batch])
        if keep:
            batches.append(batch)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    result = {'images': len(queue), 'cpu_s': cpu, 'wall_s': wall}
    if keep:
        from datasets import DeviceColour
        colour = DeviceColour('cpu')
        colour(warm_up[0])  # warm-up
        cpu0 = time.process_time()
        for crops, _ in batches:
            colour(crops)
        result['device_stage_cpu_s'] = time.process_time() - cpu0
    print(json.dumps(result))


def time_device_stage(args):
    """Images per second of DeviceColour on ``args.device_stage``, batches of ``args.batch_size`` images."""
    import torch
    args.worker = 'ours_device'
    load, transform = pipeline(args)
    paths = photo_paths(args.photo_dir)
    torch.manual_seed(0)
    images = [load(paths[i % len(paths)]) for i in range(args.batch_size)]
    batch, _ = torch.utils.data.default_collate([(transform(image), 0) for image in images])
    from datasets import DeviceColour
    colour, device = DeviceColour(args.device_stage), torch.device(args.device_stage)
    batch = [(pixels.to(device), draws) for pixels, draws in batch]  # timed from device memory, as after the copy
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    colour(batch)  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(args.passes):
        colour(batch)
    sync()
    seconds = (time.perf_counter() - start) / args.passes
    result = {'device': str(device), 'batch_size': args.batch_size,
              'crops': f"2x{args.global_size}+{args.local_crops_number}x{args.local_size}",
              'seconds_per_batch': seconds, 'images_per_s': args.batch_size / seconds}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, 'w') as f:
            f.write(json.dumps(result, indent=1) + '\n')


def main():
    args = get_args()
    if args.worker:
        return run_worker(args)
    if args.device_stage:
        return time_device_stage(args)
    photos = photo_paths(args.photo_dir)
    implementations = IMPLEMENTATIONS if args.original_repo else IMPLEMENTATIONS[:2]
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    runs = {name: [] for name in implementations}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name in implementations:  # interleaved, so that a change of load hits both
            done = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], '--worker', name],
                                  env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{name}: failed\n{done.stderr[-3000:]}")
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {'crops': f"2x{args.global_size}+{args.local_crops_number}x{args.local_size}", 'threads': 1,
              'photos': len(photos), 'load_average_before': load_before,
              'load_average_after': os.getloadavg()}
    for name, rounds in runs.items():
        result[name] = {
            'images_per_cpu_s': statistics.median(r['images'] / r['cpu_s'] for r in rounds),
            'images_per_wall_s': statistics.median(r['images'] / r['wall_s'] for r in rounds),
            'rounds': rounds}
    if 'ours_device' in result:
        result['device_stage'] = {'images_per_cpu_s_on_this_cpu': statistics.median(
            r['images'] / r['device_stage_cpu_s'] for r in runs['ours_device'])}
    if 'original' in result:
        for name in ('ours', 'ours_device'):
            for measure in ('images_per_cpu_s', 'images_per_wall_s'):
                result[f'speedup_{name}_{measure}'] = result[name][measure] / result['original'][measure]
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, 'w') as f:
            f.write(json.dumps(result, indent=1) + '\n')


if __name__ == '__main__':
    main()
