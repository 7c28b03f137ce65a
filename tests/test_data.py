"""Caption shards: synth, convert, inspect, the resumable exactly-once reading pipeline, encoders.

    OMP_NUM_THREADS=1 pytest -q tests/test_data.py
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import pickle
import re
import tarfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from sdn_dist.config import TextConfig
from sdn_dist.data import (RankStream, SkipCounter, build_text_encoder, count_samples,
                           encoder_from_record, expand_urls, inspect_shards, iter_batches,
                           iter_shard, make_loader, plan_epoch, shard_counts)
from sdn_dist.data.convert import convert_cub, convert_flowers, convert_folder
from sdn_dist.apps.synth.dataset import HELDOUT_PAIRS, make_synth, synth_sample
from sdn_dist.data.text import HashTextEncoder
from sdn_dist.errors import ConfigError, DataError, UserError

SIZE = 32
N_TRAIN, N_TEST, PER_SHARD = 60, 20, 16


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    make_synth(str(out), train=N_TRAIN, test=N_TEST, size=SIZE, per_shard=PER_SHARD, seed=3,
               progress=False)
    return out


def _png(colour=(200, 30, 30), size=(20, 12), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "PNG")
    return buf.getvalue()


def _write_tar(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def _uneven_shards(root, sizes=(7, 3, 11, 5, 9)) -> list[str]:
    urls, k = [], 0
    for s, n in enumerate(sizes):
        path = root / f"train-{s:06d}.tar"
        members = []
        for _ in range(n):
            members += [(f"s{k:04d}.png", _png((k * 7 % 255, 10, 10))),
                        (f"s{k:04d}.txt", f"caption {k}\nother {k}".encode())]
            k += 1
        _write_tar(path, members)
        urls.append(str(path))
    return urls


# ---------------------------------------------------------------------------------------------
# synth -> inspect -> read back
# ---------------------------------------------------------------------------------------------

def test_synth_inspect_and_roundtrip(synth_dir):
    info = inspect_shards(str(synth_dir / "train-*.tar"))
    assert info["samples"] == N_TRAIN and info["shards"] == 4
    assert [s["samples"] for s in info["per_shard"]] == [16, 16, 16, 12]
    # make_synth wrote a shard index: counts from it, members from the one shard read
    assert info["counts_from"] == {"index": 4} and info["extensions_from"] == 1
    assert info["extensions"] == {"json": PER_SHARD, "png": PER_SHARD, "txt": PER_SHARD}
    assert info["example"]["captions"] and info["example"]["meta"]["attributes"]
    assert count_samples(str(synth_dir)) == N_TRAIN + N_TEST  # a directory: every *.tar

    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        seen = 0
        for url in expand_urls(str(synth_dir / f"{split}-*.tar")):
            for _, raw in iter_shard(url):
                i = int(raw["__key__"][len(split):])
                ref = synth_sample(split, i, size=SIZE, seed=3)
                assert raw["__key__"] == ref["key"] and raw["png"] == ref["png"]
                assert raw["txt"].decode().split("\n") == ref["captions"]
                meta = json.loads(raw["json"])
                assert meta["attributes"] == ref["meta"]["attributes"]
                assert set(meta["attributes"]) == {"shape", "colour", "size", "position", "background"}
                assert (meta.get("split_kind") in ("seen", "heldout", "paraphrase")) == (split == "test")
                seen += 1
        assert seen == n

    # The decoded pipeline gives the same pixels, every sample once, in order without shuffle.
    batches = list(iter_batches(str(synth_dir / "train-*.tar"), image_size=SIZE, batch_size=7,
                                shuffle=False, epochs=1, caption="first"))
    keys = [k for b in batches for k in b["key"]]
    assert keys == [f"train{i:07d}" for i in range(N_TRAIN)]
    b = batches[1]
    assert b["image"].shape == (7, 3, SIZE, SIZE) and b["image"].dtype == torch.float32
    assert b["text"] is None and b["index"] == 7 and b["epoch"] == [0] * 7
    ref = synth_sample("train", 8, size=SIZE, seed=3)
    expect = torch.from_numpy(np.array(ref["image"])).permute(2, 0, 1).float() / 255
    assert torch.allclose(b["image"][1], expect)
    assert b["captions"][1] == ref["captions"][0] and b["meta"][1]["attributes"] == ref["meta"]["attributes"]


def test_synth_deterministic_and_heldout(tmp_path, synth_dir):
    again = tmp_path / "again"
    make_synth(str(again), train=N_TRAIN, test=N_TEST, size=SIZE, per_shard=PER_SHARD, seed=3, progress=False)
    for name in ("train-000000.tar", "train-000003.tar", "test-000001.tar"):
        assert (again / name).read_bytes() == (synth_dir / name).read_bytes()
    other = synth_sample("train", 0, size=SIZE, seed=4)
    assert other["png"] != synth_sample("train", 0, size=SIZE, seed=3)["png"]

    train = [synth_sample("train", i, size=SIZE, seed=3) for i in range(300)]
    test = [synth_sample("test", i, size=SIZE, seed=3) for i in range(60)]
    pair = lambda s: (s["meta"]["attributes"]["shape"], s["meta"]["attributes"]["colour"])  # noqa: E731
    assert not any(pair(s) in HELDOUT_PAIRS for s in train)
    kinds = [s["meta"]["split_kind"] for s in test]
    assert kinds.count("heldout") == 30 and kinds.count("seen") == 15 and kinds.count("paraphrase") == 15
    assert all((pair(s) in HELDOUT_PAIRS) == (s["meta"]["split_kind"] == "heldout") for s in test)
    # paraphrase captions use only test templates, seen and held-out ones only training templates
    for s in test:
        prefix = "test" if s["meta"]["split_kind"] == "paraphrase" else "train"
        assert all(t.startswith(prefix) for t in s["meta"]["templates"])
    train_words = {w for s in train for c in s["captions"] for w in re.findall(r"[a-z]+", c)}
    para_words = {w for s in test if s["meta"]["split_kind"] == "paraphrase" for c in s["captions"]
                  for w in re.findall(r"[a-z]+", c)}
    assert {"backdrop", "quadrant", "region"} & para_words and not {"backdrop", "quadrant", "region"} & train_words
    assert all(0.15 <= s["meta"]["area"] <= 0.4 for s in train)


# ---------------------------------------------------------------------------------------------
# fsspec: the same shards over HTTP
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def http_root(synth_dir):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=str(synth_dir)))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.timeout(60)
def test_http_reads_same_samples_as_disk(synth_dir, http_root):
    url = http_root + "/train-{000000..000003}.tar"
    assert shard_counts(expand_urls(url)) == [16, 16, 16, 12]
    assert inspect_shards(url)["samples"] == N_TRAIN
    kw = dict(image_size=SIZE, batch_size=8, shuffle=True, seed=5, epochs=1)
    remote = list(iter_batches(url, **kw))
    local = list(iter_batches(str(synth_dir / "train-{000000..000003}.tar"), **kw))
    assert [b["key"] for b in remote] == [b["key"] for b in local]
    assert [b["captions"] for b in remote] == [b["captions"] for b in local]
    assert all(torch.equal(r["image"], s["image"]) for r, s in zip(remote, local))
    with pytest.raises(DataError, match="missing.tar"):
        inspect_shards(http_root + "/missing.tar")


# ---------------------------------------------------------------------------------------------
# Planning, exactly-once over ranks x loader workers, resume
# ---------------------------------------------------------------------------------------------

def test_plan_epoch_covers_every_sample_once_and_permutes_shards():
    counts = [7, 3, 11, 0, 5, 9]
    orders = set()
    for epoch in range(5):
        plan = plan_epoch(counts, epoch, seed=1, shuffle=True)
        assert plan == plan_epoch(counts, epoch, seed=1, shuffle=True)
        got = sorted((k, i) for k, a, b in plan for i in range(a, b))
        assert got == sorted((k, i) for k, c in enumerate(counts) for i in range(c))
        orders.add(tuple(k for k, _, _ in plan))
    assert len(orders) > 1  # shards permuted per epoch
    flat = plan_epoch(counts, 0, 1, shuffle=False)
    assert [k for k, _, _ in flat] == [0, 1, 2, 4, 5]


@pytest.mark.timeout(120)
def test_exactly_once_two_ranks_two_loader_workers(tmp_path):
    """Two ranks split each epoch of the global stream by micro-batch (rank r: batches r, r+2, ...),
    two loader workers each give back the rank's single-process order, and the ranks' batches
    together are the epoch's samples, each once, in the order one rank alone reads them."""
    urls = _uneven_shards(tmp_path)
    counts = shard_counts(urls)
    assert counts == [7, 3, 11, 5, 9]
    all_keys = {f"s{k:04d}" for k in range(35)}
    alone = RankStream(urls, counts, 0, 1, seed=11, shuffle=True, image_size=8, shuffle_buffer=4)
    for epoch in (0, 1):
        per_rank = []
        for rank in range(2):
            stream = RankStream(urls, counts, rank, 2, seed=11, shuffle=True, image_size=8, shuffle_buffer=4)
            lo, hi = stream.epoch_start(epoch), stream.epoch_start(epoch + 1)
            assert (lo, hi) == (35 * epoch, 35 * epoch + 35)       # positions are global
            loader = make_loader(stream, start_sample=lo, stop_sample=hi, batch_size=4, num_workers=2)
            batches = list(loader)
            ref = list(stream.iter_samples(lo, 0, 1, 4, hi))  # the single-process order
            assert [b["key"] for b in batches] == [b["key"] for b in ref]
            assert [b["index"] for b in batches] == list(range(lo + 4 * rank, hi, 8))
            assert all(e == epoch for b in batches for e in b["epoch"])
            per_rank.append(batches)
        merged = sorted(per_rank[0] + per_rank[1], key=lambda b: b["index"])
        keys = [k for b in merged for k in b["key"]]
        assert len(keys) == len(set(keys)) and set(keys) == all_keys
        assert keys == [k for b in alone.iter_samples(lo, 0, 1, 4, hi) for k in b["key"]]
        assert abs(sum(b["size"] for b in per_rank[0]) - sum(b["size"] for b in per_rank[1])) <= 4


