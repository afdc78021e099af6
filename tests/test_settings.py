"""Settings: defaults, precedence (flags > SOFTGATE_* env > config file > defaults), coercion,
validation, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest
from softgate.settings import Settings, SettingsError


def test_defaults_run_on_a_laptop() -> None:
    s = Settings.load({}, env={})
    assert (s.grpc_host, s.grpc_port, s.admin_port) == ("0.0.0.0", 50051, 8080)
    assert s.device == "auto" and s.compile is None and not s.tls
    assert s.max_message_bytes == 512 << 20 and s.max_runs == 20 and s.max_tokens == 64 << 20
    assert s.max_connection_age_s == 300.0 and s.grace_seconds > 0 and s.max_concurrent_rpcs >= 1


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "softgate.yaml"
    cfg.write_text("grpc_port: 6000\nadmin_port: 6001\nlog_format: json\nmax_runs: 5\ngrace-seconds: 7\n")
    env = {"SOFTGATE_CONFIG": str(cfg), "SOFTGATE_ADMIN_PORT": "7001", "SOFTGATE_MAX_RUNS": "9"}
    s = Settings.load({"max_runs": "11"}, env=env)
    assert s.grpc_port == 6000  # file over default
    assert s.admin_port == 7001  # env over file
    assert s.max_runs == 11  # flag over env
    assert s.log_format == "json" and s.grace_seconds == 7.0  # from the file, dashes accepted
    assert s.config == str(cfg)
    # a flag left unset (None) does not override anything
    assert Settings.load({"max_runs": None, "config": str(cfg)}, env={}).max_runs == 5


def test_toml_config_with_a_section(tmp_path: Path) -> None:
    cfg = tmp_path / "softgate.toml"
    cfg.write_text(
        '[softgate]\ngrpc_port = 7100\ndevice = "cpu"\ncompile = false\nmax_connection_age_s = "none"\n'
    )
    s = Settings.load({"config": str(cfg)}, env={})
    assert (s.grpc_port, s.device, s.compile, s.max_connection_age_s) == (7100, "cpu", False, None)


@pytest.mark.parametrize(
    ("env", "field", "value"),
    [
        ({"SOFTGATE_ADMIN_PORT": "-1"}, "admin_port", None),
        ({"SOFTGATE_ADMIN_PORT": "none"}, "admin_port", None),
        ({"SOFTGATE_COMPILE": "true"}, "compile", True),
        ({"SOFTGATE_COMPILE": "auto"}, "compile", None),
        ({"SOFTGATE_WARMUP": "0"}, "warmup", False),
        ({"SOFTGATE_LOG_LEVEL": "debug"}, "log_level", "DEBUG"),
        ({"SOFTGATE_MAX_TOKENS": "1_000"}, "max_tokens", 1000),
        ({"SOFTGATE_KEEPALIVE_TIME_S": "2.5"}, "keepalive_time_s", 2.5),
    ],
)
def test_environment_coercion(env: dict[str, str], field: str, value: object) -> None:
    assert getattr(Settings.load({}, env=env), field) == value


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ({"grpc_port": "70000"}, "grpc_port"),
        ({"grpc_port": "fifty"}, "grpc_port"),
        ({"log_format": "xml"}, "log_format"),
        ({"tls_cert": "/x.pem"}, "tls_key"),
        ({"tls_client_ca": "/ca.pem"}, "tls_client_ca"),
        ({"max_concurrent_rpcs": "0"}, "max_concurrent_rpcs"),
        ({"compile": "maybe"}, "compile"),
        ({"no_such_setting": "1"}, "unknown"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(flags: dict[str, str], needle: str) -> None:
    with pytest.raises(SettingsError, match=needle):
        Settings.load(flags, env={})


def test_bad_config_files(tmp_path: Path) -> None:
    bad = tmp_path / "x.yaml"
    bad.write_text("grpc_prot: 1\n")
    with pytest.raises(SettingsError, match="unknown setting"):
        Settings.load({"config": str(bad)}, env={})
    with pytest.raises(SettingsError, match="config file"):
        Settings.load({"config": str(tmp_path / "missing.yaml")}, env={})
    ini = tmp_path / "x.ini"
    ini.write_text("a=1")
    with pytest.raises(SettingsError, match="format"):
        Settings.load({"config": str(ini)}, env={})


def test_secrets_are_redacted() -> None:
    s = Settings.load({"admin_token": "hunter2"}, env={})
    assert s.admin_token == "hunter2"
    red = s.redacted()
    assert red["admin_token"] == "***" and "hunter2" not in repr(s) and "hunter2" not in str(red)
    assert Settings.load({}, env={}).redacted()["admin_token"] is None
    assert set(red) == set(Settings.__dataclass_fields__)
