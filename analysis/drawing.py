"""Pictures of attention maps and correspondences (matplotlib's object API, no pyplot state: safe to call
from a training loop).

Figures are laid out in pixels so that their PNG size is known: an attention figure is a grid of square
panels of ``panel`` pixels with a title band above each, a header band on top and a key band at the bottom (a
colour bar, or what a mask's tint means; see :func:`panel_grid_size`); a correspondence figure is exactly the
two views side by side above a caption band and a legend band.
"""
import math
import textwrap

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from datasets import denormalize
from .attention import attention_views, block_attentions, entropy, entropy_order, mass_masks
from .correspondence import feature_norm_map

DPI = 100
TITLE_PX = 18
HEADER_PX = 34  # two lines of the figure title
MAX_COLUMNS = 6
KEY_PX = 44  # the colour bar or the mask legend below the panels
GAP_PX = 8  # between the two views of a correspondence figure
CAPTION_PX = 16
LEGEND_PX = 18  # what the colours of a correspondence figure mean
MIN_VIEW_PX = 320  # views of a correspondence figure are shown at least this large
PAIR_COLOURS = {True: 'lime', False: 'red', None: 'yellow'}
PAIR_MEANING = {True: 'matched token at the true position', False: 'matched elsewhere',
                None: 'no known true position'}
MASK_COLOUR = (0.1, 0.9, 1.0)
SUPPORT_EPS = 1e-30  # probabilities below this are keys a query cannot attend to (masked or other windows)


def upsample(maps, size):
    """heads x h x w -> heads x S x S (nearest: one flat square per token)."""
    return F.interpolate(maps[None].float(), size=(size, size), mode='nearest')[0].numpy()


def panel_grid_size(num_panels, panel):
    """(width, height) in pixels of an attention figure with ``num_panels`` panels of ``panel`` pixels."""
    columns = min(num_panels, MAX_COLUMNS)
    rows = -(-num_panels // columns)
    return columns * panel, HEADER_PX + rows * (TITLE_PX + panel) + KEY_PX


def panel_axes(fig, num_panels, panel, title):
    """Square axes placed on an exact pixel grid, and the header title."""
    width, height = panel_grid_size(num_panels, panel)
    fig.set_size_inches(width / DPI, height / DPI)
    fig.text(0.5, 1 - HEADER_PX / 2 / height, textwrap.fill(title, width // 6), ha='center', va='center', fontsize=9)
    columns = min(num_panels, MAX_COLUMNS)
    axes = []
    for i in range(num_panels):
        row, col = divmod(i, columns)
        top = HEADER_PX + row * (TITLE_PX + panel) + TITLE_PX
        ax = fig.add_axes([col * panel / width, 1 - (top + panel) / height, panel / width, panel / height])
        ax.set_axis_off()
        axes.append(ax)
    return axes


def colour_key(fig, label, vmin=0., vmax=1.):
    """A horizontal colour bar of the heat maps' 'inferno' scale in the key band."""
    width, height = (fig.get_size_inches() * DPI).tolist()
    bar = fig.add_axes([0.2, 14 / height, 0.6, 8 / height])  # ticks below, the label above, within KEY_PX
    colour_bar = fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap='inferno'), cax=bar, orientation='horizontal')
    colour_bar.ax.tick_params(labelsize=7, length=2, pad=1)
    colour_bar.set_label(label, fontsize=7, labelpad=1)
    colour_bar.ax.xaxis.set_label_position('top')


def mask_key(fig, threshold_label):
    """What the tint and the dimming of a mask figure mean, in the key band."""
    fig.legend(handles=[Patch(facecolor=MASK_COLOUR, alpha=0.6, edgecolor=MASK_COLOUR, label=threshold_label),
                        Patch(facecolor=(0.35, 0.35, 0.35), label='dimmed: tokens the query cannot attend to')],
               loc='lower center', ncol=1, fontsize=7, frameon=False, borderaxespad=0.2, handlelength=1.5)


def caption(ax, text):
    """``text`` in the title band above ``ax`` (a plain text: matplotlib's titles are slow to lay out)."""
    ax.text(0.5, 1.0, text, transform=ax.transAxes, ha='center', va='bottom', fontsize=8)


def dimmed(image, support):
    """``image`` (S x S x 3) darkened outside ``support`` (S x S bool: the keys the query can attend to)."""
    return image * (0.35 + 0.65 * support[..., None])


def draw_heat(ax, image, heat, label):
    """``image`` with ``heat`` (S x S, >= 0) on top, scaled to its maximum; keys outside the attended set dimmed."""
    support = heat > SUPPORT_EPS
    ax.imshow(dimmed(image, support))
    ax.imshow(np.ma.masked_where(~support, heat / max(heat.max(), SUPPORT_EPS)), cmap='inferno', alpha=0.6,
              vmin=0, vmax=1)
    caption(ax, label)


def draw_mask(ax, image, support, mask, label, colour=MASK_COLOUR):
    """``image`` dimmed outside ``support``, with the boolean ``mask`` (S x S) filled in ``colour`` and outlined."""
    ax.imshow(dimmed(image, support))
    overlay = np.zeros(mask.shape + (4,))
    overlay[mask] = (*colour, 0.45)
    ax.imshow(overlay)
    if mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1)
    caption(ax, label)


