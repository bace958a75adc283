"""The partitions: one static partition per model, and (for the per-image assets) model x image shard.

Layers and heads are columns, not partitions. The shard dimension's size is the shard count
(``ssl_attention.settings.default_shards``: ``$SSL_ATTENTION_SHARDS``, else 1) when the definitions load;
``ssl-attention run --shards N`` builds its own assets for N (``model_shard_partitions(N)``).
"""

import functools
import warnings

import dagster as dg

from ssl_attention.registry import MODELS
from ssl_attention.settings import default_shards
from ssl_attention.warehouse.shards import shard_names

MODEL_PARTITIONS = dg.StaticPartitionsDefinition(list(MODELS))
# head_ranking (per model) and the like read every shard of their model's upstream partition
with warnings.catch_warnings():  # a beta class of Dagster 1.13; it works as used here
    warnings.simplefilter("ignore", dg.BetaWarning)
    ALL_SHARDS_OF_MODEL = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="model")


@functools.cache
def model_shard_partitions(shards: int) -> dg.MultiPartitionsDefinition:
    """(model, shard) partitions for ``shards`` image shards: ``clip|0``, ``clip|1``, ..."""
    return dg.MultiPartitionsDefinition(
        {"model": MODEL_PARTITIONS, "shard": dg.StaticPartitionsDefinition(shard_names(shards))}
    )


SHARDS = default_shards()  # the shard count of the loaded definitions
MODEL_SHARD_PARTITIONS = model_shard_partitions(SHARDS)


def model_and_shard(partition_key: str, shards: int) -> tuple[str, str]:
    """(model, shard) of a (model, shard) partition key (a ``MultiPartitionKey`` or its string ``clip|0``)."""
    if isinstance(partition_key, dg.MultiPartitionKey):
        dims = partition_key.keys_by_dimension
    else:
        dims = model_shard_partitions(shards).get_partition_key_from_str(partition_key).keys_by_dimension
    return dims["model"], dims["shard"]


def partition_key(model: str, shard: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"model": model, "shard": shard})