def test_resume_gives_same_continuation(tmp_path):
    urls = _uneven_shards(tmp_path)
    counts = shard_counts(urls)
    stream = RankStream(urls, counts, 1, 2, seed=2, shuffle=True, image_size=8, caption="random",
                        shuffle_buffer=5)
    full = []
    for b in stream.iter_samples(0, batch_size=3):
        full.append(b)
        if len(full) == 10:  # global positions 0-59: crosses the epoch boundary at 35
            break
    for k in (1, 5, 6, 7):
        resumed = stream.iter_samples(start_sample=2 * 3 * k, batch_size=3)   # both ranks drew k batches
        for want in full[k:k + 3]:
            got = next(resumed)
            assert got["key"] == want["key"] and got["captions"] == want["captions"]
            assert got["index"] == want["index"] and torch.equal(got["image"], want["image"])
    # rank 1's batches are its slices of the one global sequence ...
    alone = RankStream(urls, counts, 0, 1, seed=2, shuffle=True, image_size=8, caption="random", shuffle_buffer=5)
    seq = [(k, c) for b in alone.iter_samples(0, batch_size=3, stop_sample=60) for k, c in zip(b["key"], b["captions"])]
    assert [b["index"] for b in full] == list(range(3, 60, 6))
    assert all(list(zip(b["key"], b["captions"])) == seq[b["index"]:b["index"] + 3] for b in full)
    # ... and a resume offset that is not a multiple of the batch size still continues that sequence
    odd = [(k, c) for b in alone.iter_samples(start_sample=8, batch_size=5, stop_sample=38)
           for k, c in zip(b["key"], b["captions"])]
    assert odd == seq[8:38]


