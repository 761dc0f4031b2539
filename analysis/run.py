"""What run_analysis.py does: attention pictures and token correspondences of one image, and the correspondence
score over a folder, for a frozen backbone. ``analyze(args)`` with run_analysis.py's arguments.

Pictures of one image go to OUTPUT_DIR/<image name>/ with an index.html (and index.json) listing them; the
correspondence score goes to OUTPUT_DIR/<data folder name>/measure_correspondence.json.
"""
import html
import json
import os

import torch
import torchvision.transforms.functional as TF

import utils
from datasets import WorkerLoader, build_dataset, normalize
from datasets.folder import DECODE_ERRORS, load_rgb
from evaluation import build_frozen_backbone, model_config
from .attention import attention_views, block_attentions
from .correspondence import (FlipPair, feature_norm_map, match_tokens, measure_correspondence, network_input,
                             pair_status, random_view_pair, region_features, token_centres, top_pairs)
from .drawing import block_figure, correspondence_figure, feature_norm_figure, save_figure

DEFAULT_QUERY_POINTS = [(0.5, 0.5), (0.3, 0.3), (0.7, 0.7)]


# ---------------------------------------------------------------------------------------------------------
class FigureIndex:
    """index.json and index.html of the pictures in one folder; entries of earlier runs are kept."""

    def __init__(self, folder):
        self.folder = folder
        self.json_path = os.path.join(folder, 'index.json')
        self.entries = {}
        if os.path.isfile(self.json_path):
            with open(self.json_path) as f:
                self.entries = {entry['file']: entry for entry in json.load(f)}

    def add(self, fig_or_none, name, section, title):
        """Save ``fig_or_none`` (a matplotlib Figure, or None when the file is already written) as ``name``."""
        if fig_or_none is not None:
            save_figure(fig_or_none, os.path.join(self.folder, name))
        self.entries[name] = dict(file=name, section=section, title=title)

    def write(self):
        entries = sorted(self.entries.values(), key=lambda e: (e['section'], e['file']))
        utils.save_json(entries, self.json_path)
        parts = ['<!doctype html><meta charset="utf-8"><title>EsViT analysis</title>',
                 '<style>body{font-family:sans-serif} img{max-width:100%}</style>']
        for section in sorted({e['section'] for e in entries}):
            parts.append(f'<h2>{html.escape(section)}</h2>')
            for e in (e for e in entries if e['section'] == section):
                parts.append(f'<figure><img src="{html.escape(e["file"])}"><figcaption>{html.escape(e["file"])}: '
                             f'{html.escape(e["title"])}</figcaption></figure>')
        with open(os.path.join(self.folder, 'index.html'), 'w') as f:
            f.write('\n'.join(parts) + '\n')
        print(f"Wrote {len(entries)} pictures, listed in {os.path.join(self.folder, 'index.html')}")


def load_image(path, option):
    if not path or not os.path.isfile(path):
        raise utils.UserError(f"{option} {path!r} is not an image file" if path else f"{option} is required")
    try:
        return load_rgb(path)
    except DECODE_ERRORS as e:
        raise utils.UserError(f"cannot read {option} {path}: {e}") from None


# ---------------------------------------------------------------------------------------------------------
def visualize_attention(backbone, image, args, index):
    """Per block of the last --n_last_blocks: a heads figure and a mask figure per query token, whole map and
    global token (see :func:`analysis.attention.attention_views`)."""
    pixels = network_input(image, args.image_size)
    batch = normalize(pixels)[None].to(args.device)
    picture = pixels.permute(1, 2, 0).numpy()
    if not hasattr(backbone, 'forward_attention_maps'):
        print(f"{args.arch or type(backbone).__name__} has no attention maps (a convolutional backbone): "
              f"drawing the norm of its last-stage features instead")
        fig = feature_norm_figure(picture, feature_norm_map(backbone, batch),
                                  f"{type(backbone).__name__}: no attention, last-stage feature norms")
        index.add(fig, 'feature_norm.png', 'attention', 'no attention: L2 norm of each last-stage feature')
        return
    for block in block_attentions(backbone, batch, n_last=args.n_last_blocks):
        for view in attention_views(block, args.query_points, args.image_size):
            slug, description = view[:2]
            name = f"attention_{block.slug}_{slug}"
            index.add(block_figure(picture, block, view), f"{name}.png", 'attention',
                      f"{block.name} ({block.layout}): {description}, heads by entropy")
            index.add(block_figure(picture, block, view, args.threshold),
                      f"{name}_mask{round(args.threshold * 100)}.png", 'attention',
                      f"{block.name}: {description}, tokens holding {args.threshold:.0%} of each head's attention")


