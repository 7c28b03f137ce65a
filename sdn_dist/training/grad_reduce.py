"""The ZeRO-0 engine's gradient all-reduce, done the way DDP does it (``deepspeed.grad_reduce``).

DeepSpeed ZeRO 0 averages the gradients in ``engine.allreduce_gradients``, called once the
backward pass has ended: every gradient flattened into one buffer, one blocking all-reduce, the
result copied back. DDP instead fills buckets from per-parameter hooks *during* the backward (in
reverse parameter order, the order autograd produces the gradients) and launches each bucket's
all-reduce asynchronously as it fills, so the communication runs beside the rest of the backward.

``attach(engine, mode, bucket_size)`` replaces the engine's ``allreduce_gradients`` (the seam its
backward epilogue calls, only on the gradient-accumulation boundary for ZeRO 0) with:

* ``"overlap"``: DDP's scheme. ``Tensor.register_post_accumulate_grad_hook`` copies each gradient,
  once it is complete for the step (on the boundary micro-batch only: earlier micro-batches just
  accumulate locally, as the engine does), into its bucket; a full bucket is all-reduced with
  ``async_op=True`` (buckets are launched strictly in index order, so every rank issues the same
  collectives in the same order). The epilogue launches what is left (a parameter without a
  gradient this step reduces zeros, as DeepSpeed does), waits for every handle, scales by
  1 / world size and copies the averages back into ``param.grad``.
* ``"shm"``: one flat buffer after the backward, as the engine does, reduced by DeepSpeed's
  shared-memory collective (``deepspeed.comm.inference_all_reduce``, the op every CPU engine
  start builds) instead of gloo's TCP loopback; single-node only.

Both compute what the engine computes: the sum over the ranks, then ``* (1 / world)`` (the
engine's post-scaling with ``gradient_predivide_factor`` 1), in fp32; gradient clipping and the
optimizer step still run in ``engine.step()`` after it. With two ranks each sum is one addition,
so the weights are bit-identical to the engine's own reduction (tests/test_grad_reduce.py).
Only the plain fp32 ZeRO-0 engine is supported (no bf16/fp16 optimizer wrapper, no MoE or
pipeline parallelism, fp32 communication, mean reduction); ``attach`` refuses anything else.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

MODES = ("engine", "overlap", "shm")


class _Bucket:
    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.offsets = []
        n = 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.buffer = torch.empty(n, dtype=params[0].dtype, device=params[0].device)
        self.pending = len(params)
        self.filled = [False] * len(params)
        self.handle = None

    def put(self, i: int, grad: torch.Tensor | None) -> None:
        p, o = self.params[i], self.offsets[i]
        view = self.buffer[o:o + p.numel()]
        if grad is None:
            view.zero_()
        else:
            view.copy_(grad.reshape(-1))
        self.filled[i] = True
        self.pending -= 1

    def copy_back(self, scale: float) -> None:
        self.buffer.mul_(scale)
        for p, o in zip(self.params, self.offsets):
            view = self.buffer[o:o + p.numel()].view_as(p)
            if p.grad is None:
                p.grad = view.clone()
            else:
                p.grad.copy_(view)


class OverlappedReduce:
    """DDP-style bucketed all-reduce during the backward pass of ``engine``'s boundary micro-batches."""

    def __init__(self, engine, bucket_size: int):
        self.engine = engine
        self.world = dist.get_world_size()
        self.scale = 1.0 / self.world
        params = [p for p in engine.module.parameters() if p.requires_grad and p.numel() > 0]
        self.buckets: list[_Bucket] = []
        self.where: dict[int, tuple[int, int]] = {}
        group: list[torch.nn.Parameter] = []
        n = 0
        for p in reversed(params):           # autograd produces the last layers' gradients first
            group.append(p)
            n += p.numel()
            if n >= bucket_size:
                self.buckets.append(_Bucket(group))
                group, n = [], 0
        if group:
            self.buckets.append(_Bucket(group))
        for b, bucket in enumerate(self.buckets):
            for i, p in enumerate(bucket.params):
                self.where[id(p)] = (b, i)
                p.register_post_accumulate_grad_hook(self._grad_ready)
        self._reset()

    def _reset(self) -> None:
        self.next_launch = 0
        for bucket in self.buckets:
            bucket.pending, bucket.handle = len(bucket.params), None
            bucket.filled = [False] * len(bucket.params)

    def _launch_ready(self) -> None:
        while self.next_launch < len(self.buckets) and self.buckets[self.next_launch].pending == 0:
            bucket = self.buckets[self.next_launch]
            bucket.handle = dist.all_reduce(bucket.buffer, async_op=True)
            self.next_launch += 1

    def _grad_ready(self, p: torch.nn.Parameter) -> None:
        if not self.engine.is_gradient_accumulation_boundary():
            return                           # accumulate locally; reduce the boundary's total only
        b, i = self.where[id(p)]
        bucket = self.buckets[b]
        if bucket.filled[i]:
            raise RuntimeError("a gradient completed twice in one boundary backward")
        bucket.put(i, p.grad)
        if b == self.next_launch and bucket.pending == 0:
            self._launch_ready()

    def allreduce_gradients(self, *args, **kwargs) -> None:
        """The engine's backward epilogue: finish this boundary's buckets and average."""
        if not self.engine.is_gradient_accumulation_boundary():
            return
        for bucket in self.buckets[self.next_launch:]:
            for i, p in enumerate(bucket.params):
                if not bucket.filled[i]:     # no gradient this micro-batch: the accumulated one, or zeros
                    bucket.put(i, p.grad)
        self._launch_ready()
        for bucket in self.buckets:
            bucket.handle.wait()
            bucket.copy_back(self.scale)
        self._reset()


