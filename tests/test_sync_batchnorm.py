"""The CPU-capable synchronised BatchNorm equals one BatchNorm over the union of the processes' batches."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from models.sync_batchnorm import AllReduceBatchNorm, convert_sync_batchnorm


def _worker(rank, world_size, init_file, x, grad_out, results):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    torch.manual_seed(0)
    bn = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), torch.device('cpu'))[0]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    shard = x.chunk(world_size)[rank].clone().requires_grad_()
    out = bn(shard)
    out.backward(grad_out.chunk(world_size)[rank])
    results[rank] = (out.detach(), shard.grad, bn.weight.grad, bn.running_mean.clone(), bn.running_var.clone())
    dist.destroy_process_group()


def test_all_reduce_batchnorm_matches_batchnorm_on_the_whole_batch(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(6, 3, 4, 5) * 3 + 1
    grad_out = torch.randn(6, 3, 4, 5)
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, str(tmp_path / 'init'), x, grad_out, results), nprocs=2, join=True)

    reference = nn.BatchNorm2d(3)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        reference.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x_ref = x.clone().requires_grad_()
    out_ref = reference(x_ref)
    out_ref.backward(grad_out)

    out = torch.cat([results[0][0], results[1][0]])
    grad_in = torch.cat([results[0][1], results[1][1]])
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_in, x_ref.grad, rtol=1e-4, atol=1e-5)
    # each rank's parameter gradient is its share; DDP averages them (x world size = the full-batch gradient)
    torch.testing.assert_close(results[0][2] + results[1][2], reference.weight.grad, rtol=1e-4, atol=1e-5)
    for rank in (0, 1):
        torch.testing.assert_close(results[rank][3], reference.running_mean, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(results[rank][4], reference.running_var, rtol=1e-4, atol=1e-6)


def test_conversion_keeps_state_dict_and_falls_back_without_process_group():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(2)))
    model[1].running_mean.fill_(0.5)
    keys_before = list(model.state_dict())
    converted = convert_sync_batchnorm(model, torch.device('cpu'))
    assert isinstance(converted[1], AllReduceBatchNorm) and isinstance(converted[2][0], AllReduceBatchNorm)
    assert list(converted.state_dict()) == keys_before
    assert converted[1].running_mean[0] == 0.5
    x = torch.randn(4, 4, 5, 5)
    plain = nn.BatchNorm2d(4)
    plain.running_mean.fill_(0.5)
    torch.testing.assert_close(converted[1](x), plain(x))  # no process group: a plain BatchNorm
