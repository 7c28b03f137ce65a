"""Shard indexes (sdn_dist/data/index.py) against a real S3 server (moto's server mode on
127.0.0.1, tests/conftest.py): with an index, start-up reads no tar; a stale entry is recounted;
img2dataset's _stats.json counts are used; a broken index is exit 2 naming file and key.

    pytest tests/test_index.py

"Reads no tar" is what the server itself logged: the GET requests of .tar objects.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from sdn_dist.cli import main
from sdn_dist.config import load_config
from sdn_dist.data.index import INDEX_NAME, count_shards
from sdn_dist.data.readers import DataSpec
from sdn_dist.data.shards import expand_urls
from sdn_dist.apps.synth.dataset import make_synth

PER_SHARD, N_TRAIN = 8, 28      # shards of 8, 8, 8 and 4 samples


def _spec(c):
    return DataSpec.build(c.data, c.text, c.model, c.seed)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth-indexed")
    make_synth(out=str(d), train=N_TRAIN, test=8, size=16, per_shard=PER_SHARD, seed=5, progress=False)
    return d


def tar_gets(s3, since):
    lines, end = s3.requests(since)
    paths = [l.split()[1] for l in lines if l.startswith('"GET ')]
    return [p for p in paths if p.split("?")[0].endswith(".tar")], end


def upload(s3, local_dir, prefix, index=True):
    for name in sorted(os.listdir(local_dir)):
        if name.endswith(".tar") or (index and name == INDEX_NAME):
            s3.fs.put(str(local_dir / name), f"{s3.bucket}/{prefix}/{name}")
    return s3.url(prefix)


def _cfg(train):
    return load_config(preset="debug", overrides=[f"data.train={train}"])


def test_with_an_index_start_up_reads_no_tar(s3, synth, capsys):
    """The index the writer put beside the tars travels with them to S3 (its entries carry the
    sizes; local mtimes are not compared on S3): building the run's DataSpec then takes every
    count from it and the server sees no GET of a tar; `shards inspect` reads one (its example)."""
    d = upload(s3, synth, "indexed")
    _, mark = s3.requests()
    spec = _spec(_cfg(f"{d}/train-*.tar"))
    gets, mark2 = tar_gets(s3, mark)
    assert spec.counts == [8, 8, 8, 4] and gets == []
    assert "counted the samples" not in capsys.readouterr().err
    assert main(["shards", "inspect", d + "/", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["samples"] == N_TRAIN + 8 and info["counts_from"] == {"index": 5}
    assert set(tar_gets(s3, mark2)[0]) == {f"/{s3.bucket}/indexed/test-000000.tar"}   # the example only
    assert all(u.endswith(".tar") for u in expand_urls(d + "/"))   # the index is no shard


def test_without_an_index_counts_tell_the_cost_and_shards_index_writes_one(s3, synth, capsys):
    d = upload(s3, synth, "plain", index=False)
    _, mark = s3.requests()
    spec = _spec(_cfg(f"{d}/train-*.tar"))
    gets, mark = tar_gets(s3, mark)
    assert spec.counts == [8, 8, 8, 4] and len(gets) == 4
    note = capsys.readouterr().err
    assert "counted the samples of 4 shards from the tars in" in note and f"sdn-dist shards index {d}" in note

    assert main(["shards", "index", f"{d}/train-*.tar", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["indexes"] == [f"{d}/{INDEX_NAME}"] and res["samples"] == N_TRAIN
    doc = json.loads(s3.fs.cat(f"{s3.bucket}/plain/{INDEX_NAME}"))
    assert doc["__kind__"] == "wids-shard-index-v1" and doc["wids_version"] == 1
    first = doc["shardlist"][0]
    assert first["url"] == "train-000000.tar" and first["nsamples"] == 8
    assert first["filesize"] == os.path.getsize(synth / "train-000000.tar") and first["etag"]
    _, mark = s3.requests()
    assert _spec(_cfg(f"{d}/train-*.tar")).counts == [8, 8, 8, 4]
    assert tar_gets(s3, mark)[0] == []


def _same_size_other_bytes(path) -> bytes:
    """The tar with one caption byte changed: same size, same samples, another ETag."""
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tf:
        txt = next(m for m in tf.getmembers() if m.name.endswith(".txt"))
    data[txt.offset_data] ^= 0x20
    return bytes(data)


def test_a_stale_index_entry_is_detected_and_recounted(s3, synth, tmp_path):
    d = upload(s3, synth, "stale")
    # shard 1 replaced by a smaller one (4 samples: the last shard's bytes); shard 2 rewritten
    # with the same size and other bytes (only the ETag tells)
    s3.fs.pipe(f"{s3.bucket}/stale/train-000001.tar", (synth / "train-000003.tar").read_bytes())
    s3.fs.pipe(f"{s3.bucket}/stale/train-000002.tar", _same_size_other_bytes(synth / "train-000002.tar"))
    # ETags in the index as `shards index` on S3 writes them: shard 2's of an older version;
    # shard 1's entry keeps the uploaded local index's (no ETag): only its size tells
    idx = json.loads(s3.fs.cat(f"{s3.bucket}/stale/{INDEX_NAME}"))
    for e in idx["shardlist"]:
        if e["url"] == "train-000002.tar":
            e["etag"] = '"an-older-version"'
        elif e["url"] != "train-000001.tar":
            e["etag"] = s3.fs.info(f"{s3.bucket}/stale/{e['url']}")["ETag"]
    s3.fs.pipe(f"{s3.bucket}/stale/{INDEX_NAME}", json.dumps(idx).encode())
    urls = expand_urls(f"{d}/train-*.tar")
    _, mark = s3.requests()
    c = count_shards(urls)
    assert c.counts == [8, 4, 8, 4] and c.source == ["index", "tars", "tars", "index"]
    assert c.stale == urls[1:3]
    assert sorted(tar_gets(s3, mark)[0]) == [f"/{s3.bucket}/stale/train-00000{i}.tar" for i in (1, 2)]

    # local shards: a changed mtime is a changed file
    local = tmp_path / "local"
    make_synth(out=str(local), train=N_TRAIN, test=0, size=16, per_shard=PER_SHARD, seed=5, progress=False)
    os.utime(local / "train-000000.tar", (1_000_000, 1_000_000))
    c = count_shards(expand_urls(str(local / "train-*.tar")))
    assert c.source == ["tars", "index", "index", "index"] and c.counts == [8, 8, 8, 4]


def _img2dataset_shard(n: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for k in range(n):
            for ext, data in (("jpg", b"\xff\xd8 not decoded here"), ("txt", f"caption {k}".encode())):
                ti = tarfile.TarInfo(f"{k:09d}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_img2dataset_stats_counts_are_used(s3, capsys):
    """img2dataset's output: 00000.tar + 00000_stats.json ("successes") + a parquet, no index."""
    for i, n in enumerate((5, 3, 7)):
        s3.fs.pipe(f"{s3.bucket}/i2d/{i:05d}.tar", _img2dataset_shard(n))
        s3.fs.pipe(f"{s3.bucket}/i2d/{i:05d}.parquet", b"PAR1")
        if i < 2:    # the third shard's stats are missing: it is counted from its tar
            s3.fs.pipe(f"{s3.bucket}/i2d/{i:05d}_stats.json",
                       json.dumps({"count": n + 2, "successes": n, "failed_to_download": 2}).encode())
    urls = expand_urls(s3.url("i2d") + "/")
    _, mark = s3.requests()
    c = count_shards(urls)
    assert c.counts == [5, 3, 7] and c.source == ["stats", "stats", "tars"]
    assert tar_gets(s3, mark)[0] == [f"/{s3.bucket}/i2d/00002.tar"]

    s3.fs.pipe(f"{s3.bucket}/i2d/00001_stats.json", b'{"successes": "three"}')
    assert main(["shards", "inspect", s3.url("i2d") + "/"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "00001_stats.json" in err[0] and "successes" in err[0]


@pytest.mark.parametrize("text, what", [
    (b"{not json", "is not valid JSON"),
    (b'{"__kind__": "wids-shard-index-v1", "wids_version": 1}', "shardlist is null"),
    (b'{"shardlist": [{"url": "train-000000.tar", "nsamples": "8", "filesize": 1}]}', 'shardlist[0].nsamples is "8"'),
    (b'{"shardlist": [{"url": "train-000000.tar", "nsamples": 8, "filesize": -1}]}', "shardlist[0].filesize is -1"),
    (b'{"__kind__": "something-else", "shardlist": []}', "__kind__ is 'something-else'"),
])
def test_a_malformed_index_is_exit_2_naming_file_and_key(tmp_path, synth, capsys, text, what):
    d = tmp_path / "shards"
    d.mkdir()
    (d / "train-000000.tar").write_bytes((synth / "train-000000.tar").read_bytes())
    (d / INDEX_NAME).write_bytes(text)
    assert main(["shards", "inspect", str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: shard index {d / INDEX_NAME}") and what in err[0], err


def test_writers_keep_one_index_per_directory(tmp_path):
    """Both splits in one index; rewriting with fewer shards drops the removed shards' entries."""
    out = tmp_path / "s"
    make_synth(out=str(out), train=20, test=6, size=16, per_shard=4, seed=1, progress=False)
    names = [e["url"] for e in json.loads((out / INDEX_NAME).read_text())["shardlist"]]
    assert names == [f"test-00000{i}.tar" for i in range(2)] + [f"train-00000{i}.tar" for i in range(5)]
    make_synth(out=str(out), train=8, test=6, size=16, per_shard=4, seed=1, progress=False)
    doc = json.loads((out / INDEX_NAME).read_text())
    assert [e["url"] for e in doc["shardlist"]] == names[:2] + names[2:4]
    assert count_shards(expand_urls(str(out / "train-*.tar"))).source == ["index", "index"]
