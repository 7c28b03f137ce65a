"""deepspeed.grad_reduce: the ZeRO-0 engine's gradient all-reduce done by sdn_dist/training/grad_reduce.py
(DDP's overlapped buckets, or DeepSpeed's shared-memory collective) gives the weights DeepSpeed's
own reduction gives, on every rank.

    pytest tests/test_grad_reduce.py -m "not slow"   # 2 gloo processes, a small model, ~100 s
    pytest tests/test_grad_reduce.py                 # + the trainer's engine in the bench's peer
"""

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sdn_dist.net import free_port

STEPS = 4


class Net(torch.nn.Module):
    """Three layers and a parameter the loss skips on odd micro-batches (a gradient that is
    missing on the accumulation boundary but present from the earlier micro-batch)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 16)
        self.b = torch.nn.Linear(16, 16)
        self.c = torch.nn.Linear(16, 3)
        self.extra = torch.nn.Parameter(torch.ones(3))

    def forward(self, x, use_extra: bool):
        y = self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))
        return y * self.extra if use_extra else y


def _train(rank: int, mode: str, grad_accum: int) -> dict:
    import deepspeed
    from sdn_dist.training import grad_reduce

    torch.manual_seed(0)
    net = Net()
    # SGD: the update is linear in the gradient, so a wrong scale (a sum instead of the mean)
    # moves the weights by a lot; Adam would hide it in its normalisation.
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    conf = {"train_batch_size": 4 * 2 * grad_accum, "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": grad_accum, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": 0}, "steps_per_print": 1 << 30}
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=conf)
    # bucket of 20 elements: the 4 tensors of c and extra, b's bias, b's weight, a's: 4-5 buckets
    grad_reduce.attach(engine, mode, bucket_size=20)
    g = torch.Generator().manual_seed(100 + rank)          # each rank its own data
    for _ in range(STEPS * grad_accum):
        x, t = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
        use_extra = engine.micro_steps % 2 == 0
        loss = ((engine(x, use_extra) - t) ** 2).mean() * 5.0
        engine.backward(loss)
        engine.step()
    return {k: v.tolist() for k, v in net.state_dict().items()}


def _rank_main(rank: int, port: int, runs: list, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2",
                      LOCAL_RANK=str(rank))
    import deepspeed
    deepspeed.init_distributed("gloo", auto_mpi_discovery=False)
    res = {f"{mode}/{ga}": _train(rank, mode, ga) for mode, ga in runs}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))


def run_both_ranks(runs: list[tuple[str, int]]) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="sdn-grad-reduce-") as d:
        mp.spawn(_rank_main, args=(free_port(), runs, d), nprocs=2, join=True)
        return [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(2)]


def test_overlap_and_shm_give_the_engines_weights_on_both_ranks():
    """After 4 optimizer steps with grad_accum 1 and 2, on different data per rank: the same weights
    on both ranks, and exactly the engine's (with 2 ranks each average is one addition and a
    halving, whatever the buckets). What each check catches, verified by making the change:
    the weights of the two ranks differ if the reduction is skipped (the engine's own
    ``allreduce_gradients`` replaced but nothing launched); the overlap's weights move (SGD:
    twice the step) if ``copy_back`` forgets the 1 / world scale; with grad_accum 2, reducing on
    a non-boundary micro-batch (no boundary check in ``_grad_ready``) completes a gradient twice
    and raises; filling a missing gradient with zeros instead of the accumulated one (``extra`` is
    unused on the boundary micro-batch) moves the weights."""
    runs = [(m, ga) for ga in (1, 2) for m in ("engine", "overlap", "shm")]
    r0, r1 = run_both_ranks(runs)
    for ga in (1, 2):
        engine = r0[f"engine/{ga}"]
        assert r1[f"engine/{ga}"] == engine
        for mode in ("overlap", "shm"):
            assert r0[f"{mode}/{ga}"] == r1[f"{mode}/{ga}"], (mode, ga)
            assert r0[f"{mode}/{ga}"] == engine, (mode, ga)
    # the runs trained, and the two accumulation settings are different runs
    assert r0["engine/1"] != r0["engine/2"]
    torch.manual_seed(0)
    assert r0["engine/1"]["a.weight"] != Net().state_dict()["a.weight"].tolist()


def test_attach_refuses_what_it_does_not_reduce():
    from sdn_dist.training import grad_reduce
    with pytest.raises(ValueError, match="grad_reduce must be one of"):
        grad_reduce.attach(object(), "ddp", 1)
    assert grad_reduce.attach(object(), "overlap", 1) is None     # one process: nothing to reduce


@pytest.mark.slow
def test_trainer_engine_with_overlap_gives_the_same_weights():
    """The trainer's own engine (loop.build_engine, debug preset's student, Adam) in the bench's
    2-process peer: deepspeed.grad_reduce=overlap (several buckets) and shm end bit-identical to
    the engine's reduction, on both ranks."""
    from sdn_dist.apps.bench import bench
    from sdn_dist.config import load_config

    torch.manual_seed(0)
    c0 = load_config("debug", overrides=["teacher.weights=", "workers=2"])
    s = c0.model.image_size
    batches = [(torch.rand(8, 3, s, s), torch.randn(8, c0.text.dim)) for _ in range(4)]

    def run(*overrides):
        c = load_config("debug", overrides=["teacher.weights=", "workers=2", *overrides])
        r = bench.run_peer("deepspeed", c, batches, 1, steps=4, world=2, warmup=0, chunk=4)
        assert r["param_sha256"][0] == r["param_sha256"][1]
        return r["param_sha256"][0]

    engine = run()
    assert run("deepspeed.grad_reduce=overlap", "deepspeed.overlap_bucket_size=5000") == engine
    assert run("deepspeed.grad_reduce=shm") == engine
