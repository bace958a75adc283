"""Weight loading: local checkpoints, pretrained without network, random and auto modes, provenance."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from ssl_attention.models.loading import LoadRequest, load_model, resolve_device
from ssl_attention.models.weights import (
    CheckpointError,
    WeightsUnavailableError,
    forget_hub_check,
    parse_checkpoints,
)
from ssl_attention.registry import MODELS, UnknownNameError, parse_model_list
from ssl_attention.warehouse.paths import partition_file

VALID = list(MODELS)


# --- --checkpoint parsing -------------------------------------------------------------------------------


def test_parse_checkpoints_accepts_model_equals_dir(tiny_checkpoints):
    parsed = parse_checkpoints([f"clip={tiny_checkpoints['clip']}", f" MAE = {tiny_checkpoints['mae']} "], VALID)
    assert parsed == {"clip": tiny_checkpoints["clip"].resolve(), "mae": tiny_checkpoints["mae"].resolve()}
    assert parse_checkpoints(None, VALID) == {}


@pytest.mark.parametrize(
    ("item", "fragments"),
    [
        ("clip", ["MODEL=DIR"]),
        ("clip=", ["MODEL=DIR"]),
        ("=/tmp", ["unknown model", *VALID]),
        ("vitbig=/tmp", ["unknown model", "'vitbig'", *VALID]),
        ("clip=/definitely/not/here", ["not a directory", "/definitely/not/here"]),
    ],
)
def test_parse_checkpoints_errors_name_valid_values(item, fragments):
    with pytest.raises(CheckpointError) as error:
        parse_checkpoints([item], VALID)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_unknown_names_list_valid_values():
    valid = "valid models: dinov2, dinov3, mae, clip, siglip, siglip2, siglip2_naflex, resnet50"
    with pytest.raises(UnknownNameError, match=valid):
        load_model("vit-huge")
    with pytest.raises(UnknownNameError, match="auto, pretrained, random"):
        load_model("clip", LoadRequest(weights="hub"))
    with pytest.raises(UnknownNameError, match="resnet50"):
        parse_model_list("clip,resnet")
    assert parse_model_list("all") == VALID
    assert parse_model_list("siglip, clip") == ["clip", "siglip"]
    with pytest.raises(ValueError, match="auto, cpu"):
        resolve_device("tpu")
    assert resolve_device("cpu") == torch.device("cpu")


# --- local checkpoints ----------------------------------------------------------------------------------


def copy_without(source: Path, destination: Path, *names: str) -> Path:
    shutil.copytree(source, destination)
    for name in names:
        (destination / name).unlink()
    return destination


def test_checkpoint_without_image_processor(tiny_checkpoints, tmp_path):
    broken = copy_without(tiny_checkpoints["clip"], tmp_path / "clip", "preprocessor_config.json")
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json"):
        load_model("clip", LoadRequest(checkpoint=broken, device="cpu"))


def test_checkpoint_without_config(tiny_checkpoints, tmp_path):
    broken = copy_without(tiny_checkpoints["mae"], tmp_path / "mae", "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model("mae", LoadRequest(checkpoint=broken, device="cpu"))


@pytest.mark.parametrize(
    ("slug", "other", "fragments"),
    [
        ("dinov2", "clip", ["dinov2", "dinov2_with_registers", "clip_vision_model"]),
        ("dinov3", "dinov2", ["dinov3_vit", "dinov2_with_registers"]),
        ("siglip", "clip", ["siglip", "clip_vision_model"]),
        ("clip", "siglip", ["clip", "siglip_vision_model"]),
        ("resnet50", "clip", ["architecture", "save_for_hf"]),
    ],
)
def test_checkpoint_of_another_model_is_a_clear_error(tiny_checkpoints, slug, other, fragments):
    with pytest.raises(CheckpointError) as error:
        load_model(slug, LoadRequest(checkpoint=tiny_checkpoints[other], device="cpu"))
    for fragment in fragments:
        assert fragment in str(error.value)


def test_timm_checkpoint_without_resnet_stages(tmp_path):
    import timm

    model = timm.create_model("test_efficientnet", num_classes=4)
    timm.models.save_for_hf(model, str(tmp_path / "effnet"))
    with pytest.raises(CheckpointError, match=r"layer1\.\.layer4"):
        load_model("resnet50", LoadRequest(checkpoint=tmp_path / "effnet", device="cpu"))


def test_local_checkpoint_reads_shapes_from_its_config(tiny_adapters, tiny_checkpoints):
    for slug, adapter in tiny_adapters.items():
        assert adapter.provenance.mode == "local"
        assert adapter.provenance.source == str(tiny_checkpoints[slug].resolve())
        assert not adapter.provenance.is_random
        assert adapter.device == torch.device("cpu")
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in adapter.module.parameters())
        assert not adapter.module.training
        if slug == "resnet50":
            assert (adapter.num_layers, adapter.num_heads) == (4, 0)
            continue
        assert (adapter.num_layers, adapter.num_heads, adapter.patch_size) == (2, 4, 8)
        assert adapter.num_registers == {"dinov2": 4, "dinov3": 2}.get(slug, 0)
        assert adapter.module.config._attn_implementation == "eager"


def test_mae_checkpoint_masking_is_switched_off(tiny_adapters, tiny_checkpoints):
    import json

    assert json.loads((tiny_checkpoints["mae"] / "config.json").read_text())["mask_ratio"] == 0.75
    assert tiny_adapters["mae"].module.config.mask_ratio == 0.0


def test_local_provenance_in_rows(tiny_warehouse, tiny_checkpoints):
    for slug, directory in tiny_checkpoints.items():
        method = MODELS[slug].methods[0]
        rows = pq.read_table(
            partition_file(tiny_warehouse, "attention_maps", model=slug, method=method, shard="0")
        ).to_pylist()
        for column, expected in (
            ("weights_mode", "local"),
            ("weights_source", str(directory.resolve())),
            ("weights_seed", None),
            ("weights_revision", None),
        ):
            assert {r[column] for r in rows} == {expected}, (slug, column)
        (weights_id,) = {r["weights_id"] for r in rows}
        assert str(directory.resolve()) in weights_id
        (model_row,) = pq.read_table(partition_file(tiny_warehouse, "models", model=slug)).to_pylist()
        assert model_row["weights_mode"] == "local" and model_row["weights_id"] == weights_id


# --- pretrained without network, auto, random -----------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    forget_hub_check()
    yield
    forget_hub_check()


def _skip_if_cached(slug: str) -> None:
    from huggingface_hub import try_to_load_from_cache

    spec = MODELS[slug]
    repo, filename = (
        (f"timm/{spec.default_weights}", "model.safetensors")
        if spec.family == "cnn"
        else (spec.default_weights, "config.json")
    )
    if isinstance(try_to_load_from_cache(repo, filename), str):
        pytest.skip(f"{repo} is in the local Hugging Face cache")


@pytest.mark.parametrize("slug", VALID)
def test_pretrained_offline_fails_fast_naming_model_and_remedies(offline, slug):
    _skip_if_cached(slug)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as error:
        load_model(slug, LoadRequest(weights="pretrained", device="cpu"))
    assert time.monotonic() - start < 15
    message = str(error.value)
    assert slug in message and MODELS[slug].default_weights in message
    for remedy in ("network", f"--checkpoint {slug}=DIR", "--weights random"):
        assert remedy in message, message
    if slug == "dinov3":
        assert "gated" in message and "login" in message


def test_auto_falls_back_to_random_loudly(offline, caplog):
    _skip_if_cached("dinov2")
    with caplog.at_level(logging.WARNING):
        adapter = load_model("dinov2", LoadRequest(weights="auto", seed=3, device="cpu"))
    assert "RANDOM" in caplog.text and "dinov2" in caplog.text
    provenance = adapter.provenance
    assert provenance.is_random and provenance.seed == 3 and provenance.fallback
    assert provenance.source == MODELS["dinov2"].default_weights
    assert "RANDOM" in provenance.describe() and "seed 3" in provenance.describe()
    # the hub model's architecture: ViT-B/14 with 4 registers
    assert (adapter.num_layers, adapter.num_heads, adapter.patch_size, adapter.num_registers) == (12, 12, 14, 4)


def test_random_weights_are_seeded(tmp_path):
    first = load_model("resnet50", LoadRequest(weights="random", seed=0, device="cpu"))
    again = load_model("resnet50", LoadRequest(weights="random", seed=0, device="cpu"))
    other = load_model("resnet50", LoadRequest(weights="random", seed=1, device="cpu"))
    a, b, c = (m.module.state_dict() for m in (first, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    assert first.provenance.weights_id == again.provenance.weights_id != other.provenance.weights_id
    assert (first.provenance.mode, first.provenance.seed) == ("random", 0)
    # seeding does not leak into the caller's global RNG stream
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("resnet50", LoadRequest(weights="random", seed=0, device="cpu"))
    assert torch.equal(torch.rand(3), expected)


PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")


def test_hub_reachability_is_remembered_for_a_while(monkeypatch):
    import socket

    from ssl_attention.models import weights

    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    calls = []

    def refuse(address, timeout):
        calls.append(address)
        raise OSError("unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    forget_hub_check()
    assert not weights.hub_reachable() and not weights.hub_reachable()
    assert len(calls) == 1  # the second answer came from memory
    clock = [1000.0]
    monkeypatch.setattr(weights.time, "monotonic", lambda: clock[0])
    forget_hub_check()
    weights.hub_reachable()
    clock[0] += weights.HUB_CHECK_TTL_S + 1  # a minute later the network is asked again
    weights.hub_reachable()
    assert len(calls) == 3
    forget_hub_check()


def test_hub_behind_a_proxy_is_not_judged_by_a_direct_connection(monkeypatch):
    """With HTTPS_PROXY set, the hub client goes through the proxy; a refused direct connection must not
    make `pretrained` fail or `auto` fall back to random. NO_PROXY for the hub restores the direct check."""
    import socket

    from ssl_attention.models import weights

    calls = []

    def refuse(address, timeout):
        calls.append(address)
        raise OSError("unreachable")

    for name in (*PROXY_VARIABLES, "no_proxy", "NO_PROXY", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    forget_hub_check()
    assert weights.hub_reachable() and calls == []
    monkeypatch.setenv("NO_PROXY", "localhost,huggingface.co")
    assert not weights.hub_reachable() and calls == [("huggingface.co", 443)]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline mode wins over any proxy
    monkeypatch.delenv("NO_PROXY")
    assert not weights.hub_reachable()
    forget_hub_check()
