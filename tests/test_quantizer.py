import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from samtok.tokenizer.quantizer import ResidualQuantizer, kmeans, squared_distances


def fixed_codebook(q, depth, codes):
    cb = q.codebooks[depth]
    cb.weight.data[: cb.size] = torch.tensor(codes, dtype=torch.float32)
    cb.embed_ema.copy_(cb.weight.data[: cb.size])
    cb.cluster_size_ema.fill_(1.0)


def test_nearest_code_and_residual_sum():
    torch.manual_seed(0)
    q = ResidualQuantizer(dim=8, codebook_size=16, depth=2).eval()
    z = torch.randn(50, 8)
    out = q(z)
    c0 = q.codebooks[0].codes
    brute0 = torch.cdist(z, c0).argmin(1)
    assert torch.equal(out.codes[:, 0], brute0)
    r1 = z - c0[brute0]
    assert torch.equal(out.codes[:, 1], torch.cdist(r1, q.codebooks[1].codes).argmin(1))
    torch.testing.assert_close(out.q, c0[out.codes[:, 0]] + q.codebooks[1].codes[out.codes[:, 1]])
    assert torch.equal(q.encode(z), out.codes)
    torch.testing.assert_close(q.embed_codes(out.codes), out.q)
    # eval mode never moves the codebooks
    before = q.codebooks[0].weight.clone()
    q(z)
    assert torch.equal(before, q.codebooks[0].weight)


def test_commitment_and_straight_through():
    q = ResidualQuantizer(dim=2, codebook_size=2, depth=2).eval()
    fixed_codebook(q, 0, [[0.0, 0.0], [4.0, 0.0]])
    fixed_codebook(q, 1, [[0.0, 1.0], [0.0, -1.0]])
    z = torch.tensor([[3.0, 0.5]], requires_grad=True)
    out = q(z)
    assert out.codes.tolist() == [[1, 0]]
    # depth 1 target e1 = (4, 0): mse = ((3-4)^2 + 0.5^2)/2 ; depth 2 target (4, 1): ((1) + 0.25)/2
    assert out.commitment_loss.item() == pytest.approx(((1 + 0.25) / 2 + (1 + 0.25) / 2) / 2)
    torch.testing.assert_close(out.quantized.detach(), torch.tensor([[4.0, 1.0]]))
    out.quantized.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # straight-through: identity gradient


def test_ema_update_arithmetic_and_dead_code_restart():
    q = ResidualQuantizer(dim=2, codebook_size=3, depth=1, decay=0.5, eps=0.0,
                          dead_code_threshold=0.6, restart_source="batch").train()
    fixed_codebook(q, 0, [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.tensor([[1.0, 0.0], [9.0, 0.0], [11.0, 0.0]])
    out = q(x)
    assert out.codes[:, 0].tolist() == [0, 1, 1]
    cb = q.codebooks[0]
    # counts [1, 2, 0] -> ema [1, 1.5, 0.5]; sums -> ema [[.5, 0], [15, 0], [0, 5]]
    assert cb.cluster_size_ema[:2].tolist() == [1.0, 1.5]
    torch.testing.assert_close(cb.weight[0], torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(cb.weight[1], torch.tensor([10.0, 0.0]))
    # code 2 fell to 0.5 < 0.6: restarted from a batch vector with the restart count
    assert out.stats["depth0/restarted"] == 1.0
    assert any(torch.equal(cb.weight[2], v) for v in x)
    assert cb.cluster_size_ema[2].item() == pytest.approx(0.6)
    torch.testing.assert_close(cb.embed_ema[2], cb.weight[2] * 0.6)
    assert torch.count_nonzero(cb.weight[3]) == 0  # padding row untouched


def test_release_weight_formula_with_smoothing():
    q = ResidualQuantizer(dim=4, codebook_size=8, depth=1, decay=0.9, eps=1e-5, restart_source="none").train()
    for _ in range(5):
        q(torch.randn(32, 4))
    cb = q.codebooks[0]
    n = cb.cluster_size_ema.sum()
    smoothed = (cb.cluster_size_ema + 1e-5) / (n + 8e-5) * n
    torch.testing.assert_close(cb.codes, cb.embed_ema / smoothed[:, None])


def test_usage_stats():
    q = ResidualQuantizer(dim=2, codebook_size=4, depth=1).eval()
    fixed_codebook(q, 0, [[0, 0], [10, 0], [0, 10], [10, 10]])
    out = q(torch.tensor([[0.1, 0], [0, 0.1], [9.9, 0.0], [9.8, 0.2]]))
    assert out.stats["depth0/used_in_batch"] == 2
    assert out.stats["depth0/perplexity"] == pytest.approx(2.0)


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(40, 2, generator=g) for c in centres])
    found = kmeans(x, 3, iters=10, generator=g)
    d = squared_distances(centres, found).min(dim=1).values
    assert (d < 0.05).all()
    q = ResidualQuantizer(dim=2, codebook_size=3, depth=2)
    q.kmeans_init(x, generator=g)
    assert (squared_distances(centres, q.codebooks[0].codes).min(1).values < 0.05).all()


def _ddp_worker(rank, world, port, restart, result_path):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(123)  # identical initial codebooks
    q = ResidualQuantizer(dim=4, codebook_size=8, depth=2, decay=0.8,
                          dead_code_threshold=0.5, restart_source="batch" if restart else "none").train()
    torch.manual_seed(1000 + rank)  # different data and random choices per rank
    for _ in range(6):
        q(torch.randn(16, 4) + rank)
    state = {k: v.clone() for k, v in q.state_dict().items()}
    gathered = [None] * world
    dist.all_gather_object(gathered, state)
    if rank == 0:
        torch.save(gathered, result_path)
    dist.destroy_process_group()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("restart", [False, True])
def test_two_process_ddp_keeps_codebooks_identical(tmp_path, restart):
    path = tmp_path / "states.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), restart, str(path)), nprocs=2, join=True)
    s0, s1 = torch.load(path, weights_only=True)
    for k in s0:
        torch.testing.assert_close(s0[k], s1[k], rtol=0, atol=0, msg=k)
    if not restart:
        # without restarts, two ranks of 16 equal one process fed both batches (sums are all-reduced)
        torch.manual_seed(123)
        q = ResidualQuantizer(dim=4, codebook_size=8, depth=2, decay=0.8, restart_source="none").train()
        gens = [torch.Generator().manual_seed(1000 + r) for r in range(2)]
        for _ in range(6):
            q(torch.cat([torch.randn(16, 4, generator=gens[r]) + r for r in range(2)]))
        for k, v in q.state_dict().items():
            torch.testing.assert_close(s0[k], v, msg=k)
