"""Alignment of attention maps with annotated regions: reading annotations, carrying regions through each
model's preprocessing onto its grid, and scoring maps against them.

- ``annotations``: COCO instances JSON and WikiChurches ``building_parts.json`` -> region records + errors.
- ``geometry``: ``InputTransform`` (resize + centre crop), coverage grids, soft targets and baselines.
- ``metrics``: IoU at percentile thresholds, coverage, pointing game, KL and MSE, vectorised over many maps.
"""
