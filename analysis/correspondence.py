"""Token correspondences between two views, from the backbone's last-stage region tokens (what EsViT's
region-level loss matches).

    features = region_features(backbone, images)        # B x h x w x C
    similarity, match = match_tokens(f1, f2)             # per view-1 token: best cosine similarity, its view-2 token
    pairs = top_pairs(similarity, k)                     # the k view-1 tokens with the most similar matches
    scores = pair_scores(match, similarity, pairs, expected, grid, size)  # accuracy, position error (px), similarity
    views = random_view_pair(image, size)                # a full view and a random crop, flip, colour jitter
    loader of FlipPair views -> measure_correspondence(backbone, loader, device)
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

import utils
from datasets import center_view, colour_jitter, to_normalized_tensor

BICUBIC = InterpolationMode.BICUBIC


def network_input(image, size):
    """PIL image (any mode) -> 3 x S x S RGB tensor in [0, 1], resized to a square (as the original);
    ``normalize`` it for the backbone."""
    return TF.to_tensor(TF.resize(image.convert('RGB'), [size, size], interpolation=BICUBIC))


def region_features(backbone, images):
    """B x 3 x S x S (normalised) -> the last-stage region tokens as a square grid, B x h x w x C."""
    _, region = backbone.forward_features(images)  # B x N x C
    B, N, C = region.shape
    side = math.isqrt(N)
    if side * side != N:
        raise utils.UserError(f"the backbone's {N} region tokens do not form a square grid")
    return region.view(B, side, side, C)


@torch.no_grad()
def feature_norm_map(backbone, image):
    """h x w: the L2 norm of each last-stage region token of ``image`` (1 x 3 x S x S), e.g. for a ResNet."""
    return region_features(backbone, image)[0].norm(dim=-1).float().cpu()


def match_tokens(features1, features2):
    """For each token of view 1 (B x L1 x C), its most cosine-similar token of view 2 (B x L2 x C).
    Returns (similarity B x L1, index into view 2 B x L1)."""
    similarity = F.normalize(features1, dim=-1) @ F.normalize(features2, dim=-1).transpose(1, 2)  # B x L1 x L2
    return similarity.max(dim=2)


def top_pairs(similarity, k):
    """B x k view-1 token indices with the most similar matches, most similar first."""
    return similarity.topk(min(k, similarity.shape[1]), dim=1).indices


def token_centres(grid, size):
    """L x 2 pixel coordinates (y, x) of the token centres of an h x w grid over an S x S image."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    return torch.stack([(rows.flatten() + 0.5) * size / h, (cols.flatten() + 0.5) * size / w], dim=1)


