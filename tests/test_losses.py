"""The EsViT losses against a naive, loop-per-token computation written independently here."""
import math

import pytest
import torch

from engine.losses import DDINOLoss, DINOLoss
from helpers import command, run_training

STUDENT_TEMP = 0.1


def naive_softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def naive_log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def cross_entropy(p, logq):
    return -sum(a * b for a, b in zip(p, logq))


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def naive_teacher_cell(student_box, teacher_box, j, n_s, n_t):
    """The teacher token (row-major on its square grid) whose cell holds student token j's centre on the image,
    or None where the teacher view does not hold it; boxes [top, left, height, width, flipped] in image fractions."""
    g_s, g_t = math.isqrt(n_s), math.isqrt(n_t)
    top, left, height, width, flipped = student_box
    across = (j % g_s + 0.5) / g_s
    y = top + (j // g_s + 0.5) / g_s * height
    x = left + (1 - across if flipped else across) * width
    top, left, height, width, flipped = teacher_box
    down, across = (y - top) / height, (x - left) / width
    across = 1 - across if flipped else across
    if not (0 <= down < 1 and 0 <= across < 1):
        return None
    return int(down * g_t) * g_t + int(across * g_t)


def naive_ddino(s_cls, s_region, s_fea, crop_tokens, t_cls, t_region, t_fea, n_t, batch, temp, center, center_grid,
                dense=True, region_weight=0.5, region_temp=None, boxes=None):
    """Python lists; crop_tokens = token count of each student crop in crop order; region_temp: the region
    teacher's temperature (default ``temp``); boxes (B x V x 5): match by position where the teacher view holds
    the student token's centre."""
    region_temp = temp if region_temp is None else region_temp
    ncrops = len(crop_tokens)
    # row offset of each student crop in the region tensors (crop-major, then batch, then token)
    offsets, o = [], 0
    for n in crop_tokens:
        offsets.append(o)
        o += batch * n
    teacher_cls = [naive_softmax([(x - c) / temp for x, c in zip(row, center)]) for row in t_cls]
    teacher_region = [naive_softmax([(x - c) / region_temp for x, c in zip(row, center_grid)]) for row in t_region]
    total, pairs = 0.0, 0
    for i in range(2):
        for v in range(ncrops):
            if v == i:
                continue
            pair = 0.0
            for b in range(batch):
                view = cross_entropy(teacher_cls[i * batch + b], naive_log_softmax([x / STUDENT_TEMP for x in s_cls[v * batch + b]]))
                if not dense:
                    pair += view
                    continue
                n_s = crop_tokens[v]
                region = 0.0
                for j in range(n_s):
                    row = offsets[v] + b * n_s + j
                    t_rows = [(i * batch + b) * n_t + m for m in range(n_t)]
                    best = max(t_rows, key=lambda r: cosine(s_fea[row], t_fea[r]))
                    if boxes is not None:
                        cell = naive_teacher_cell(boxes[b][v], boxes[b][i], j, n_s, n_t)
                        best = best if cell is None else t_rows[cell]
                    region += cross_entropy(teacher_region[best], naive_log_softmax([x / STUDENT_TEMP for x in s_region[row]]))
                pair += (1 - region_weight) * view + region_weight * region / n_s
            total += pair / batch
            pairs += 1
    return total / pairs


def random_outputs(batch, crops_per_group, tokens_per_group, K=7, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ncrops = sum(crops_per_group)
    rows = batch * sum(c * n for c, n in zip(crops_per_group, tokens_per_group))
    student = (torch.randn(ncrops * batch, K, generator=g), torch.randn(rows, K, generator=g),
               torch.randn(rows, C, generator=g), list(tokens_per_group))
    n_t = tokens_per_group[0]
    teacher = (torch.randn(2 * batch, K, generator=g), torch.randn(2 * batch * n_t, K, generator=g),
               torch.randn(2 * batch * n_t, C, generator=g), [n_t])
    return student, teacher


@pytest.mark.parametrize('batch,local_numbers,tokens', [
    (2, [4], [4, 1]),          # one local size
    (3, [2, 2], [9, 4, 1]),    # two local sizes (6 2 / 96 128 style)
    (1, [], [4]),              # no local crops
    (2, [1, 3, 2], [4, 9, 1, 2]),
])
def test_ddino_loss_matches_naive(batch, local_numbers, tokens):
    ncrops = 2 + sum(local_numbers)
    crops_per_group = [2] + [n for n in local_numbers if n]
    student, teacher = random_outputs(batch, crops_per_group, tokens)
    loss_fn = DDINOLoss(7, ncrops, 0.04, 0.07, 3, 10, local_crops_number=local_numbers or [0])
    g = torch.Generator().manual_seed(5)
    loss_fn.center.copy_(torch.randn(1, 7, generator=g))
    loss_fn.center_grid.copy_(torch.randn(1, 7, generator=g))
    epoch = 1
    temp = 0.04 + (0.07 - 0.04) * epoch / 2  # linspace(0.04, 0.07, 3)[1]
    crop_tokens = [n for c, n in zip(crops_per_group, tokens) for _ in range(c)]
    expected = naive_ddino(student[0].tolist(), student[1].tolist(), student[2].tolist(), crop_tokens,
                           teacher[0].tolist(), teacher[1].tolist(), teacher[2].tolist(), tokens[0], batch, temp,
                           loss_fn.center[0].tolist(), loss_fn.center_grid[0].tolist())
    loss = loss_fn(student, teacher, epoch)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('region_weight', [0.0, 0.8, 1.0])
def test_ddino_region_weight_matches_naive(region_weight):
    student, teacher = random_outputs(2, [2, 3], [4, 1], seed=3)
    loss_fn = DDINOLoss(7, 5, 0.04, 0.04, 0, 10, region_weight=region_weight)
    expected = naive_ddino(student[0].tolist(), student[1].tolist(), student[2].tolist(), [4, 4, 1, 1, 1],
                           teacher[0].tolist(), teacher[1].tolist(), teacher[2].tolist(), 4, 2, 0.04,
                           [0.0] * 7, [0.0] * 7, region_weight=region_weight)
    assert loss_fn(student, teacher, 0).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match='region_weight 1.5'):
        DDINOLoss(7, 5, 0.04, 0.04, 0, 10, region_weight=1.5)


def test_region_teacher_temp_warms_up_with_the_view_teachers_and_matches_naive():
    student, teacher = random_outputs(2, [2, 3], [4, 1], seed=4)
    loss_fn = DDINOLoss(7, 5, 0.04, 0.05, 3, 10, region_teacher_temp=0.09)
    for epoch, view_temp, region_temp in [(1, 0.045, 0.065), (5, 0.05, 0.09)]:  # linspace(0.04, ., 3)[1], then flat
        expected = naive_ddino(student[0].tolist(), student[1].tolist(), student[2].tolist(), [4, 4, 1, 1, 1],
                               teacher[0].tolist(), teacher[1].tolist(), teacher[2].tolist(), 4, 2, view_temp,
                               [0.0] * 7, [0.0] * 7, region_temp=region_temp)
        assert loss_fn(student, teacher, epoch).item() == pytest.approx(expected, rel=1e-5), epoch
    default = DDINOLoss(7, 5, 0.04, 0.05, 3, 10)(student, teacher, 5).item()
    assert default == pytest.approx(naive_ddino(student[0].tolist(), student[1].tolist(), student[2].tolist(),
                                                [4, 4, 1, 1, 1], teacher[0].tolist(), teacher[1].tolist(),
                                                teacher[2].tolist(), 4, 2, 0.05, [0.0] * 7, [0.0] * 7), rel=1e-5)
    assert default != pytest.approx(loss_fn(student, teacher, 5).item(), rel=1e-3)


def random_boxes(batch, ncrops, seed):
    """B x V x 5 crop boxes inside the unit image (some views flipped)."""
    g = torch.Generator().manual_seed(seed)
    size = 0.3 + 0.7 * torch.rand(batch, ncrops, 2, generator=g)
    corner = (1 - size) * torch.rand(batch, ncrops, 2, generator=g)
    flipped = (torch.rand(batch, ncrops, 1, generator=g) < 0.5).float()
    return torch.cat([corner, size, flipped], dim=-1)


@pytest.mark.parametrize('batch,local_numbers,tokens', [(2, [4], [16, 4]), (3, [2, 1], [9, 4, 1])])
def test_position_matching_matches_naive(batch, local_numbers, tokens):
    ncrops = 2 + sum(local_numbers)
    crops_per_group = [2] + local_numbers
    student, teacher = random_outputs(batch, crops_per_group, tokens, seed=6)
    boxes = random_boxes(batch, ncrops, seed=7)
    crop_tokens = [n for c, n in zip(crops_per_group, tokens) for _ in range(c)]
    by_position = DDINOLoss(7, ncrops, 0.04, 0.04, 0, 10, local_crops_number=local_numbers,
                            region_matching='position')
    expected = naive_ddino(student[0].tolist(), student[1].tolist(), student[2].tolist(), crop_tokens,
                           teacher[0].tolist(), teacher[1].tolist(), teacher[2].tolist(), tokens[0], batch, 0.04,
                           [0.0] * 7, [0.0] * 7, boxes=boxes.tolist())
    assert by_position(student, teacher, 0, boxes=boxes).item() == pytest.approx(expected, rel=1e-5)
    # the boxes decide: the feature matches give another loss, and so do other boxes
    by_feature = DDINOLoss(7, ncrops, 0.04, 0.04, 0, 10, local_crops_number=local_numbers)
    assert by_feature(student, teacher, 0).item() != pytest.approx(expected, rel=1e-3)
    assert by_position(student, teacher, 0, boxes=random_boxes(batch, ncrops, seed=8)).item() != \
        pytest.approx(expected, rel=1e-3)
    with pytest.raises(ValueError, match='crop boxes'):
        by_position(student, teacher, 0)


def test_region_matching_position_needs_the_views_boxes(tmp_path):
    import utils
    with pytest.raises(utils.UserError, match=r'--region_matching position needs --aug-opt dino_aug .* not deit_aug'):
        run_training(command('--region_matching', 'position', '--aug-opt', 'deit_aug', '--output_dir', str(tmp_path)))


def test_region_loss_weight_out_of_range_is_a_one_line_error(tmp_path):
    import utils
    with pytest.raises(utils.UserError, match=r'--region_loss_weight -0.1 must be in \[0, 1\]'):
        run_training(command('--region_loss_weight', '-0.1', '--output_dir', str(tmp_path)))
    with pytest.raises(utils.UserError, match=r'--region_teacher_temp 0.0 must be positive'):
        run_training(command('--region_teacher_temp', '0', '--output_dir', str(tmp_path)))


def test_dino_loss_matches_naive():
    batch, ncrops, K = 3, 5, 6
    g = torch.Generator().manual_seed(1)
    s_cls, t_cls = torch.randn(ncrops * batch, K, generator=g), torch.randn(2 * batch, K, generator=g)
    loss_fn = DINOLoss(K, ncrops, 0.04, 0.04, 0, 10)
    loss_fn.center.copy_(torch.randn(1, K, generator=g))
    expected = naive_ddino(s_cls.tolist(), None, None, [0] * ncrops, t_cls.tolist(), [], [], 0, batch, 0.04,
                           loss_fn.center[0].tolist(), None, dense=False)
    assert loss_fn(s_cls, t_cls, 0).item() == pytest.approx(expected, rel=1e-5)


def test_centers_follow_ema_of_raw_teacher_output():
    student, teacher = random_outputs(2, [2, 3], [4, 1], K=7)
    loss_fn = DDINOLoss(7, 5, 0.04, 0.04, 0, 10)
    loss_fn(student, teacher, 0)
    assert not loss_fn.center.any() and not loss_fn.center_grid.any()  # a forward only records
    loss_fn.update_center()
    torch.testing.assert_close(loss_fn.center, 0.1 * teacher[0].mean(0, keepdim=True))
    torch.testing.assert_close(loss_fn.center_grid, 0.1 * teacher[1].mean(0, keepdim=True))
    loss_fn(student, teacher, 0)
    loss_fn.update_center()
    torch.testing.assert_close(loss_fn.center, 0.19 * teacher[0].mean(0, keepdim=True))
    assert loss_fn.center.shape == loss_fn.center_grid.shape == (1, 7)


def test_one_center_update_after_two_forwards_is_that_of_their_union():
    """Gradient accumulation: two micro-batches recorded, then one update, move the center as one batch of
    both would (the mean over all their rows), once."""
    first, second = torch.randn(6, 7), torch.randn(10, 7)
    loss_fn = DINOLoss(7, 4, 0.04, 0.04, 0, 10)
    for teacher in (first, second):
        loss_fn(torch.randn(2 * len(teacher), 7), teacher, 0)
    loss_fn.update_center()
    torch.testing.assert_close(loss_fn.center, 0.1 * torch.cat([first, second]).mean(0, keepdim=True))


def test_region_loss_gradient_matches_naive_autograd():
    """The vectorised loss has the gradient of the looped formula (the matched indices carry no gradient)."""
    student, teacher = random_outputs(2, [2, 2], [4, 1], K=5, C=3, seed=3)
    s_region = student[1].clone().requires_grad_()
    loss = DDINOLoss(5, 4, 0.04, 0.04, 0, 10)((student[0], s_region, student[2], student[3]), teacher, 0)
    loss.backward()
    eps = 1e-3
    row, col = 9, 2
    loss_fn = DDINOLoss(5, 4, 0.04, 0.04, 0, 10)
    plus, minus = student[1].clone(), student[1].clone()
    plus[row, col] += eps
    minus[row, col] -= eps
    f_plus = loss_fn((student[0], plus, student[2], student[3]), teacher, 0).item()
    loss_fn.center.zero_(), loss_fn.center_grid.zero_()
    f_minus = loss_fn((student[0], minus, student[2], student[3]), teacher, 0).item()
    assert s_region.grad[row, col].item() == pytest.approx((f_plus - f_minus) / (2 * eps), rel=1e-2, abs=1e-5)


def test_teacher_temperature_schedule():
    loss_fn = DINOLoss(4, 4, 0.04, 0.07, 30, 100)
    assert loss_fn.teacher_temp(0) == pytest.approx(0.04)
    assert loss_fn.teacher_temp(29) == pytest.approx(0.07)
    assert loss_fn.teacher_temp(15) == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert loss_fn.teacher_temp(99) == pytest.approx(0.07)
    assert loss_fn.teacher_temp(150) == pytest.approx(0.07)  # past the schedule: last value


def test_mismatched_crop_layout_is_a_clear_error():
    student, teacher = random_outputs(2, [2, 4], [4, 1])
    loss_fn = DDINOLoss(7, 6, 0.04, 0.04, 0, 10, local_crops_number=[2, 2])
    with pytest.raises(ValueError, match='resolution groups'):
        loss_fn(student, teacher, 0)
    with pytest.raises(ValueError, match='add up'):
        DDINOLoss(7, 6, 0.04, 0.04, 0, 10, local_crops_number=[2, 1])


@pytest.mark.parametrize('crops, batch, student_tokens, teacher_tokens', [(2, 3, 4, 4), (3, 2, 1, 5)])
def test_matched_cross_entropy_equals_autograd_of_the_plain_formula(crops, batch, student_tokens, teacher_tokens):
    from engine.losses import MatchedCrossEntropy
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(crops, batch, student_tokens, 11, generator=g, requires_grad=True)
    teacher = torch.randn(2, batch, teacher_tokens, 11, generator=g).softmax(-1)
    match = torch.randint(0, teacher_tokens, (2, crops, batch, student_tokens), generator=g)
    weights = torch.rand(2, crops, batch, student_tokens, generator=g)
    by_image = teacher.transpose(0, 1).contiguous()  # B x 2 x T_t x K
    fused = MatchedCrossEntropy.apply(logits, by_image, by_image.sum(-1), match, 0.1)
    (fused * weights).sum().backward()
    fused_grad = logits.grad.clone()
    logits.grad = None
    # the teacher row of every (view, crop, image, student token), gathered one by one
    matched = torch.stack([torch.stack([torch.stack([teacher[v, b, match[v, c, b]] for b in range(batch)])
                                        for c in range(crops)]) for v in range(2)])  # 2 x c x B x T_s x K
    plain = -(matched * torch.log_softmax(logits / 0.1, dim=-1)[None]).sum(-1)
    (plain * weights).sum().backward()
    torch.testing.assert_close(fused.detach(), plain.detach())
    torch.testing.assert_close(fused_grad, logits.grad)


@pytest.mark.parametrize('dense', [True, False])
def test_losses_are_float32_under_bf16_autocast(dense):
    """The trainer calls the loss inside autocast; its matmuls (matched dot products over K, similarities)
    must not run in bf16: same value as outside autocast (it is 3e-4 off when they do, at K = 4096)."""
    student, teacher = random_outputs(2, [2, 2], [9, 4], K=4096, C=32, seed=3)
    student = (student[0], 3 * student[1], *student[2:])
    if dense:
        loss_fn = DDINOLoss(4096, 4, 0.04, 0.04, 0, 10, local_crops_number=[2])
    else:
        loss_fn, student, teacher = DINOLoss(4096, 4, 0.04, 0.04, 0, 10), 3 * student[0], teacher[0]
    plain = loss_fn(student, teacher, 0)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        autocast = loss_fn(student, teacher, 0)
    assert autocast.dtype == torch.float32
    assert autocast.item() == pytest.approx(plain.item(), rel=1e-6)
