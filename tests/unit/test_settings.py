"""Settings: flags > CYCLONE_* environment > YAML file > defaults, typed, with named errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cyclone.settings import ServerSettings, SettingsError, load_settings
from services.inference.main import InferenceSettings


@dataclasses.dataclass(frozen=True)
class ExampleSettings(ServerSettings):
    enabled: bool = False
    ratio: float = 0.5
    name: str | None = None
    tags: tuple[str, ...] = ()


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cyclone.yaml"
    path.write_text(text)
    return path


def test_defaults_when_nothing_given() -> None:
    settings = load_settings(InferenceSettings, {}, env={})
    assert settings == InferenceSettings()
    assert settings.port == 8001
    assert settings.model is None


def test_yaml_overrides_defaults(tmp_path: Path) -> None:
    config = _yaml(tmp_path, "port: 9100\nmodel-repository: /srv/models\nmax_batch_rows: 50\n")
    settings = load_settings(InferenceSettings, {}, config_file=config, env={})
    assert settings.port == 9100
    assert settings.model_repository == Path("/srv/models")
    assert settings.max_batch_rows == 50
    assert settings.host == "127.0.0.1"


def test_env_overrides_yaml(tmp_path: Path) -> None:
    config = _yaml(tmp_path, "port: 9100\nhost: 0.0.0.0\n")
    settings = load_settings(
        InferenceSettings, {}, config_file=config, env={"CYCLONE_PORT": "9200"}
    )
    assert settings.port == 9200
    assert settings.host == "0.0.0.0"


def test_flags_override_env_and_yaml(tmp_path: Path) -> None:
    config = _yaml(tmp_path, "port: 9100\n")
    settings = load_settings(
        InferenceSettings, {"port": 9300}, config_file=config, env={"CYCLONE_PORT": "9200"}
    )
    assert settings.port == 9300


def test_flag_given_as_none_means_not_given() -> None:
    settings = load_settings(InferenceSettings, {"port": None}, env={"CYCLONE_PORT": "9200"})
    assert settings.port == 9200


def test_config_file_from_environment(tmp_path: Path) -> None:
    config = _yaml(tmp_path, "max_message_bytes: 1024\n")
    settings = load_settings(InferenceSettings, {}, env={"CYCLONE_CONFIG": str(config)})
    assert settings.max_message_bytes == 1024


def test_values_are_converted_to_declared_types(tmp_path: Path) -> None:
    settings = load_settings(
        ExampleSettings,
        {},
        env={
            "CYCLONE_PORT": "7000",
            "CYCLONE_ENABLED": "yes",
            "CYCLONE_RATIO": "0.25",
            "CYCLONE_TAGS": "a, b,,c",
            "CYCLONE_DATA_DIR": "~/cyclone-data",
            "CYCLONE_GRACE_SECONDS": "2",
        },
    )
    assert settings.port == 7000
    assert settings.enabled is True
    assert settings.ratio == 0.25
    assert settings.tags == ("a", "b", "c")
    assert settings.data_dir == Path("~/cyclone-data").expanduser()
    assert settings.grace_seconds == 2.0


@pytest.mark.parametrize(
    ("text", "expected"), [("0", False), ("off", False), ("TRUE", True), ("1", True)]
)
def test_bool_spellings(text: str, expected: bool) -> None:
    assert load_settings(ExampleSettings, {}, env={"CYCLONE_ENABLED": text}).enabled is expected


def test_optional_empty_env_is_none() -> None:
    assert load_settings(ExampleSettings, {}, env={"CYCLONE_NAME": ""}).name is None
    assert load_settings(ExampleSettings, {}, env={"CYCLONE_NAME": "x"}).name == "x"


def test_yaml_list_for_tuple(tmp_path: Path) -> None:
    config = _yaml(tmp_path, "tags: [x, y]\nenabled: true\n")
    settings = load_settings(ExampleSettings, {}, config_file=config, env={})
    assert settings.tags == ("x", "y")
    assert settings.enabled is True


@pytest.mark.parametrize(
    ("field", "env_value"),
    [("port", "eighty"), ("enabled", "maybe"), ("ratio", "half"), ("max_message_bytes", "1.5")],
)
def test_bad_env_value_names_the_setting(field: str, env_value: str) -> None:
    with pytest.raises(SettingsError, match=rf"setting '{field}'") as info:
        load_settings(ExampleSettings, {}, env={f"CYCLONE_{field.upper()}": env_value})
    assert env_value in str(info.value)


def test_bad_yaml_value_names_the_setting(tmp_path: Path) -> None:
    config = _yaml(tmp_path, "port: [1, 2]\n")
    with pytest.raises(SettingsError, match="setting 'port'"):
        load_settings(InferenceSettings, {}, config_file=config, env={})


def test_non_integer_float_rejected_for_int(tmp_path: Path) -> None:
    config = _yaml(tmp_path, "max_batch_rows: 10.5\n")
    with pytest.raises(SettingsError, match="setting 'max_batch_rows'"):
        load_settings(InferenceSettings, {}, config_file=config, env={})


def test_bad_flag_value_names_the_setting() -> None:
    with pytest.raises(SettingsError, match="setting 'grace_seconds'"):
        load_settings(InferenceSettings, {"grace_seconds": "soon"}, env={})


def test_unknown_yaml_keys_rejected(tmp_path: Path) -> None:
    config = _yaml(tmp_path, "port: 1\nprot: 2\nmodel_repo: x\n")
    with pytest.raises(SettingsError, match="unknown setting") as info:
        load_settings(InferenceSettings, {}, config_file=config, env={})
    assert "prot" in str(info.value)
    assert "model_repo" in str(info.value)


def test_unknown_env_variables_are_ignored() -> None:
    settings = load_settings(InferenceSettings, {}, env={"CYCLONE_NOT_A_SETTING": "1"})
    assert settings == InferenceSettings()


def test_yaml_not_a_mapping(tmp_path: Path) -> None:
    config = _yaml(tmp_path, "- port\n- 1\n")
    with pytest.raises(SettingsError, match="expected a mapping"):
        load_settings(InferenceSettings, {}, config_file=config, env={})


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    config = _yaml(tmp_path, "port: [1\n")
    with pytest.raises(SettingsError, match=r"config file .*cyclone\.yaml"):
        load_settings(InferenceSettings, {}, config_file=config, env={})


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="config file"):
        load_settings(InferenceSettings, {}, config_file=tmp_path / "absent.yaml", env={})


def test_empty_yaml_is_defaults(tmp_path: Path) -> None:
    config = _yaml(tmp_path, "")
    assert load_settings(InferenceSettings, {}, config_file=config, env={}) == InferenceSettings()


def test_settings_are_frozen() -> None:
    settings = load_settings(InferenceSettings, {}, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


def test_event_loop_must_be_one_cyclone_knows() -> None:
    with pytest.raises(SettingsError, match="event_loop: must be one of asyncio, uvloop"):
        load_settings(ServerSettings, env={"CYCLONE_EVENT_LOOP": "trio"})
    assert load_settings(ServerSettings, env={}).event_loop == "asyncio"


def test_the_launcher_runs_a_service_on_the_loop_its_settings_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    import uvloop

    from services import launch

    loops: list[type] = []

    async def fake_serve(component: str, settings: object) -> None:
        loops.append(type(asyncio.get_running_loop()))

    monkeypatch.setattr(launch, "serve", fake_serve)
    launch.run("inference", ServerSettings(event_loop="uvloop"))
    launch.run("inference", ServerSettings(event_loop="asyncio"))
    assert loops[0] is uvloop.Loop
    assert loops[1] is not uvloop.Loop and issubclass(loops[1], asyncio.AbstractEventLoop)
