"""The `extraction` resource: the run settings as Dagster config, editable in the launchpad.

Its fields are inherited from `ssl_attention.settings.ExtractionFields` (the fields of the one settings
model, with their types, defaults and descriptions). Dagster's config types carry enums (`weights` shows
as one) but no bounds, so the resource's config shape also runs the settings model's own checks when Dagster
processes a run config: `dg.validate_run_config`, and the run's start (before any step), refuse
`batch_size: 0`, `seed: -1` or `device: tpu` with the field and what is valid. Empty `images_dir` /
`warehouse` fall back to the environment when a run resolves them.
"""

from typing import Any, Self

import dagster as dg
from dagster._config.errors import PostProcessingError
from dagster._core.definitions.definition_config_schema import DefinitionConfigSchema
from pydantic import ValidationError

from ssl_attention.models.loading import LoadRequest
from ssl_attention.settings import ExtractionFields, Settings, describe_errors


def plain_text(text: str | None) -> str | None:
    """A description for the UI's Markdown: RST literals (double backticks) become Markdown code spans."""
    return text.replace("``", "`") if text else text


class SettingsCheckedShape(dg.Shape):
    """The resource's config shape, whose processed value must also pass `ExtractionFields`' checks."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        # dg.Shape caches instances by field hash; this subclass must not be replaced by a plain cached Shape
        instance = object.__new__(cls)
        instance._initialized = False
        return instance

    def post_process(self, value: Any) -> Any:
        try:
            ExtractionFields.model_validate(value)
        except ValidationError as exc:
            raise PostProcessingError(f"extraction settings refused: {describe_errors(exc)}") from None
        return value


class ExtractionSettings(dg.ConfigurableResource, ExtractionFields):
    """Where images come from, where maps go, and how models are loaded and run."""

    @property
    def _config_schema(self) -> DefinitionConfigSchema:
        field = super()._config_schema.as_field()
        shape = field.config_type
        fields = {
            name: dg.Field(
                f.config_type,
                description=plain_text(f.description),
                is_required=f.is_required,
                **({"default_value": f.default_value} if f.default_provided else {}),
            )
            for name, f in shape.fields.items()
        }
        checked = SettingsCheckedShape(fields, description=plain_text(shape.description))
        default = {"default_value": field.default_value} if field.default_provided else {}
        return DefinitionConfigSchema(
            dg.Field(checked, description=plain_text(field.description), is_required=field.is_required, **default)
        )

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
