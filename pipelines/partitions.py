"""One static partition per model: layers and heads are columns, not partitions."""

import dagster as dg

from ssl_attention.registry import MODELS

MODEL_PARTITIONS = dg.StaticPartitionsDefinition(list(MODELS))