def mark(ax, point, size):
    """A query marker at ``point`` = (y, x) in pixels."""
    ax.plot([point[1]], [point[0]], marker='o', markersize=max(4, size / 40), markerfacecolor='cyan',
            markeredgecolor='black')


def attention_heads_figure(image, maps, order, entropies, title, marker=None, masks=None, panel=None,
                           mask_label='kept: the tokens holding the mask\'s share of the attention'):
    """The input (with the query ``marker`` (y, x) px), the mean over heads, then the heads in ``order`` (maps
    heads x h x w with their ``entropies`` in bits), as heat maps with a colour bar or, with ``masks`` (heads x
    h x w bool), as thresholded masks whose tint ``mask_label`` explains."""
    size = image.shape[0]
    panel = panel or max(size, 160)
    fig = Figure(dpi=DPI)
    FigureCanvasAgg(fig)
    axes = panel_axes(fig, len(order) + 2, panel, title)
    axes[0].imshow(image)
    caption(axes[0], 'input')
    if marker is not None:
        mark(axes[0], marker, size)
    heat = upsample(maps, size)
    if masks is None:
        draw_heat(axes[1], image, heat.mean(axis=0), 'mean of heads')
    else:
        masks = upsample(masks.float(), size) > 0.5
        support = heat > SUPPORT_EPS
        draw_mask(axes[1], image, support.any(axis=0), masks.mean(axis=0) >= 0.5, 'majority of head masks')
    for ax, head in zip(axes[2:], order):
        label = f"head {head}: {entropies[head]:.2f} bits"
        if masks is None:
            draw_heat(ax, image, heat[head], label)
        else:
            draw_mask(ax, image, support[head], masks[head], label)
    if marker is not None:
        for ax in axes[1:]:
            mark(ax, marker, size)
    if masks is None:
        colour_key(fig, "attention, as a fraction of each panel's largest weight")
    else:
        mask_key(fig, mask_label)
    return fig


def feature_norm_figure(image, norms, title):
    """The input and its feature-norm map (h x w) side by side."""
    size = image.shape[0]
    fig = Figure(dpi=DPI)
    FigureCanvasAgg(fig)
    axes = panel_axes(fig, 2, max(size, 160), title)
    axes[0].imshow(image)
    caption(axes[0], 'input')
    axes[1].imshow(image)
    norm_map = upsample(norms[None], size)[0]
    axes[1].imshow(norm_map, cmap='inferno', alpha=0.6)
    caption(axes[1], 'feature norm')
    colour_key(fig, 'L2 norm of the last-stage feature', float(norm_map.min()), float(norm_map.max()))
    return fig


def correspondence_figure_size(size):
    """(width, height) in pixels of the correspondence figure of two S x S views (shown at least 256 px)."""
    side = max(size, MIN_VIEW_PX)
    return 2 * side + GAP_PX, side + CAPTION_PX + LEGEND_PX


def label_offsets(points, spacing=11):
    """(dx, dy) pixel offsets for a label beside each point so that no two labels overlap where avoidable:
    the first of a few places around the point that keeps ``spacing`` px from the labels placed before."""
    placed, offsets = [], []
    for x, y in points:
        for dx, dy in ((4, -4), (4, 11), (-12, -4), (-12, 11), (4, -14), (-12, -14)):
            if all(abs(x + dx - px) >= spacing or abs(y + dy - py) >= spacing for px, py in placed):
                break
        placed.append((x + dx, y + dy))
        offsets.append((dx, dy))
    return offsets