def mirrored_index(grid):
    """L: the index of each token of an h x w grid in the horizontally flipped grid, (r, c) -> (r, w-1-c)."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    return (rows * w + (w - 1 - cols)).flatten()


def pair_scores(match, similarity, pairs, expected, grid, size):
    """Per image, over its ``pairs`` (B x k): the fraction matched to the ``expected`` view-2 token (L, per view-1
    token), the mean pixel distance between matched and expected token centres, and the mean similarity.
    Returns three B tensors."""
    centres = token_centres(grid, size).to(match.device)
    matched = match.gather(1, pairs)     # B x k
    wanted = expected.to(match.device)[pairs]  # B x k
    accuracy = (matched == wanted).float().mean(dim=1)
    error = (centres[matched] - centres[wanted]).norm(dim=-1).mean(dim=1)
    return accuracy, error, similarity.gather(1, pairs).mean(dim=1)


def pair_status(matched_rc, truth, pairs):
    """Per pair (view-1 tokens ``pairs`` k, matched view-2 tokens ``matched_rc`` k x 2 (row, col)): whether the
    match is within one token of the true position (``truth`` of :meth:`ViewPair.true_tokens`); None when that
    is unknown (no ``truth``, or the view-1 token lies outside view 2)."""
    if truth is None:
        return [None] * len(pairs)
    true_rc, inside = truth
    near = (matched_rc - true_rc[pairs]).abs().amax(dim=1) <= 1
    return [bool(n) if inside[p] else None for n, p in zip(near.tolist(), pairs.tolist())]


# ---------------------------------------------------------------------------------------------------------
# two views of one image
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ViewPair:
    """Two views (3 x S x S in [0, 1]) and, when view 2 is a crop of view 1's image, the crop (top, left,
    height, width in the original's pixels), the original's (height, width) and whether view 2 is flipped."""
    view1: torch.Tensor
    view2: torch.Tensor
    crop: tuple = None
    source_size: tuple = None
    flipped: bool = False

    def true_tokens(self, grid):
        """L x 2 (row, col) of the view-2 token showing the centre of each view-1 token, and an L bool mask of
        those inside view 2; None when view 2 is another image."""
        if self.crop is None:
            return None
        size = self.view1.shape[-1]
        top, left, height, width = self.crop
        source_h, source_w = self.source_size
        centres = token_centres(grid, size)  # in view 1
        y = (centres[:, 0] * source_h / size - top) * size / height
        x = (centres[:, 1] * source_w / size - left) * size / width
        if self.flipped:
            x = size - x
        inside = (y >= 0) & (y < size) & (x >= 0) & (x < size)
        h, w = grid
        rows = (y * h / size).floor().long().clamp(0, h - 1)
        cols = (x * w / size).floor().long().clamp(0, w - 1)
        return torch.stack([rows, cols], dim=1), inside


def random_view_pair(image, size, second_image=None):
    """View 1: ``image`` resized to size x size. View 2: a random crop of 40-60% of ``second_image`` (default
    ``image``), resized, flipped with probability 0.5 and colour-jittered. Uses torch's global RNG."""
    view1 = network_input(image, size)
    source = (image if second_image is None else second_image).convert('RGB')
    top, left, height, width = T.RandomResizedCrop.get_params(source, scale=(0.4, 0.6), ratio=(3 / 4, 4 / 3))
    view2 = TF.resized_crop(source, top, left, height, width, [size, size], interpolation=BICUBIC)
    flipped = bool(torch.rand(1) < 0.5)
    if flipped:
        view2 = TF.hflip(view2)
    view2 = TF.to_tensor(T.Compose(colour_jitter())(view2))
    if second_image is not None:
        return ViewPair(view1, view2)
    return ViewPair(view1, view2, (top, left, height, width), (source.height, source.width), flipped)


class FlipPair:
    """Dataset transform of --measure_correspondence: PIL image -> (view, the same view flipped and (with
    ``jitter``) colour-jittered), both normalised 3 x S x S. The view is the centre crop of S/224*256 resize."""

    def __init__(self, size, jitter=True):
        self.view = center_view(size)
        self.jitter = T.Compose(colour_jitter()) if jitter else None

    def __call__(self, image):
        view = self.view(image)
        flipped = TF.hflip(view)
        if self.jitter is not None:
            flipped = self.jitter(flipped)
        return to_normalized_tensor(view), to_normalized_tensor(flipped)


@torch.no_grad()
def measure_correspondence(backbone, loader, device, top_k=10, max_images=0):
    """Over ``loader`` batches of ((view, flipped view), target): match each view token to the flipped view,
    keep the ``top_k`` most similar pairs per image and score them against the mirrored positions.

    Returns {'images', 'top_k', 'accuracy', 'position_error_px', 'similarity'} (means over images) and
    'per_image': [{'index', 'accuracy', 'position_error_px', 'similarity'}]."""
    per_image = []
    metric_logger = utils.MetricLogger()
    for (view, flipped), _ in metric_logger.log_every(loader, 20, 'Correspondence:'):
        if max_images:
            view, flipped = view[:max_images - len(per_image)], flipped[:max_images - len(per_image)]
        features1 = region_features(backbone, view.to(device))
        features2 = region_features(backbone, flipped.to(device))
        grid = features1.shape[1:3]
        similarity, match = match_tokens(features1.flatten(1, 2), features2.flatten(1, 2))
        pairs = top_pairs(similarity, top_k)
        scores = pair_scores(match, similarity, pairs, mirrored_index(grid), grid, view.shape[-1])
        for accuracy, error, sim in zip(*(s.tolist() for s in scores)):
            per_image.append(dict(index=len(per_image), accuracy=accuracy, position_error_px=error, similarity=sim))
        metric_logger.update(accuracy=scores[0].mean(), position_error_px=scores[1].mean())
        if max_images and len(per_image) >= max_images:
            break
    if not per_image:
        raise utils.UserError("no images to measure the correspondence on")
    means = {key: sum(r[key] for r in per_image) / len(per_image)
             for key in ('accuracy', 'position_error_px', 'similarity')}
    return dict(images=len(per_image), top_k=top_k, **means, per_image=per_image)
