"""Where a model's weights come from, and the provenance every stored row carries."""

from __future__ import annotations

import hashlib
import os
import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from ssl_attention.registry import ModelSpec

DEFAULT_SEED = 0
CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class Provenance:
    """Where the weights of one loaded model came from.

    ``mode`` is ``pretrained`` (hub id + revision), ``local`` (a checkpoint directory) or ``random``
    (the hub model's architecture with seeded random init). ``weights_id`` identifies the weights for
    incremental runs: the same images with the same ``weights_id`` are not recomputed.
    """

    mode: str
    source: str
    revision: str | None = None
    seed: int | None = None
    fingerprint: str = ""
    fallback: bool = False  # random weights chosen by `auto` because pretrained ones were unobtainable

    @property
    def weights_id(self) -> str:
        if self.mode == "pretrained":
            return f"pretrained:{self.source}@{self.revision or 'unknown'}"
        if self.mode == "local":
            return f"local:{self.source}#{self.fingerprint}"
        return f"random:{self.source}:seed={self.seed}#{self.fingerprint}"

    @property
    def is_random(self) -> bool:
        return self.mode == "random"

    def describe(self) -> str:
        if self.mode == "pretrained":
            return f"pretrained {self.source} (revision {self.revision or 'unknown'})"
        if self.mode == "local":
            return f"local checkpoint {self.source}"
        return f"RANDOM weights (architecture of {self.source}, seed {self.seed}) - maps show no learned behaviour"


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained; the message names the model and the remedies."""


class CheckpointError(ValueError):
    """A local checkpoint directory that cannot be used; the message says what is missing."""


def remedies(spec: ModelSpec, hub_id: str) -> str:
    slug = spec.slug
    gated = (
        f" {spec.label} is gated: accept its licence on https://huggingface.co/{hub_id} and log in with "
        "`hf auth login` (formerly `huggingface-cli login`) or set HF_TOKEN."
        if spec.gated
        else ""
    )
    return (
        "Remedies: connect to the network (the weights are then cached under ~/.cache/huggingface);"
        f"{gated} or pass a local checkpoint with --checkpoint {slug}=DIR (see README, 'Local checkpoints');"
        " or run offline with --weights random."
    )


HUB_CHECK_TTL_S = 60.0
_hub_checks: dict[tuple[str, int], tuple[float, bool]] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the Hugging Face endpoint, so an offline machine fails in seconds, not minutes.
    The answer is remembered for a minute (a long-lived `dagster dev` notices when the network comes back)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    if _proxied(endpoint.scheme or "https", host):
        return True  # only the proxy can tell; the download (with its own timeouts) decides
    cached = _hub_checks.get((host, port))
    if cached is not None and time.monotonic() - cached[0] < HUB_CHECK_TTL_S:
        return cached[1]
    try:
        with socket.create_connection((host, port), timeout=timeout):
            reachable = True
    except OSError:
        reachable = False
    _hub_checks[(host, port)] = (time.monotonic(), reachable)
    return reachable


def _proxied(scheme: str, host: str) -> bool:
    """Whether requests to ``host`` go through a proxy (HTTPS_PROXY/ALL_PROXY, minus NO_PROXY), as the
    hub client's requests do; a direct TCP check would then wrongly report an unreachable hub."""
    proxies = urllib.request.getproxies()
    return bool(proxies.get(scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host)


def forget_hub_check() -> None:
    """Forget the remembered reachability (tests, or after changing HF_ENDPOINT)."""
    _hub_checks.clear()


def directory_fingerprint(path: Path) -> str:
    """Hash of the names, sizes and modification times of a checkpoint's files (cheap, content-sensitive
    enough to notice a re-saved checkpoint)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def file_fingerprint(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def parse_checkpoints(items: list[str] | None, valid: list[str]) -> dict[str, Path]:
    """``["clip=/path", ...]`` -> {"clip": Path}; errors name the valid models and the expected form."""
    result: dict[str, Path] = {}
    for item in items or []:
        model, sep, directory = item.partition("=")
        model = model.strip().lower()
        if not sep or not directory.strip():
            raise CheckpointError(f"--checkpoint expects MODEL=DIR, got {item!r}")
        if model not in valid:
            raise CheckpointError(f"--checkpoint {item!r}: unknown model {model!r}; valid models: {', '.join(valid)}")
        path = Path(directory.strip()).expanduser().resolve()
        if not path.is_dir():
            raise CheckpointError(f"--checkpoint {item!r}: {path} is not a directory")
        result[model] = path
    return result
