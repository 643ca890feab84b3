"""A batch split over 2 gloo ranks gets exactly the Sinkhorn assignment the whole batch gets in one process."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optvq_hf import SinkhornQuantizer
from optvq_hf.assignment import _exp_domain_indices

pytestmark = pytest.mark.slow

WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_inputs(mode: str):
    torch.manual_seed(0)
    untrusted = mode == "all-untrusted"
    mode = "all" if untrusted else mode
    quantizer = SinkhornQuantizer(64, 32, num_heads=4, cost_normalization=mode, chunk_size=50).train()
    # Ranks hold different distributions, so that local statistics would give a different assignment.
    z = torch.cat([torch.randn(4, 32, 4, 4) * 0.5, torch.randn(4, 32, 4, 4) * 2.0 + 1.0])
    if untrusted:  # a kernel so peaked that the exp domain cannot vouch for it: every rank must fall back together
        quantizer.epsilon = 100.0
    return quantizer, z


# (cost normalisation, streaming): the materialised and the streaming solver, and a batch the exp domain cannot
# vouch for (solved again in the log domain).
CASES = [("all", False), ("all", True), ("dim", False), ("all-untrusted", False)]


def worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        for mode, spread in CASES:
            quantizer, z = make_inputs(mode)
            quantizer.streaming = spread
            local = z.chunk(WORLD_SIZE)[rank]
            training = quantizer(local).indices
            evaluation = quantizer.eval()(local).indices  # eval: local nearest codes, no collective
            results[(rank, mode, spread)] = (training, evaluation)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results():
    results = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), results), nprocs=WORLD_SIZE, join=True)
    return dict(results)


@pytest.mark.parametrize(("mode", "spread"), CASES)
def test_two_ranks_equal_one_process(mode, spread, two_rank_results):
    quantizer, z = make_inputs(mode)
    quantizer.streaming = spread
    whole = quantizer(z).indices
    rows = z.permute(0, 2, 3, 1).reshape(-1, 8)
    trusted = _exp_domain_indices(
        rows, quantizer.codebook().detach(), quantizer.epsilon, 5, "all" if "all" in mode else mode, 50, False, spread
    )[1]
    assert bool(trusted) == (mode != "all-untrusted")
    results = {rank: two_rank_results[(rank, mode, spread)] for rank in range(WORLD_SIZE)}
    split = torch.cat([results[rank][0] for rank in range(WORLD_SIZE)])
    assert torch.equal(split, whole)
    # Solving each half alone ("all" statistics and marginals per rank, as the original does for the statistics)
    # gives another assignment: the reduction is what makes the two equal.
    alone = torch.cat([quantizer(half).indices for half in z.chunk(WORLD_SIZE)])
    assert not torch.equal(alone, whole)
    nearest = torch.cat([results[rank][1] for rank in range(WORLD_SIZE)])
    assert torch.equal(nearest, quantizer.eval()(z).indices)
