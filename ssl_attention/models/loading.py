"""Load a model for extraction: pretrained from the hub, a local checkpoint, or seeded random init.

All three go through the libraries' own loading code (``from_pretrained`` / ``timm.create_model``); the
random mode builds the hub model's architecture from the config files shipped in ``configs/<slug>/``.

Local checkpoint layouts (``--checkpoint MODEL=DIR``):
- ViTs: ``model.save_pretrained(DIR)`` and ``image_processor.save_pretrained(DIR)`` (config.json,
  model.safetensors, preprocessor_config.json).
- resnet50: ``timm.models.save_for_hf(model, DIR)`` (config.json with ``architecture`` and
  ``pretrained_cfg``, plus the weights file); any timm ResNet with stages layer1..layer4 works.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_attention.models.adapters import CNN_STAGES, CNNAdapter, ModelAdapter, ViTAdapter
from ssl_attention.models.resolution import DEFAULT_MAX_TOKENS, Resolution, check_max_tokens, check_resolution
from ssl_attention.models.weights import (
    CONFIG_DIR,
    DEFAULT_SEED,
    CheckpointError,
    Provenance,
    WeightsUnavailableError,
    directory_fingerprint,
    file_fingerprint,
    hub_reachable,
    remedies,
)
from ssl_attention.registry import MODELS, ModelSpec, UnknownNameError
from ssl_attention.settings import WeightsMode, check_device, check_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadRequest:
    """What the user asked for, per model. The Dagster resource builds it from the validated settings;
    ``load_model`` checks a hand-made one with the same checks (``ssl_attention.settings``)."""

    weights: WeightsMode = "auto"
    checkpoint: Path | None = None  # overrides ``weights`` when given
    seed: int = DEFAULT_SEED
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    resolution: Resolution = "default"  # "default" (the processor's own) or N: shorter side N px, no crop
    max_tokens: int = DEFAULT_MAX_TOKENS  # patches per image at most for an N request (scaled down beyond)


def resolve_device(device: str) -> torch.device:
    if check_device(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; valid: auto, cpu")
    return torch.device(device)


def load_model(slug: str, request: LoadRequest | None = None) -> ModelAdapter:
    """The model ``slug`` ready for extraction on the requested device, with its provenance."""
    request = request or LoadRequest()
    spec = MODELS.get(slug)
    if spec is None:
        raise UnknownNameError(f"unknown model {slug!r}; valid models: {', '.join(MODELS)}")
    check_weights(request.weights)
    device = resolve_device(request.device)
    check_max_tokens(request.max_tokens)
    check_resolution(request.resolution, slug, 1)  # the value itself; its patch size is checked once loaded

    if request.checkpoint is not None:
        module, preprocess, provenance = _load_local(spec, Path(request.checkpoint))
    elif request.weights == "random":
        module, preprocess, provenance = _load_random(spec, request.seed)
    else:
        try:
            module, preprocess, provenance = _load_pretrained(spec)
        except WeightsUnavailableError as exc:
            if request.weights == "pretrained":
                raise
            log.warning("%s\nFalling back to RANDOM weights for %s (--weights auto).", exc, slug)
            module, preprocess, provenance = _load_random(spec, request.seed)
            provenance = dataclasses.replace(provenance, fallback=True)

    module.eval().requires_grad_(False)
    # float32 everywhere: half precision moves softmax outputs by more than 1e-3 on long sequences.
    module.to(device=device, dtype=torch.float32)
    adapter_cls = CNNAdapter if spec.family == "cnn" else ViTAdapter
    adapter = adapter_cls(
        spec=spec,
        module=module,
        preprocess=preprocess,
        provenance=provenance,
        device=device,
        resolution=request.resolution,
        max_tokens=request.max_tokens,
    )
    unit = "patch" if spec.family == "vit" else "stride of its last stage"
    check_resolution(request.resolution, slug, adapter.size_multiple, unit)
    return adapter


# --- transformers ViTs ----------------------------------------------------------------------------------


def _vit_model_class(spec: ModelSpec, model_type: str) -> Any:
    import transformers

    if model_type not in spec.accepted_model_types:
        raise CheckpointError(
            f"{spec.slug} expects a checkpoint of model_type {' or '.join(spec.accepted_model_types)}, "
            f"got {model_type!r}"
        )
    return getattr(transformers, spec.model_class)


def _vit_processor(spec: ModelSpec, source: str | Path, **kwargs: Any) -> Any:
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(source), **spec.processor_defaults, **kwargs)


def _model_type(source: str | Path, **kwargs: Any) -> str:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(source), **kwargs).model_type


def _load_vit(spec: ModelSpec, source: str | Path, **hub_kwargs: Any) -> tuple[nn.Module, Any]:
    model_type = _model_type(source, **hub_kwargs)
    cls = _vit_model_class(spec, model_type)
    module = cls.from_pretrained(str(source), attn_implementation="eager", **spec.config_overrides, **hub_kwargs)
    processor = _vit_processor(spec, source, **hub_kwargs)
    return module, processor


# --- timm CNN -------------------------------------------------------------------------------------------


def _timm_transform(module: nn.Module) -> Any:
    import timm.data

    config = timm.data.resolve_data_config({}, model=module)
    return timm.data.create_transform(**config)


def _check_timm_stages(module: nn.Module, source: str) -> None:
    missing = [s for s in CNN_STAGES if not hasattr(module, s)]
    if missing:
        raise CheckpointError(f"{source}: a ResNet with stages layer1..layer4 is required; missing {missing}")


# --- the three sources ----------------------------------------------------------------------------------


def _load_local(spec: ModelSpec, path: Path) -> tuple[nn.Module, Any, Provenance]:
    path = path.expanduser().resolve()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{spec.slug} checkpoint {path}: no config.json (save it with save_pretrained)")
    provenance = Provenance(mode="local", source=str(path), fingerprint=directory_fingerprint(path))
    if spec.family == "cnn":
        import timm

        config = json.loads(config_file.read_text())
        if "architecture" not in config:
            raise CheckpointError(
                f"{spec.slug} checkpoint {path}: config.json has no 'architecture'; save it with "
                "timm.models.save_for_hf(model, DIR)"
            )
        module = timm.create_model(f"local-dir:{path}", pretrained=True)
        _check_timm_stages(module, str(path))
        return module, _timm_transform(module), provenance
    if not (path / "preprocessor_config.json").is_file():
        raise CheckpointError(
            f"{spec.slug} checkpoint {path}: no preprocessor_config.json; save the image processor too "
            "(image_processor.save_pretrained(DIR))"
        )
    module, processor = _load_vit(spec, path)
    return module, processor, provenance


def _load_random(spec: ModelSpec, seed: int) -> tuple[nn.Module, Any, Provenance]:
    config_dir = CONFIG_DIR / spec.slug
    files = sorted(config_dir.glob("*.json"))
    provenance = Provenance(mode="random", source=spec.default_weights, seed=seed, fingerprint=file_fingerprint(*files))
    # Seeded init on the CPU, whatever the device, so random weights are identical everywhere.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.family == "cnn":
            import timm

            config = json.loads((config_dir / "config.json").read_text())
            module = timm.create_model(
                config["architecture"],
                pretrained=False,
                num_classes=config["num_classes"],
                pretrained_cfg_overlay=config["pretrained_cfg"],
            )
            return module, _timm_transform(module), provenance
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(config_dir), **spec.config_overrides)
        cls = _vit_model_class(spec, config.model_type)
        build = getattr(cls, "from_config", None) or cls._from_config  # Auto classes vs concrete ones
        module = build(config, attn_implementation="eager")
    return module, _vit_processor(spec, config_dir), provenance


def _load_pretrained(spec: ModelSpec) -> tuple[nn.Module, Any, Provenance]:
    hub_id = spec.default_weights
    if spec.family == "cnn":
        return _load_pretrained_timm(spec)
    try:  # the local Hugging Face cache first: no network needed
        module, processor = _load_vit(spec, hub_id, local_files_only=True)
    except (OSError, ValueError):
        if not hub_reachable():
            raise WeightsUnavailableError(
                f"{spec.slug}: pretrained weights {hub_id} are not in the local Hugging Face cache and the hub "
                f"cannot be reached. {remedies(spec, hub_id)}"
            ) from None
        try:
            module, processor = _load_vit(spec, hub_id)
        except Exception as exc:  # gated repo, missing token, HTTP errors: all end the same way for the user
            raise WeightsUnavailableError(
                f"{spec.slug}: could not download {hub_id}: {exc}. {remedies(spec, hub_id)}"
            ) from exc
    revision = getattr(module.config, "_commit_hash", None)
    return module, processor, Provenance(mode="pretrained", source=hub_id, revision=revision)


def _load_pretrained_timm(spec: ModelSpec) -> tuple[nn.Module, Any, Provenance]:
    import timm
    from huggingface_hub import try_to_load_from_cache

    repo = f"timm/{spec.default_weights}"
    cached = None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, filename)
        if isinstance(hit, str):
            cached = hit
            break
    if cached is not None:
        module = timm.create_model(spec.default_weights, pretrained=True, pretrained_cfg_overlay={"file": cached})
        revision = Path(cached).parent.name  # snapshot folder = commit hash
    else:
        if not hub_reachable():
            raise WeightsUnavailableError(
                f"{spec.slug}: pretrained weights {repo} are not in the local Hugging Face cache and the hub "
                f"cannot be reached. {remedies(spec, repo)}"
            )
        try:
            module = timm.create_model(spec.default_weights, pretrained=True)
        except Exception as exc:
            raise WeightsUnavailableError(
                f"{spec.slug}: could not download {repo}: {exc}. {remedies(spec, repo)}"
            ) from exc
        hit = try_to_load_from_cache(repo, "model.safetensors")
        revision = Path(hit).parent.name if isinstance(hit, str) else None
    _check_timm_stages(module, repo)
    return module, _timm_transform(module), Provenance(mode="pretrained", source=repo, revision=revision)