def visualize_correspondence(backbone, image, image2, args, index):
    """The --top_k most similar (view-1 token, best view-2 token) pairs drawn between the two views."""
    folder = os.path.join(index.folder, f"seed{args.seed}")
    os.makedirs(folder, exist_ok=True)
    views = random_view_pair(image, args.image_size, image2)
    features1, features2 = (region_features(backbone, normalize(view)[None].to(args.device))
                            for view in (views.view1, views.view2))
    grid = tuple(features1.shape[1:3])
    similarity, match = match_tokens(features1.flatten(1, 2), features2.flatten(1, 2))
    similarity, match = similarity[0].cpu(), match[0].cpu()
    pairs = top_pairs(similarity[None], args.top_k)[0]
    matched = match[pairs]
    matched_rc = torch.stack([matched // grid[1], matched % grid[1]], dim=1)
    status = pair_status(matched_rc, views.true_tokens(grid), pairs)
    centres = token_centres(grid, args.image_size)
    judged = [s for s in status if s is not None]
    if image2 is not None:
        summary = "second image: true positions unknown"
    else:
        summary = f"{sum(judged)}/{len(judged)} within one token of the true position"
        if len(judged) < len(status):
            summary += f", {len(status) - len(judged)} start outside view 2"
    for name, view in (('view1.png', views.view1), ('view2.png', views.view2)):
        TF.to_pil_image(view).save(os.path.join(folder, name))
        index.add(None, f"seed{args.seed}/{name}", 'correspondence', f"{name[:-4]} ({args.image_size} px)")
    fig = correspondence_figure(views.view1.permute(1, 2, 0).numpy(), views.view2.permute(1, 2, 0).numpy(),
                                centres[pairs], centres[matched], status,
                                f"top {len(pairs)} of {grid[0]}x{grid[1]} tokens: {summary}")
    index.add(fig, f"seed{args.seed}/correspondence{args.seed}.png", 'correspondence',
              f"the {len(pairs)} most similar token pairs (green: within one token of the true position, red: "
              f"not, yellow: unknown); {summary}")
    record = dict(grid=grid, flipped=views.flipped, crop=views.crop, summary=summary, pairs=[
        dict(view1=[p // grid[1], p % grid[1]], view2=rc, similarity=similarity[p].item(), correct=s)
        for p, rc, s in zip(pairs.tolist(), matched_rc.tolist(), status)])
    utils.save_json(record, os.path.join(folder, 'correspondence.json'))
    print(f"Correspondence (seed {args.seed}): {summary}")


def measurement_folder(data_path):
    """The original measured on DATA/val: use that subfolder when there is one."""
    val = os.path.join(data_path, 'val')
    return val if os.path.isdir(val) else data_path


def run_measure_correspondence(backbone, args):
    folder = measurement_folder(args.data_path)
    dataset = build_dataset(folder, FlipPair(args.image_size))
    loader = WorkerLoader(dataset, batch_size=args.batch_size_per_gpu, num_workers=args.num_workers, shuffle=False,
                          generator=torch.Generator().manual_seed(args.seed), pin_memory=args.device.type == 'cuda')
    print(f"Measuring the correspondence on {len(dataset)} images of {folder}")
    results = measure_correspondence(backbone, loader, args.device, top_k=args.top_k, max_images=args.max_images)
    for record in results['per_image']:
        record['path'] = dataset.describe(dataset.samples[record['index']][0])
    out_dir = os.path.join(args.output_dir, os.path.basename(os.path.normpath(args.data_path)))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'measure_correspondence.json')
    utils.save_json(results, path)
    print(f"Correspondence over {results['images']} images (top {results['top_k']} pairs each): accuracy "
          f"{results['accuracy']:.4f}, position error {results['position_error_px']:.2f} px, similarity "
          f"{results['similarity']:.4f}; written to {path}")
    return results


def check_args(args):
    if not (args.vis_attention or args.vis_correspondence or args.measure_correspondence):
        raise utils.UserError("nothing to do: pass --vis_attention True, --vis_correspondence True and/or "
                              "--measure_correspondence True")
    if not 0 < args.threshold <= 1:
        raise utils.UserError(f"--threshold {args.threshold} must be in (0, 1]")
    if args.measure_correspondence and not args.data_path:
        raise utils.UserError("--measure_correspondence needs --data_path (an ImageFolder)")


def analyze(args):
    check_args(args)
    args.query_points = args.query_points or DEFAULT_QUERY_POINTS
    if args.vis_attention or args.vis_correspondence:
        image = load_image(args.image_path, '--image_path')
        image2 = load_image(args.image_path2, '--image_path2') if args.image_path2 else None
    args.device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    utils.fix_random_seeds(args.seed)
    config = model_config(args)
    checkpoint_key = args.checkpoint_key if args.learning == 'ssl' else 'model'
    backbone = build_frozen_backbone(config, args.pretrained_weights, checkpoint_key).to(args.device)

    if args.vis_attention or args.vis_correspondence:
        folder = os.path.join(args.output_dir, os.path.splitext(os.path.basename(args.image_path))[0])
        os.makedirs(folder, exist_ok=True)
        index = FigureIndex(folder)
        TF.to_pil_image(network_input(image, args.image_size)).save(os.path.join(folder, 'image.png'))
        index.add(None, 'image.png', 'attention', f"the input, {args.image_size} px")
        with torch.no_grad():
            if args.vis_attention:
                visualize_attention(backbone, image, args, index)
            if args.vis_correspondence:
                visualize_correspondence(backbone, image, image2, args, index)
        index.write()
    if args.measure_correspondence:
        run_measure_correspondence(backbone, args)
