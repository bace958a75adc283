"""Model registry, weight loading and per-architecture forward adapters."""

from ssl_attention.models.registry import METHODS, MODELS, MethodSpec, ModelSpec, parse_model_list

__all__ = ["METHODS", "MODELS", "MethodSpec", "ModelSpec", "parse_model_list"]
