"""ssl_attention: where self-supervised vision models look, per head and fused.

The library turns a folder of images into a hive-partitioned Parquet warehouse of attention maps
(see ``docs/warehouse.md``). It never imports Dagster or Panel: the pipeline and the dashboard are thin
layers over it.
"""

__version__ = "0.1.0"