class ShmReduce:
    """The engine's one flat all-reduce, over DeepSpeed's shared-memory collective."""

    def __init__(self, engine):
        import deepspeed.comm as ds_comm
        self.engine, self.ds_comm = engine, ds_comm
        self.params = [p for p in engine.module.parameters() if p.requires_grad and p.numel() > 0]
        self.scale = 1.0 / dist.get_world_size()

    def allreduce_gradients(self, *args, **kwargs) -> None:
        if not self.engine.is_gradient_accumulation_boundary():
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch._utils._flatten_dense_tensors(grads)
        self.ds_comm.inference_all_reduce(flat)
        flat.mul_(self.scale)
        for p, g in zip(self.params, torch._utils._unflatten_dense_tensors(flat, grads)):
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)


def attach(engine, mode: str, bucket_size: int):
    """Route ``engine``'s ZeRO-0 gradient reduction through ``mode`` (``"engine"``: leave it);
    -> the reducer (None for ``"engine"`` or a single process)."""
    if mode not in MODES:
        raise ValueError(f"deepspeed.grad_reduce must be one of {MODES}, not {mode!r}")
    if mode == "engine" or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    unsupported = [why for why, bad in (
        ("ZeRO stage > 0", engine.zero_optimization_stage() != 0),
        ("bf16/fp16 training", engine.bfloat16_enabled() or engine.fp16_enabled()),
        ("MoE layers", getattr(engine, "has_moe_layers", False)),
        ("pipeline parallelism", getattr(engine, "pipeline_parallelism", False)),
        ("non-fp32 communication", engine.communication_data_type != torch.float32),
        ("a sum (not mean) reduction", not engine.gradient_average),
        ("gradient pre-scaling", not engine.postscale_gradients() or engine.gradient_predivide_factor() != 1.0),
    ) if bad]
    if mode == "shm" and os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        # DeepSpeed initialises its shared memory at the first engine only when LOCAL_SIZE equals
        # the world size (every rank on this node); without it the collective segfaults.
        unsupported.append("ranks on more than one node (LOCAL_SIZE is not the world size)")
    if unsupported:
        raise ValueError(f"deepspeed.grad_reduce={mode} needs the plain fp32 ZeRO-0 engine; not with "
                         + ", ".join(unsupported))
    reducer = OverlappedReduce(engine, bucket_size) if mode == "overlap" else ShmReduce(engine)
    engine.allreduce_gradients = reducer.allreduce_gradients
    return reducer
