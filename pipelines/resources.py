"""The `extraction` resource: the run settings as Dagster config, editable in the launchpad.

Its fields are inherited from ``ssl_attention.settings.ExtractionFields`` (the fields of the one settings
model, with their types, defaults, descriptions and checks), so a bad value (``weights: nonsense``,
``batch_size: 0``, ``device: tpu``) is refused when the resource is configured, and ``weights`` shows as an
enum. Empty ``images_dir`` / ``warehouse`` fall back to the environment when a run resolves them.
"""

from typing import Self

import dagster as dg

from ssl_attention.models.loading import LoadRequest
from ssl_attention.settings import ExtractionFields, Settings


class ExtractionSettings(dg.ConfigurableResource, ExtractionFields):
    """Where images come from, where maps go, and how models are loaded and run."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        """The resource of a validated run's settings (all but its model list: a run's partitions)."""
        return cls(**settings.model_dump(include=set(ExtractionFields.model_fields)))

    def load_request(self, model: str) -> LoadRequest:
        return LoadRequest(
            weights=self.weights,
            checkpoint=self.checkpoint_dirs().get(model),
            seed=self.seed,
            device=self.device,
            resolution=self.resolution_of(model),
            max_tokens=self.max_tokens,
        )