def _train_draws(urls, counts, state, world: int, accum: int, steps: int, readers: int = 2) -> list[str]:
    """What ``world`` ranks draw in ``steps`` optimizer steps from ``state.data_position``, as the
    trainer does it: each rank's ``readers`` reader streams (ShardReader: worker j of readers), the
    rank asking reader i % readers for its micro-batch i; the position advancing by DataFeed.slots
    per micro-batch. -> the keys in global order (step by step, micro-batch by micro-batch, rank by
    rank)."""
    micro = 12 // (world * accum)                         # data.batch_size = 12 at every world size
    start = state.data_position
    its = [[RankStream(urls, counts, r, world, seed=7, shuffle=True, image_size=8, shuffle_buffer=4)
            .iter_samples(start, j, readers, micro) for j in range(readers)] for r in range(world)]
    keys = []
    for i in range(steps * accum):
        for r in range(world):
            b = next(its[r][i % readers])
            assert b["index"] == state.data_position + r * micro      # rank r's share of this step
            keys += b["key"]
        state.data_position += micro * world
    state.step += steps
    return keys


def test_the_sample_order_is_global_at_any_world_size_and_across_a_resize(tmp_path):
    """Issue 34: the concatenation over steps of what the ranks draw is one sequence at 1, 2 or 3
    workers (grad_accum 1 or 2), each epoch's 35 samples once each; and a run at 2 workers
    checkpointed, resumed at 1 and then at 2 again (TrainState through its JSON form) draws exactly
    the uninterrupted run's sequence. Fails on: the rank put back into the shuffle buffer's seed
    (or any per-rank plan), a restore that rescales data_position by the world sizes."""
    from sdn_dist.config import load_config
    from sdn_dist.training.state import TrainState
    urls = _uneven_shards(tmp_path)
    counts = shard_counts(urls)
    cfg = load_config("debug", overrides=["data.batch_size=12"])
    steps = 7                                                  # 84 samples: into a third epoch
    ref = _train_draws(urls, counts, TrainState.start(cfg.stage1, cfg.stage2, 1), 1, 1, steps)
    all_keys = {f"s{k:04d}" for k in range(35)}
    assert set(ref[:35]) == set(ref[35:70]) == all_keys and ref[:35] != ref[35:70]
    for world in (1, 2, 3):
        for accum in (1, 2):
            assert _train_draws(urls, counts, TrainState.start(cfg.stage1, cfg.stage2, world), world, accum, steps) == ref, (world, accum)

    state, got = TrainState.start(cfg.stage1, cfg.stage2, 2), []
    for world, n in ((2, 2), (1, 3), (2, 2)):                  # cut mid-epoch: at 24 and 60
        if got:
            saved = json.loads(json.dumps(state.state_dict()))     # as the COMPLETE marker keeps it
            state = TrainState.start(cfg.stage1, cfg.stage2, world)
            state.load_state_dict(saved)
        got += _train_draws(urls, counts, state, world, 1, n)
    assert got == ref and state.data_position == steps * 12


def _feed_draws(urls, counts, world: int, readers: int, chunk: int, start: int, n: int) -> list:
    """What each of ``world`` ranks' feeds (``ChunkedFeed``: DataFeed without Ray, its readers
    plain streams doing what ShardReader.next does) returns in ``n`` next() calls from global
    position ``start``: per call, the batch's index, keys, captions, image bytes and the feed's
    skip total after it."""
    from sdn_dist.data.readers import ChunkedFeed, take_batches
    out = []
    for r in range(world):
        streams = [RankStream(urls, counts, r, world, seed=5, shuffle=True, image_size=8, shuffle_buffer=4)
                   for _ in range(readers)]
        its = [s.iter_samples(start, j, readers, 3, uint8=True) for j, s in enumerate(streams)]
        feed = ChunkedFeed(readers, chunk, prefetch=2, call=lambda j: take_batches(its[j], streams[j], chunk),
                           get=lambda got: got)
        for _ in range(n):
            b = feed.next()
            out.append((r, b.index, b.captions, b.image.tobytes(), dict(feed.skipped)))
    return out


