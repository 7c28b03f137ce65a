"""Caption shards: making them, reading them, encoding their captions.

Modules: ``shards`` (URLs, fsspec opening, counting, inspect), ``pipeline`` (epoch planning, the
resumable rank stream, batches), ``text`` (caption encoders),
``convert`` (folder / StackGAN converters), ``writer`` (webdataset ShardWriter wrapper).
"""

from sdn_dist.data.pipeline import (SKIP_REASONS, RankStream, ShardDataset, SkipCounter, build_rank_stream,
                       iter_batches, make_loader, plan_epoch)
from sdn_dist.data.shards import (count_samples, expand_urls, format_inspect, format_inspection, inspect_shards, iter_shard,
                     register_fsspec_gopen, scan_shard, shard_counts)
from sdn_dist.data.text import TextEncoder, build_text_encoder, encoder_from_record

__all__ = [
    "SKIP_REASONS", "RankStream", "ShardDataset", "SkipCounter", "build_rank_stream",
    "iter_batches", "make_loader", "plan_epoch", "count_samples", "expand_urls", "format_inspect", "format_inspection",
    "inspect_shards", "iter_shard", "register_fsspec_gopen", "scan_shard", "shard_counts",
    "TextEncoder", "build_text_encoder", "encoder_from_record",
]
