"""Checkpoints to object storage: a real DeepSpeed engine saving through sdn_dist's Checkpointer to
a real S3 server (moto, tests/conftest.py) behind a TCP proxy that can take it down mid-upload.

The upload runs in the background, COMPLETE comes only after it, an outage is retried with backoff,
and one that persists gives that checkpoint up without touching earlier ones (slow tier: DeepSpeed).
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

from conftest import TcpProxy, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(process_group):
    """A one-process DeepSpeed engine (gloo on CPU), as a training worker has."""
    import deepspeed
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_batch_size": 1, "zero_optimization": {"stage": 0},
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}})
    yield eng


@pytest.fixture
def proxied(s3, monkeypatch):
    """The S3 server reached through a proxy we can cut; AWS_MAX_ATTEMPTS=1 (botocore's own retries
    off, a standard variable) so that the Checkpointer's retry loop is what is measured."""
    import s3fs
    from sdn_dist import fsio
    proxy = TcpProxy(int(s3.endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    fsio._checked_buckets.clear()
    yield proxy
    proxy.down()
    s3fs.S3FileSystem.clear_instance_cache()


def checkpointer(out, **cfg):
    from sdn_dist.config import CheckpointConfig
    from sdn_dist.training.checkpoint import Checkpointer
    records, said = [], []
    ck = Checkpointer(out, cfg.get("keep", 1), 0, 1, CheckpointConfig(**cfg),
                      report=records.extend, say=said.append)
    return ck, records, said


def step_weights(engine, value):
    with torch.no_grad():
        for p in engine.module.parameters():
            p.fill_(value)


def test_background_upload_then_complete_then_prune(engine, s3, proxied, tmp_path):
    out = s3.url("runs", "bg")
    ck, records, _ = checkpointer(out, keep=1, upload_retry_seconds=0.2)
    step_weights(engine, 1.0)
    ck.save(engine, 4, {"train": {"stage": 1}})
    staged = os.path.join(ck._staging, "step-00000004")
    assert ck._pending is not None       # save() returned with the upload in flight
    assert ck.wait() is True
    root = f"{s3.bucket}/runs/bg/checkpoints"
    assert json.loads(s3.fs.cat(f"{root}/step-00000004/COMPLETE"))["step"] == 4
    assert s3.fs.exists(f"{root}/step-00000004/.rank-00000.done")
    assert not os.path.exists(staged)    # nothing of the run stays on the node's disk
    ups = [r for r in records if r["event"] == "checkpoint_upload"]
    assert ups and ups[0]["ok"] and ups[0]["upload_seconds"] > 0
    assert [r["step"] for r in records if r["event"] == "checkpoint"] == [4]

    step_weights(engine, 2.0)
    ck.save(engine, 8, {"train": {"stage": 1}})
    ck.finish()
    tags = sorted(p.rsplit("/", 1)[-1] for p in s3.fs.ls(root, refresh=True))
    assert tags == ["step-00000008"]     # keep=1: the older one pruned once the new one is COMPLETE
    step_weights(engine, 0.0)
    ck2, _, _ = checkpointer(out)
    ck2.load(engine, ck2.latest()["tag"], {}, module_only=True)
    assert all(float(p.detach().flatten()[0]) == 2.0 for p in engine.module.parameters())


def test_training_goes_on_while_the_upload_waits_out_an_outage(engine, s3, proxied):
    """The store is down while the checkpoint uploads: save() returns at once, the upload retries
    with backoff and completes once the store is back."""
    out = s3.url("runs", "outage")
    ck, records, said = checkpointer(out, keep=2, upload_retries=6, upload_retry_seconds=0.3)
    proxied.down()
    t0 = time.time()
    ck.save(engine, 4, {"train": {"stage": 1}})
    held = time.time() - t0
    threading.Timer(2.0, proxied.up).start()
    assert ck.wait() is True
    waited = time.time() - t0
    assert held < waited - 1.5, (held, waited)   # training was not held for the outage
    up = [r for r in records if r["event"] == "checkpoint_upload"]
    assert up[-1]["ok"] and up[-1]["retries"] >= 1, up
    assert any("retry 1" in m for m in said), said
    assert s3.fs.exists(f"{s3.bucket}/runs/outage/checkpoints/step-00000004/COMPLETE")


def test_persistent_outage_gives_up_that_checkpoint_and_keeps_earlier_ones(engine, s3, proxied):
    out = s3.url("runs", "down")
    root = f"{s3.bucket}/runs/down/checkpoints"
    ck, records, said = checkpointer(out, keep=1, upload_retries=2, upload_retry_seconds=0.2)
    step_weights(engine, 3.0)
    ck.save(engine, 4, {"train": {"stage": 1}})
    assert ck.wait()
    proxied.down()
    step_weights(engine, 5.0)
    ck.save(engine, 8, {"train": {"stage": 1}})
    with pytest.raises(Exception, match="step-00000008 could not be uploaded.*earlier checkpoints are intact"):
        ck.finish()
    proxied.up()
    assert [r["retries"] for r in records if r["event"] == "checkpoint_upload" and not r["ok"]] == [2]
    assert ck.failed == ["step-00000008"]
    ck2, _, _ = checkpointer(out)
    assert ck2.latest()["tag"] == "step-00000004"   # the earlier one, untouched (keep=1 did not prune it)
    assert not s3.fs.exists(f"{root}/step-00000008/COMPLETE")
    step_weights(engine, 0.0)
    ck2.load(engine, "step-00000004", {}, module_only=True)
    assert all(float(p.detach().flatten()[0]) == 3.0 for p in engine.module.parameters())
