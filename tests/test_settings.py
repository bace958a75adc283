"""The one settings model: each bad value refused naming the field and what is valid, by the model, the CLI
and the Dagster resource alike; the same warehouse from the CLI, the resource, the dashboard and the SQL
command for the same environment and arguments; the environment read in one place."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
from pydantic import ValidationError

from pipelines.assets import images as images_asset
from pipelines.resources import ExtractionSettings
from ssl_attention.cli import build_parser, serve
from ssl_attention.cli import sql as sql_cli
from ssl_attention.cli.run import flag, settings_from_args
from ssl_attention.models.loading import LoadRequest
from ssl_attention.registry import MODELS
from ssl_attention.settings import (
    IMAGES_ENV,
    POOL_ENV,
    SENSOR_INTERVAL_ENV,
    WAREHOUSE_ENV,
    ExtractionFields,
    Settings,
    describe_errors,
    environment_fields,
    pool_override,
    sensor_interval_s,
)

BAD_VALUES = [
    # (field, bad value, what the message must say is valid); the message also names the field and the value
    ("weights", "nonsense", ["'auto', 'pretrained' or 'random'"]),
    ("device", "tpu", ["auto, cpu, cuda, cuda:N"]),
    ("device", "cuda:x", ["auto, cpu, cuda, cuda:N"]),
    ("batch_size", 0, ["greater than or equal to 1"]),
    ("max_pixels", -5, ["greater than or equal to 1"]),
    ("seed", -1, ["greater than or equal to 0"]),
    ("checkpoints", ["clip"], ["MODEL=DIR"]),
    ("checkpoints", ["vgg=/tmp"], ["unknown model 'vgg'", *MODELS]),
    ("recompute", "maybe", ["valid boolean"]),
    ("resolution", "big", ["'default' or a positive number of pixels"]),
    ("resolution", "vgg=448", ["unknown model 'vgg'", *MODELS]),
    ("max_tokens", 0, ["greater than or equal to 1"]),
]


def _shown(value: object) -> str:
    """How a message quotes the bad value (the first item of a list)."""
    return repr(value[0] if isinstance(value, list) else value)


@pytest.mark.parametrize(("field", "value", "valid"), BAD_VALUES)
def test_the_settings_model_refuses_each_bad_value_naming_field_and_valid_values(field, value, valid):
    with pytest.raises(ValidationError) as caught:
        Settings(**{field: value})
    assert [error["loc"][0] for error in caught.value.errors()] == [field]
    message = describe_errors(caught.value)
    assert "\n" not in message and _shown(value) in message
    assert message.startswith(f"{field}: ") or field in ("checkpoints", "resolution")  # parsers name their flag
    for fragment in valid:
        assert fragment in message, message


def test_unknown_models_and_unknown_settings_name_the_valid_ones():
    with pytest.raises(ValidationError) as caught:
        Settings(models="dinov2,vgg")
    message = describe_errors(caught.value)
    assert message.startswith("models: ") and "vgg" in message and all(slug in message for slug in MODELS)
    with pytest.raises(ValidationError) as caught:
        Settings(batchsize=2)
    message = describe_errors(caught.value)
    assert message.startswith("batchsize: unknown setting") and "batch_size" in message and "images_dir" in message
    with pytest.raises(ValidationError) as caught:  # every refused value is named, not only the first
        Settings(weights="x", batch_size=0)
    assert {e["loc"][0] for e in caught.value.errors()} == {"weights", "batch_size"}


def test_valid_values_are_accepted_and_model_lists_come_in_registry_order(tiny_checkpoints):
    assert Settings().models == tuple(MODELS)
    assert Settings(models="all").models == tuple(MODELS)
    assert Settings(models="siglip, CLIP").models == ("clip", "siglip")
    assert Settings(models=["mae", "dinov2"]).models == ("dinov2", "mae")
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert Settings(device=device).device == device
    settings = Settings(checkpoints=[f"clip={tiny_checkpoints['clip']}"], batch_size="3")  # CLI strings coerce
    assert settings.batch_size == 3 and settings.checkpoint_dirs() == {"clip": tiny_checkpoints["clip"].resolve()}


# --- the CLI and the resource refuse the same values ------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "valid"), [case for case in BAD_VALUES if case[0] != "recompute"])
def test_the_cli_refuses_the_same_values_naming_its_flag(capsys, field, value, valid):
    from ssl_attention.cli import main

    argv = ["run"]
    for item in value if isinstance(value, list) else [value]:
        argv += [flag(field), str(item)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ssl-attention: error: {flag(field)}")
    assert repr(str(value[0] if isinstance(value, list) else value)) in err
    for fragment in valid:
        assert fragment in err, err


@pytest.mark.parametrize(("field", "value", "valid"), BAD_VALUES)
def test_the_resource_refuses_the_same_values_when_configured(field, value, valid):
    with pytest.raises(ValidationError) as caught:
        ExtractionSettings(**{field: value})
    assert [error["loc"][0] for error in caught.value.errors()] == [field]
    for fragment in valid:
        assert fragment in describe_errors(caught.value)


def _launch_images(tmp_path: Path, config: dict) -> dg.ExecuteInProcessResult:
    """The images asset with the resource configured the way the launchpad configures it (run config)."""
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    resource = ExtractionSettings(images_dir=str(folder), warehouse=str(tmp_path / "wh"))
    run_config = {"resources": {"extraction": {"config": config}}}
    return dg.materialize([images_asset], resources={"extraction": resource}, run_config=run_config)


def test_the_launchpad_refuses_bad_values_and_shows_weights_as_an_enum(tmp_path):
    fields = ExtractionSettings().get_resource_definition().config_schema.as_field().config_type.fields
    assert set(fields) == set(ExtractionFields.model_fields) == set(Settings.model_fields) - {"models"}
    weights = fields["weights"].config_type
    assert isinstance(weights, dg.Enum)  # the launchpad shows a drop-down
    assert [value.config_value for value in weights.enum_values] == ["auto", "pretrained", "random"]
    assert fields["batch_size"].default_value == Settings().batch_size
    with pytest.raises(dg.DagsterInvalidConfigError, match="weights not in enum"):
        _launch_images(tmp_path, {"weights": "nonsense"})
    for field, value in (("batch_size", 0), ("device", "tpu"), ("checkpoints", ["clip"])):
        # refused when the run config is processed, before the run starts (the settings model's checks)
        with pytest.raises(dg.DagsterInvalidConfigError, match=f"extraction settings refused: {field}"):
            _launch_images(tmp_path, {field: value})
    assert _launch_images(tmp_path, {"batch_size": 3}).success


def test_the_resource_builds_each_models_load_request(tiny_checkpoints):
    resource = ExtractionSettings(
        weights="random", seed=3, device="cpu", checkpoints=[f"clip={tiny_checkpoints['clip']}"]
    )
    assert resource.load_request("clip") == LoadRequest(
        weights="random", checkpoint=tiny_checkpoints["clip"].resolve(), seed=3, device="cpu"
    )
    assert resource.load_request("mae") == LoadRequest(weights="random", checkpoint=None, seed=3, device="cpu")
    per_model = ExtractionSettings(resolution="448,clip=default", max_tokens=1024)
    assert per_model.load_request("clip").resolution == "default"
    assert (per_model.load_request("mae").resolution, per_model.load_request("mae").max_tokens) == (448, 1024)
    settings = Settings(weights="pretrained", batch_size=2, models="clip", recompute=True)
    copied = ExtractionSettings.from_settings(settings)
    assert (copied.weights, copied.batch_size, copied.recompute) == ("pretrained", 2, True)


def test_cli_flags_are_the_settings_fields(tiny_checkpoints, tmp_path):
    parser = build_parser()
    assert settings_from_args(parser.parse_args(["run"])) == Settings()  # no flag: the model's defaults
    argv = ["run", "--images", str(tmp_path), "--warehouse", str(tmp_path / "wh"), "--weights", "random"]
    argv += ["--checkpoint", f"mae={tiny_checkpoints['mae']}", "--seed", "4", "--batch-size", "2", "--device", "cpu"]
    argv += ["--max-pixels", "1000", "--recompute", "--models", "mae,clip"]
    assert settings_from_args(parser.parse_args(argv)) == Settings(
        images_dir=str(tmp_path),
        warehouse=str(tmp_path / "wh"),
        weights="random",
        checkpoints=[f"mae={tiny_checkpoints['mae']}"],
        seed=4,
        batch_size=2,
        device="cpu",
        max_pixels=1000,
        recompute=True,
        models=("clip", "mae"),
    )


# --- one warehouse, whoever resolves it -------------------------------------------------------------------


def _resolved_everywhere(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """The warehouse that `run`, `serve` (and the dashboard it starts), the resource, the dashboard called
    directly and `sql` resolve for the same `--warehouse` arguments in the current environment."""
    from dashboards.app import EmptyWarehouse, create_app

    given = argv[1] if argv else None
    parser = build_parser()
    found = {
        "run": settings_from_args(parser.parse_args(["run", *argv])).warehouse_path(),
        "resource": ExtractionSettings(warehouse=given or "").warehouse_path(),
    }
    app = create_app(given)
    assert isinstance(app, EmptyWarehouse)  # the warehouse is missing: its page names the resolved location
    found["dashboard"] = Path(app.warehouse)
    launch = serve.launch(parser.parse_args(["serve", *argv, "--port", "1"]))
    found["serve"] = launch.warehouse
    with monkeypatch.context() as inside:  # the dashboard process that `serve` starts sees launch.env
        inside.setenv(WAREHOUSE_ENV, launch.env[WAREHOUSE_ENV])
        found["served dashboard"] = Path(create_app().warehouse)
    return found


@pytest.mark.parametrize("case", ["env", "argument over env", "default", "file url in env"])
def test_cli_resource_and_dashboard_resolve_the_same_warehouse(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(WAREHOUSE_ENV, raising=False)
    argv: list[str] = []
    if case == "env":
        monkeypatch.setenv(WAREHOUSE_ENV, str(tmp_path / "from-env"))
        expected = tmp_path / "from-env"
    elif case == "argument over env":
        monkeypatch.setenv(WAREHOUSE_ENV, str(tmp_path / "from-env"))
        argv, expected = ["--warehouse", "relative/wh"], tmp_path / "relative" / "wh"
    elif case == "default":
        expected = tmp_path / "data" / "warehouse"
    else:
        monkeypatch.setenv(WAREHOUSE_ENV, f"file://{tmp_path}/with%20space")
        expected = tmp_path / "with space"
    found = _resolved_everywhere(argv, monkeypatch)
    assert found == dict.fromkeys(found, expected)
    # `sql` reads exactly that directory: the sandbox allows it (and its private spill directory) only
    query = "SELECT unnest(current_setting('allowed_directories')) AS d"
    assert sql_cli.main([query, *argv, "--format", "json"]) == 0
    allowed = {row["d"] for row in json.loads(capsys.readouterr().out)}
    assert f"{expected}/" in allowed and len(allowed) == 2


def test_run_and_the_resource_take_the_images_folder_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(IMAGES_ENV, str(tmp_path / "pictures"))
    run_settings = settings_from_args(build_parser().parse_args(["run"]))
    assert run_settings.images_path() == ExtractionSettings().images_path() == tmp_path / "pictures"
    monkeypatch.delenv(IMAGES_ENV)
    assert run_settings.images_path() == ExtractionSettings().images_path() == tmp_path / "data" / "samples"


# --- the environment, read in one place -------------------------------------------------------------------


def test_pool_sensor_interval_and_environment_fields(monkeypatch):
    monkeypatch.delenv(POOL_ENV, raising=False)
    assert pool_override() is None
    for value, expected in (("none", ""), (" NONE ", ""), ("", ""), (" accelerators ", "accelerators")):
        monkeypatch.setenv(POOL_ENV, value)
        assert pool_override() == expected
    monkeypatch.delenv(SENSOR_INTERVAL_ENV, raising=False)
    assert sensor_interval_s() == 60
    monkeypatch.setenv(SENSOR_INTERVAL_ENV, " 5 ")
    assert sensor_interval_s() == 5
    for bad in ("0", "-3", "1.5", "soon"):
        monkeypatch.setenv(SENSOR_INTERVAL_ENV, bad)
        with pytest.raises(ValueError, match=f"{SENSOR_INTERVAL_ENV}={bad!r}: expected whole seconds"):
            sensor_interval_s()
    monkeypatch.delenv(IMAGES_ENV, raising=False)
    monkeypatch.setenv(WAREHOUSE_ENV, "/somewhere")
    assert environment_fields() == {"warehouse": WAREHOUSE_ENV}
    monkeypatch.setenv(IMAGES_ENV, "/pictures")
    assert environment_fields() == {"images_dir": IMAGES_ENV, "warehouse": WAREHOUSE_ENV}


def test_only_the_settings_module_reads_the_projects_environment_variables():
    """No other module reads an SSL_ATTENTION_* variable (by its name or a *_ENV constant) from os.environ."""
    import ast

    root = Path(__file__).resolve().parents[1]

    def ours(node: ast.expr) -> bool:
        if isinstance(node, ast.Constant):
            return isinstance(node.value, str) and node.value.startswith("SSL_ATTENTION_")
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
        return name.endswith(("_ENV", "ENV_VAR"))

    readers = set()
    for package in ("ssl_attention", "pipelines", "dashboards"):
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and node.args and ours(node.args[0]):
                    function = ast.unparse(node.func)
                    if function in ("os.getenv", "os.environ.get", "environ.get", "getenv"):
                        readers.add(path.relative_to(root).as_posix())
                elif isinstance(node, ast.Subscript) and ours(node.slice) and "environ" in ast.unparse(node.value):
                    readers.add(path.relative_to(root).as_posix())
    assert readers == {"ssl_attention/settings.py"}