def test_reader_chunks_change_no_batch_nor_skip_count(tmp_path):
    """Issue 35: readers returning data.reader_chunk micro-batches per call give a rank the very
    batches, in the same order, with the same running skip counts, as one per call: 2 ranks x 2
    readers, chunk 1 / 3 / 4, from a start that is no multiple of a chunk's micro-batches, over
    bad samples and into a third epoch. Fails on: ChunkedFeed.next taking micro-batch i from
    reader (i // chunk) % R (a chunk as consecutive rank micro-batches) instead of i % R; each
    Batch of a chunk carrying the skip counts as they stood at the chunk's end (in take_batches)."""
    good = _png()
    members = []
    for k in range(23):
        bad = k % 5 == 2                                           # every fifth: a truncated image
        members += [(f"s{k:04d}.png", good[: len(good) // 2] if bad else _png((k * 9 % 255, 5, 5))),
                    (f"s{k:04d}.txt", f"caption {k}\nother {k}".encode())]
    urls = []
    for s, (a, b) in enumerate(((0, 14), (14, 22), (22, 46))):
        _write_tar(tmp_path / f"train-{s:06d}.tar", members[a:b])
        urls.append(str(tmp_path / f"train-{s:06d}.tar"))
    counts = shard_counts(urls)
    ref = _feed_draws(urls, counts, 2, 2, 1, 7, 14)              # 2 x 14 x 3 slots from 7: into epoch 3
    assert [x[1] for x in ref[:14]] == [7 + 6 * i for i in range(14)]   # rank 0: global micro-batches 0, 2, ...
    assert ref[13][4]["bad_image"] > 0
    for chunk in (3, 4):
        assert _feed_draws(urls, counts, 2, 2, chunk, 7, 14) == ref, chunk


def test_keep_in_memory_reads_each_shard_once_and_changes_no_batch(tmp_path):
    """keep_in_memory (teacher training): after the first epoch the stream needs neither the
    shards nor the PNG decoder, and every batch is the one the plain stream gives."""
    urls = _uneven_shards(tmp_path)
    counts = shard_counts(urls)

    def stream(**kw):
        return RankStream(urls, counts, 0, 1, seed=3, shuffle=True, image_size=8, caption="random",
                          shuffle_buffer=5, **kw)
    plain = list(stream().iter_samples(0, batch_size=5, stop_sample=105))     # 3 epochs of 35
    kept = stream(keep_in_memory=True).iter_samples(0, batch_size=5)
    got = [next(kept) for _ in range(7)]                                       # the first epoch
    for u in urls:
        os.remove(u)
    got += [next(kept) for _ in range(14)]
    assert len(got) == len(plain) == 21
    assert [b["key"] for b in got[7:14]] != [b["key"] for b in got[:7]]      # reshuffled per epoch
    for g, p in zip(got, plain):
        assert g["key"] == p["key"] and g["captions"] == p["captions"] and g["index"] == p["index"]
        assert torch.equal(g["image"], p["image"])


def test_keep_in_memory_on_one_of_two_ranks_reads_each_shard_once(tmp_path):
    """A rank's micro-batches are another part of every shard each epoch: keep_in_memory keeps the
    whole of each shard it opens, so the later epochs still need no shard, and change no batch.
    Fails on: keeping only the rank's own samples (the second epoch reopens the deleted shards)."""
    urls = _uneven_shards(tmp_path)
    counts = shard_counts(urls)

    def stream(**kw):
        return RankStream(urls, counts, 1, 2, seed=3, shuffle=True, image_size=8, shuffle_buffer=5, **kw)
    plain = list(stream().iter_samples(0, batch_size=2, stop_sample=104))
    kept = stream(keep_in_memory=True)
    got = list(kept.iter_samples(0, batch_size=2, stop_sample=36))    # the first epoch: every shard
    for u in urls:                                                     # holds one of rank 1's batches
        os.remove(u)
    got += list(kept.iter_samples(36, batch_size=2, stop_sample=104))  # 36: both ranks drew 9 batches
    assert [(b["key"], b["index"]) for b in got] == [(b["key"], b["index"]) for b in plain]
    assert all(torch.equal(g["image"], p["image"]) for g, p in zip(got, plain))


def _cached_run(tmp_path, monkeypatch, **kw):
    """3 epochs (35 samples each) of a shuffled stream -> (batches, images decoded, the stream)."""
    from sdn_dist.data import pipeline
    tmp_path.mkdir()
    urls = _uneven_shards(tmp_path)
    decoded = []
    decode = pipeline.decode_image
    monkeypatch.setattr(pipeline, "decode_image", lambda *a, **k: decoded.append(1) or decode(*a, **k))
    stream = RankStream(urls, shard_counts(urls), 0, 1, seed=3, shuffle=True, image_size=8, caption="random",
                        shuffle_buffer=5, **kw)
    return list(stream.iter_samples(0, batch_size=5, stop_sample=105)), len(decoded), stream


def _same_batches(got, plain):
    assert len(got) == len(plain) == 21
    assert [b["key"] for b in got[7:14]] != [b["key"] for b in got[:7]]      # reshuffled per epoch
    for g, p in zip(got, plain):
        assert g["key"] == p["key"] and g["captions"] == p["captions"] and g["index"] == p["index"]
        assert torch.equal(g["image"], p["image"])


def test_cache_bytes_decodes_each_image_once_and_changes_no_batch(tmp_path, monkeypatch):
    """data.cache_bytes: later epochs take the decoded images from the cache, and every batch (order,
    captions, pixels) is the one the stream gives without it."""
    plain, n_plain, _ = _cached_run(tmp_path / "a", monkeypatch)
    cached, n_cached, stream = _cached_run(tmp_path / "b", monkeypatch, cache_bytes=1 << 20)
    assert (n_plain, n_cached) == (105, 35)
    assert len(stream._cache) == 35 and 35 * 8 * 8 * 3 < stream.cached_bytes < 1 << 20
    _same_batches(cached, plain)


def test_cache_bytes_is_a_bound(tmp_path, monkeypatch):
    """Room for about 10 of the 35 samples: those are kept, the others decoded again every epoch."""
    plain, _, _ = _cached_run(tmp_path / "a", monkeypatch)
    bound = 10 * (8 * 8 * 3 + 20)
    cached, n, stream = _cached_run(tmp_path / "b", monkeypatch, cache_bytes=bound)
    kept = len(stream._cache)
    assert 5 <= kept < 35 and stream.cached_bytes <= bound
    assert n == 35 + 2 * (35 - kept)
    _same_batches(cached, plain)


def test_readers_ship_uint8_and_the_trainer_gets_the_same_float_batch(synth_dir):
    """Reader actors send the decoded uint8 images (a quarter of the bytes through Ray's object
    store) and the trainer converts them: the step sees exactly the float batch the stream would
    have made itself."""
    from sdn_dist.training.loop import prepare_batch
    urls = expand_urls(str(synth_dir / "train-*.tar"))
    stream = RankStream(urls, shard_counts(urls), 0, 1, seed=5, shuffle=True, image_size=SIZE, shuffle_buffer=4)
    as_float = list(stream.iter_samples(0, batch_size=4, stop_sample=12))
    as_uint8 = list(stream.iter_samples(0, batch_size=4, stop_sample=12, uint8=True))
    assert len(as_float) == len(as_uint8) == 3
    for f, u in zip(as_float, as_uint8):
        assert u["image"].dtype == torch.uint8 and u["image"].shape == (4, SIZE, SIZE, 3)
        assert u["image"].numpy().nbytes * 4 == f["image"].numpy().nbytes
        real, _ = prepare_batch(u["image"].numpy(), np.zeros((4, 2), np.float32), torch.device("cpu"), torch.float32)
        assert real.dtype == torch.float32 and torch.equal(real, f["image"])
        assert f["image"].max() <= 1.0 and f["image"].max() > 0.5     # [0, 1], not [0, 255]


# ---------------------------------------------------------------------------------------------
# Bad data
# ---------------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_bad_samples_skipped_and_counted(tmp_path):
    good = _png()
    path = tmp_path / "bad-000000.tar"
    _write_tar(path, [
        ("a.png", good), ("a.txt", b"first good"),
        ("b.png", good[: len(good) // 2]), ("b.txt", b"truncated image"),
        ("c.png", b"this is not an image at all"), ("c.txt", b"not an image"),
        ("d.png", good), ("d.json", b"{}"),  # no caption
        ("e.png", good), ("e.txt", b"last good"),
    ])
    skips = SkipCounter()
    batches = list(iter_batches(str(path), image_size=16, batch_size=2, shuffle=False, epochs=1, skips=skips))
    assert [k for b in batches for k in b["key"]] == ["a", "e"]
    assert skips.as_dict() == {"bad_image": 1, "missing_caption": 1, "not_image": 1}
    assert [b["index"] for b in batches] == [0, 2, 4]  # short (even empty) batches keep positions
    assert [len(b["key"]) for b in batches] == [1, 0, 1] and batches[1]["image"].shape == (0, 3, 16, 16)
    assert sum((SkipCounter(b["skipped"]) for b in batches), SkipCounter()) == skips
    with pytest.raises(DataError, match=r"bad-000000\.tar sample b: bad_image"):
        list(iter_batches(str(path), image_size=16, batch_size=2, shuffle=False, epochs=1, strict=True))
    # an endless stream of nothing but bad samples fails instead of spinning
    allbad = tmp_path / "allbad.tar"
    _write_tar(allbad, [("x.png", b"junk"), ("x.txt", b"c")])
    with pytest.raises(DataError, match="no usable sample"):
        for _ in iter_batches(str(allbad), image_size=16, batch_size=1):  # infinite epochs
            pass


@pytest.mark.parametrize("cache_bytes", [0, 1 << 20])
def test_bad_samples_are_skipped_every_epoch_with_or_without_the_cache(tmp_path, cache_bytes):
    """data.cache_bytes keeps only good samples: a bad one is read, and counted, every epoch."""
    good = _png()
    path = tmp_path / "bad-000000.tar"
    _write_tar(path, [("a.png", good), ("a.txt", b"first good"), ("b.png", good[: len(good) // 2]),
                      ("b.txt", b"truncated image"), ("d.png", good), ("e.png", good), ("e.txt", b"last good")])
    skips = SkipCounter()
    batches = list(iter_batches(str(path), image_size=16, batch_size=2, shuffle=False, epochs=3, skips=skips,
                                cache_bytes=cache_bytes))
    assert [k for b in batches for k in b["key"]] == ["a", "e"] * 3
    assert skips.as_dict() == {"bad_image": 3, "missing_caption": 3}


@pytest.mark.timeout(30)
def test_bad_captions_and_embeddings(tmp_path):
    good = _png()

    def emb(rows, dim=4):
        return _npy(np.ones((rows, dim), np.float32))

    nan = np.ones((1, 4), np.float32)
    nan[0, 2] = np.nan
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    path = tmp_path / "emb-000000.tar"
    _write_tar(path, [
        ("a.png", good), ("a.txt", b"ok"), ("a.emb.npy", emb(1)),
        ("b.png", good), ("b.txt", b" \n \n"), ("b.emb.npy", emb(1)),
        ("c.png", good), ("c.txt", b"\x00\x01\x02\xff\xfe"), ("c.emb.npy", emb(1)),
        ("d.png", good), ("d.txt", b"ok"), ("d.emb.npy", emb(1, 5)),
        ("e.png", good), ("e.txt", b"ok"), ("e.emb.npy", _npy(nan)),
        ("f.png", good), ("f.txt", b"ok"), ("f.emb.npy", pickled.getvalue()),
        ("g.png", good), ("g.txt", b"ok"),
        ("h.txt", b"caption without image"),
        ("i.png", good), ("i.txt", b"ok"), ("i.json", b"[1, 2]"),
        ("j.png", _png(mode="RGBA", colour=(0, 0, 0, 0))), ("j.txt", b"ok\nsecond"),
        ("j.emb.npy", _npy(np.stack([np.zeros(4), np.ones(4)]).astype(np.float32))),
    ])
    enc = build_text_encoder(TextConfig(encoder="precomputed", dim=4))
    skips = SkipCounter()
    out = list(iter_batches(str(path), image_size=8, batch_size=4, text_encoder=enc, shuffle=False,
                            epochs=1, caption="first", skips=skips))
    assert [k for b in out for k in b["key"]] == ["a", "j"]
    assert skips.as_dict() == {"bad_caption": 1, "bad_embedding": 2, "bad_meta": 1, "empty_caption": 1,
                               "missing_embedding": 1, "missing_image": 1, "nan_embedding": 1}
    j = out[-1]
    assert j["text"].shape == (1, 4) and torch.equal(j["text"][0], torch.zeros(4))
    assert torch.allclose(j["image"], torch.ones_like(j["image"]))  # transparent -> white
    with pytest.raises(UserError, match="precomputed"):
        enc.encode(["free text"])


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_members_never_extracted(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    path = tmp_path / "evil.tar"
    _write_tar(path, [("../../evil.png", _png()), ("../../evil.txt", b"hi"),
                      ("/tmp/abs_evil_sdn.txt", b"x"), ("ok.png", _png()), ("ok.txt", b"fine")])
    before = {p for p in tmp_path.rglob("*")}
    batches = list(iter_batches(str(path), image_size=8, batch_size=4, shuffle=False, epochs=1))
    assert batches[0]["key"] == ["../../evil", "ok"]  # just odd keys, read in memory
    assert {p for p in tmp_path.rglob("*")} == before
    assert not os.path.exists("/tmp/abs_evil_sdn.txt")


@pytest.mark.timeout(30)
def test_inspect_bad_shards_name_them(tmp_path, synth_dir):
    nontar = tmp_path / "nontar.tar"
    nontar.write_bytes(b"hello, I am not a tar archive" * 40)
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    notar_members = tmp_path / "nosamples.tar"
    _write_tar(notar_members, [])
    whole = (synth_dir / "train-000000.tar").read_bytes()
    cut_mid = tmp_path / "cutmid.tar"
    cut_mid.write_bytes(whole[: len(whole) // 2 + 100])
    cut_edge = tmp_path / "cutedge.tar"
    with tarfile.open(synth_dir / "train-000000.tar") as tf:
        third = tf.getmembers()[3]  # cut exactly at a member header: tarfile alone stops quietly
    cut_edge.write_bytes(whole[: third.offset])
    for bad in (nontar, empty, notar_members, cut_mid, cut_edge, tmp_path / "missing.tar"):
        with pytest.raises(DataError, match=bad.name):
            inspect_shards(str(bad))
    with pytest.raises(DataError, match="cutmid.tar"):
        list(iter_batches([str(synth_dir / "train-000001.tar"), str(cut_mid)], image_size=8,
                          batch_size=4, shuffle=False, epochs=1))
    # a shard that shrank after counting is an error when reading, never a hang
    stream = RankStream([str(cut_edge)], [16], image_size=8, shuffle=False)
    with pytest.raises(DataError, match="cutedge.tar ended after 1 samples"):
        list(stream.iter_samples(0, batch_size=4, stop_sample=16))
    with pytest.raises(DataError, match="no shards match"):
        expand_urls(str(tmp_path / "nothing-*.tar"))


def test_expand_urls(synth_dir):
    d = str(synth_dir)
    train = [f"{d}/train-{i:06d}.tar" for i in range(4)]
    assert expand_urls(f"{d}/train-{{000000..000003}}.tar") == train
    assert expand_urls(f"{d}/train-*.tar") == train
    assert expand_urls(f"file://{d}/train-*.tar") == train
    assert expand_urls([train[2], f"{d}/test-*.tar"]) == [train[2], f"{d}/test-000000.tar", f"{d}/test-000001.tar"]
    assert expand_urls(d) == sorted([f"{d}/test-000000.tar", f"{d}/test-000001.tar"] + train)


# ---------------------------------------------------------------------------------------------
# Converters
# ---------------------------------------------------------------------------------------------

def test_folder_converter(tmp_path):
    img = tmp_path / "imgs"
    (img / "sub").mkdir(parents=True)
    Image.new("RGB", (30, 20), (10, 200, 10)).save(img / "a.png")
    Image.new("L", (16, 16), 128).save(img / "sub" / "b.jpg")
    Image.new("P", (12, 12), 3).save(img / "c.gif")
    Image.new("RGBA", (12, 12), (200, 0, 0, 255)).save(img / "d.png")
    lines = [{"image": "a.png", "caption": "a green box", "label": "plant"},
             {"image": "sub/b.jpg", "captions": ["grey square", "a flat grey image"], "label": "rock"},
             {"image": "c.gif", "caption": "palette image", "label": "plant", "source_url": "x"},
             {"image": "d.png", "caption": "red", "label": "rock"}]
    caps = tmp_path / "caps.jsonl"
    caps.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out"
    res = convert_folder(img, caps, str(out), test_fraction=0.25, per_shard=2, progress=False)
    assert res["counts"] == {"train": 3, "test": 1}
    assert inspect_shards(str(out / "train-*.tar"))["samples"] == 3
    got = {}
    for b in iter_batches(str(out), image_size=16, batch_size=8, shuffle=False, epochs=1, caption="first"):
        for c, m, im in zip(b["captions"], b["meta"], b["image"]):
            got[m["source"]] = (c, m, im)
    assert set(got) == {"a.png", "sub/b.jpg", "c.gif", "d.png"}
    assert got["sub/b.jpg"][1]["label"] == 1 and got["sub/b.jpg"][1]["label_name"] == "rock"
    assert got["c.gif"][1]["source_url"] == "x" and got["a.png"][1]["label"] == 0
    assert torch.allclose(got["sub/b.jpg"][2], torch.full((3, 16, 16), 128 / 255), atol=0.02)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        convert_folder(img, bad, str(tmp_path / "o2"), progress=False)
    bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"image": "nope.png", "caption": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: image .*nope\.png does not exist"):
        convert_folder(img, bad, str(tmp_path / "o3"), progress=False)
    bad.write_text(json.dumps({"image": "a.png"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: needs \"caption\""):
        convert_folder(img, bad, str(tmp_path / "o4"), progress=False)


def _fake_stackgan(root, n_train=4, n_test=2, dim=1024):
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    rng = np.random.default_rng(0)
    for split, n, off in (("train", n_train, 0), ("test", n_test, 100)):
        names, cls, embs = [], [], []
        for i in range(n):
            c = i % 2
            name = f"{classes[c]}/{classes[c].split('.')[1]}_{off + i:04d}_{i}"
            (root / "CUB_200_2011" / "images" / classes[c]).mkdir(parents=True, exist_ok=True)
            (root / "text_c10" / classes[c]).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), (20 * i, 100, 50)).save(root / "CUB_200_2011" / "images" / f"{name}.jpg")
            caps = [f"this bird number {off + i} has caption {j}" for j in range(10)]
            (root / "text_c10" / f"{name}.txt").write_text("\n".join(caps) + "\n")
            names.append(name)
            cls.append(c + 1)
            embs.append(rng.standard_normal((10, dim)).astype(np.float32))
        (root / split).mkdir(parents=True, exist_ok=True)
        for fname, obj in (("filenames.pickle", names), ("class_info.pickle", cls),
                           ("char-CNN-RNN-embeddings.pickle", np.stack(embs))):
            with open(root / split / fname, "wb") as f:
                pickle.dump(obj, f, protocol=2)
    return root


def test_cub_converter_with_embeddings(tmp_path):
    root = _fake_stackgan(tmp_path / "birds")
    out = tmp_path / "cub"
    res = convert_cub(root, str(out), per_shard=3, progress=False)
    assert res["counts"] == {"train": 4, "test": 2} and len(res["train"]) == 2
    info = inspect_shards(str(out / "train-*.tar"), scan=True)
    assert info["extensions"] == {"emb.npy": 4, "jpg": 4, "json": 4, "txt": 4}
    with open(root / "train" / "char-CNN-RNN-embeddings.pickle", "rb") as f:
        embs = pickle.load(f)
    enc = build_text_encoder(TextConfig(encoder="precomputed", dim=1024))
    n = 0
    for b in iter_batches(str(out / "train-*.tar"), image_size=16, batch_size=3, text_encoder=enc,
                          shuffle=False, epochs=1, caption="random", seed=1):
        assert b["text"].shape == (len(b["key"]), 1024)
        for t, c, m in zip(b["text"], b["captions"], b["meta"]):
            i = int(c.split()[3])  # "this bird number {i} has caption {j}"
            j = int(c.split()[-1])
            assert torch.equal(t, torch.from_numpy(embs[i][j]))
            assert m["class_id"] == i % 2 + 1 and m["label"] == i % 2
            assert m["class_name"] in m["filename"]
            n += 1
    assert n == 4

    # Only plain containers and numpy arrays are unpickled: anything else is refused, not run.
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(root / "test" / "filenames.pickle", "wb") as f:
        pickle.dump(Evil(), f, protocol=2)
    with pytest.raises(DataError, match="refusing to load"):
        convert_cub(root, str(tmp_path / "cub2"), progress=False)
    assert not (tmp_path / "pwned").exists()


def _py2_pickle_of_strs(items: list[bytes]) -> bytes:
    """A list of Python-2 ``str`` exactly as Python 2's pickle (protocol 2) writes it: each item a
    SHORT_BINSTRING of raw bytes, which Python 3 can read only with an ``encoding``."""
    out = b"\x80\x02](" + b"".join(b"U" + bytes([len(i)]) + i for i in items)
    return out + b"e."


def test_cub_converter_reads_python2_pickles_as_latin1(tmp_path):
    root = _fake_stackgan(tmp_path / "birds", n_train=2, n_test=1)
    with open(root / "train" / "filenames.pickle", "rb") as f:
        names = pickle.load(f)
    # Rename the first image to a latin-1 name (0xE9 = e-acute: not valid UTF-8 on its own).
    new = names[0] + "\u00e9"
    for sub, ext in (("CUB_200_2011/images", ".jpg"), ("text_c10", ".txt")):
        os.rename(root / sub / f"{names[0]}{ext}", root / sub / f"{new}{ext}")
    (root / "train" / "filenames.pickle").write_bytes(
        _py2_pickle_of_strs([new.encode("latin1"), names[1].encode("latin1")]))
    with pytest.raises(UnicodeDecodeError):   # what a plain Python-3 unpickler makes of it
        pickle.loads((root / "train" / "filenames.pickle").read_bytes())
    out = tmp_path / "cub"
    res = convert_cub(root, str(out), progress=False)
    assert res["counts"] == {"train": 2, "test": 1}
    files = {m["filename"] for b in iter_batches(str(out / "train-*.tar"), image_size=16, batch_size=4,
                                                shuffle=False, epochs=1) for m in b["meta"]}
    assert files == {new, names[1]}


def _fake_flowers(root, n_train=3, n_test=2):
    """StackGAN's Oxford-102 layout: images flat in jpg/, captions under text_c10/class_XXXXX/."""
    (root / "jpg").mkdir(parents=True)
    k = 0
    for split, n in (("train", n_train), ("test", n_test)):
        names, cls = [], []
        for _ in range(n):
            k += 1
            c = 1 + k % 2
            Image.new("RGB", (24, 36), (10 * k, 200, 30)).save(root / "jpg" / f"image_{k:05d}.jpg")
            d = root / "text_c10" / f"class_{c:05d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"image_{k:05d}.txt").write_text(f"flower {k} has pink petals\nflower {k} is bright\n")
            # keys with the class folder (train) and without (test: captions are found by name)
            names.append(f"class_{c:05d}/image_{k:05d}" if split == "train" else f"image_{k:05d}")
            cls.append(c)
        (root / split).mkdir()
        (root / split / "filenames.pickle").write_bytes(_py2_pickle_of_strs([x.encode() for x in names]))
        with open(root / split / "class_info.pickle", "wb") as f:
            pickle.dump(cls, f, protocol=2)
    return root


def test_flowers_converter(tmp_path):
    root = _fake_flowers(tmp_path / "flowers")
    res = convert_flowers(root, str(tmp_path / "out"), per_shard=2, progress=False)
    assert res["counts"] == {"train": 3, "test": 2} and len(res["train"]) == 2
    got = {}
    for b in iter_batches(str(tmp_path / "out" / "train-*.tar"), image_size=16, batch_size=8, shuffle=False,
                          epochs=1, caption="first"):
        for c, m in zip(b["captions"], b["meta"]):
            got[m["filename"]] = (c, m)
    assert set(got) == {"class_00002/image_00001", "class_00001/image_00002", "class_00002/image_00003"}
    cap, meta = got["class_00001/image_00002"]
    assert cap == "flower 2 has pink petals"
    assert meta["source"] == "flowers" and meta["class_name"] == "class_00001"
    assert meta["class_id"] == 1 and meta["label"] == 0
    test = {m["filename"]: (c, m) for b in iter_batches(str(tmp_path / "out" / "test-*.tar"), image_size=16,
                                                       batch_size=8, shuffle=False, epochs=1, caption="first")
            for c, m in zip(b["captions"], b["meta"])}
    assert set(test) == {"image_00004", "image_00005"}
    assert test["image_00005"][0] == "flower 5 has pink petals" and test["image_00005"][1]["class_name"] == "class_00002"


def test_shards_convert_cli(tmp_path):
    """`sdn-dist shards convert folder|cub|flowers` end to end through the command line."""
    import subprocess
    import sys

    def convert(*args):
        r = subprocess.run([sys.executable, "-m", "sdn_dist", "shards", "convert", *map(str, args)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout)

    img = tmp_path / "imgs"
    img.mkdir()
    lines = []
    for i in range(5):
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(img / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"red level {i}"}))
    (tmp_path / "caps.jsonl").write_text("\n".join(lines) + "\n")
    res = convert("folder", "--images", img, "--captions", tmp_path / "caps.jsonl", "--out", tmp_path / "f",
                  "--test-fraction", "0.2", "--per-shard", "2", "--embed", "hash")
    assert res["counts"] == {"train": 4, "test": 1}
    assert inspect_shards(str(tmp_path / "f" / "train-*.tar"), scan=True)["extensions"]["emb.npy"] == 4

    birds = _fake_stackgan(tmp_path / "birds", n_train=3, n_test=2, dim=8)
    res = convert("cub", "--root", birds, "--out", tmp_path / "c", "--per-shard", "2")
    assert res["counts"] == {"train": 3, "test": 2}
    assert inspect_shards(str(tmp_path / "c" / "train-*.tar"), scan=True)["extensions"]["emb.npy"] == 3

    res = convert("flowers", "--root", _fake_flowers(tmp_path / "flowers"), "--out", tmp_path / "fl")
    assert res["counts"] == {"train": 3, "test": 2}
    assert inspect_shards(str(tmp_path / "fl" / "test-*.tar"))["samples"] == 2

    r = subprocess.run([sys.executable, "-m", "sdn_dist", "shards", "convert", "cub", "--root", tmp_path / "nope",
                        "--out", tmp_path / "x"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "nope" in r.stderr


# ---------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------

def test_embeddings_stored_at_write_time_are_reused(tmp_path, monkeypatch):
    out = tmp_path / "emb"
    make_synth(str(out), train=10, test=0, size=16, per_shard=4, seed=1, progress=False,
               embed=HashTextEncoder(16))
    assert inspect_shards(str(out), scan=True)["extensions"]["emb.npy"] == 10
    enc = HashTextEncoder(16)
    monkeypatch.setattr(enc, "encode", lambda texts: pytest.fail("stored rows should be used"))
    pre = build_text_encoder(TextConfig(encoder="precomputed", dim=16))
    for e in (enc, pre):
        for b in iter_batches(str(out), image_size=16, batch_size=4, text_encoder=e, epochs=1, seed=2):
            assert b["meta"][0]["emb_encoder"] == {"encoder": "hash", "dim": 16, "version": 1}
            assert np.allclose(b["text"].numpy(), HashTextEncoder(16).encode(b["captions"]), atol=1e-6)
    other = HashTextEncoder(8)  # a different encoder: stored rows ignored, captions encoded
    b = next(iter_batches(str(out), image_size=16, batch_size=4, text_encoder=other, epochs=1))
    assert b["text"].shape == (4, 8)


def test_hash_encoder():
    enc = build_text_encoder(TextConfig(encoder="hash", dim=64))
    caps = ["a large red circle in the top left on a white background",
            "large red circle, top left corner, white background",
            "a small blue square in the bottom right on a black background"]
    v = enc.encode(caps)
    assert v.shape == (3, 64) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert np.array_equal(v, encoder_from_record(enc.record()).encode(caps))
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    assert enc.name == "hash" and enc.dim == 64


@pytest.mark.timeout(120)
def test_minilm_encoder_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    enc = build_text_encoder(TextConfig(encoder="minilm", dim=384))
    caps = ["a red circle on white", "a red disc on a light background", "a red circle on white"]
    v = enc.encode(caps)
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    assert np.array_equal(v[0], v[2]) and len(enc._cache) == 2
    with pytest.raises(ConfigError, match="text.dim=32"):
        build_text_encoder(TextConfig(encoder="minilm", dim=32))
    rec = enc.record()
    assert rec["encoder"] == "minilm" and rec["dim"] == 384
    assert encoder_from_record(rec).dim == 384


@pytest.mark.timeout(120)
def test_minilm_truncates_a_100kb_caption(monkeypatch):
    """A 100 KB caption is cut to the model's window (256 word pieces), like any caption longer
    than it: same embedding as its first 40 repeats (280 words, also cut), finite and unit-norm."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = build_text_encoder(TextConfig(encoder="minilm", dim=384))
    phrase = "a red circle on a white background "
    huge = phrase * 3000
    assert len(huge.encode()) > 100_000
    v = enc.encode([huge, phrase * 40, phrase * 20])
    assert np.isfinite(v).all() and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    assert np.allclose(v[0], v[1], atol=1e-5)
    assert not np.allclose(v[0], v[2], atol=1e-3)   # a shorter, uncut caption differs


@pytest.mark.parametrize("fault", ["endpoint", "reset"])
def test_an_object_store_down_for_a_while_is_retried_not_bad_input(monkeypatch, fault):
    """An s3:// shard whose endpoint is unreachable (botocore's EndpointConnectionError) or whose
    connections are reset, for two attempts, opens on the third: an outage is waited out with
    backoff (data.retries), not reported as a bad shard (exit 2). A missing shard still is, at
    once. Fails on: s3 opens not going through the retries, or botocore's errors not counted as
    network problems."""
    import botocore.exceptions

    from sdn_dist.data import shards
    errors = {"endpoint": lambda: botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
              "reset": lambda: ConnectionResetError(104, "Connection reset by peer")}
    calls = []

    class DownThenUp:
        def open(self, path, mode):
            calls.append(path)
            if path.endswith("missing.tar"):
                raise FileNotFoundError(path)
            if len(calls) <= 2:
                raise errors[fault]()
            return io.BytesIO(b"tar bytes")

    monkeypatch.setattr(shards, "filesystem", lambda proto: DownThenUp())
    monkeypatch.setattr(shards, "_NETWORK", shards.Network(retries=3, backoff=0.01))
    f, seekable = shards.open_shard("s3://bucket/train-000000.tar")
    assert f.read() == b"tar bytes" and not seekable and len(calls) == 3
    with pytest.raises(DataError, match="s3://bucket/missing.tar does not exist"):
        shards.open_shard("s3://bucket/missing.tar")
    calls.clear()
    monkeypatch.setattr(shards, "_NETWORK", shards.Network(retries=1, backoff=0.01))
    with pytest.raises(DataError, match=r"s3://bucket/train-000000.tar: cannot connect: .*gave up after 2 attempts \(data.retries=1\)"):
        shards.open_shard("s3://bucket/train-000000.tar")