def correspondence_figure(view1, view2, points1, points2, status, caption):
    """The two views (S x S x 3) side by side above a ``caption`` band and a legend band
    (:func:`correspondence_figure_size`), with a line per pair from ``points1`` to ``points2`` (k x 2 (y, x) px of
    the views), numbered by rank at its view-1 end; ``status`` per pair: True (at the true position, green),
    False (not, red) or None (unknown, yellow)."""
    size = view1.shape[0]
    width, height = correspondence_figure_size(size)
    side = height - CAPTION_PX - LEGEND_PX
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_axis_off()
    ax.imshow(view1, extent=(0, side, side, 0))
    ax.imshow(view2, extent=(side + GAP_PX, width, side, 0))
    scale = side / size
    starts = [(x * scale, y * scale) for y, x in points1.tolist()]
    for number, ((x1, y1), (y2, x2), correct, (dx, dy)) in enumerate(zip(starts, points2.tolist(), status,
                                                                         label_offsets(starts))):
        y2, x2 = y2 * scale, x2 * scale + side + GAP_PX
        ax.plot([x1, x2], [y1, y2], '-', color=PAIR_COLOURS[correct], linewidth=1.2, marker='o', markersize=5,
                markeredgecolor='black')
        ax.text(x1 + dx, y1 + dy, str(number), color='black', fontsize=7, va='center',
                bbox=dict(boxstyle='round,pad=0.1', facecolor=PAIR_COLOURS[correct], edgecolor='none', alpha=0.85))
    ax.text(4, side + CAPTION_PX / 2, caption, fontsize=7, va='center')
    shown = [key for key in PAIR_COLOURS if key in status]
    ax.legend(handles=[Patch(color=PAIR_COLOURS[key], label=PAIR_MEANING[key]) for key in shown]
              + [Patch(color='white', label='numbers: rank by similarity (0: most similar)')],
              loc='lower left', bbox_to_anchor=(0, 0), bbox_transform=fig.transFigure, ncol=len(shown) + 1,
              fontsize=7, frameon=False, borderaxespad=0.1, handlelength=1, columnspacing=1)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    return fig


def figure_to_array(fig):
    """H x W x 3 uint8 rendering of ``fig``."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig, path):
    fig.savefig(path, dpi=DPI)


def block_figure(image, block, view, threshold=None):
    """The heads figure of one of :func:`~analysis.attention.attention_views`; thresholded masks with
    ``threshold``."""
    slug, description, maps, marker = view
    entropies = entropy(maps).tolist()
    masks = mass_masks(maps, threshold) if threshold is not None else None
    kind = f"top {threshold:.0%} of the mass" if threshold is not None else "heads by entropy"
    attended = int((maps > SUPPORT_EPS).any(dim=0).sum())
    title = (f"{block.name} ({block.layout}): {description}; {kind} "
             f"(uniform over the {attended} attended tokens: {math.log2(attended):.2f} bits)")
    mask_label = (f"kept (tinted): the fewest tokens holding {threshold:.0%} of each head's attention; the rest "
                  f"dropped" if threshold is not None else None)
    return attention_heads_figure(image, maps, entropy_order(maps), entropies, title, marker=marker, masks=masks,
                                  mask_label=mask_label)


@torch.no_grad()
def attention_figure(backbone, image):
    """H x W x 3 uint8 picture of the last block's attention on ``image`` (3 x S x S or 1 x 3 x S x S,
    normalised as the training inputs): the global token's attention (ViL; a ViT's [CLS] token), else the
    attention received over the whole map when one window covers it, else the centre token's; the feature-norm
    map of backbones without attention. The backbone is evaluated in eval mode and its mode restored.
    For TensorBoard::

        writer.add_image('attention', attention_figure(teacher_backbone, image), epoch, dataformats='HWC')
    """
    was_training = backbone.training
    backbone.eval()
    try:
        device = next(backbone.parameters()).device
        image = image.reshape(1, *image.shape[-3:]).to(device)
        picture = denormalize(image[0]).permute(1, 2, 0).float().cpu().numpy()  # S x S x 3 in [0, 1]
        size = image.shape[-1]
        if hasattr(backbone, 'forward_attention_maps'):
            block = block_attentions(backbone, image, n_last=1)[-1]
            fig = block_figure(picture, block, attention_views(block, [(0.5, 0.5)], size)[-1])
        else:
            fig = feature_norm_figure(picture, feature_norm_map(backbone, image),
                                      f"{type(backbone).__name__}: no attention, last-stage feature norms")
    finally:
        backbone.train(was_training)
    return figure_to_array(fig)
