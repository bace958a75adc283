"""Dagster definitions of the extraction: assets, partitions, resources, checks, sensors; and the CLI."""
