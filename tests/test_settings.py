"""Settings: defaults, precedence (flags > SOFTGATE_* env > config file > defaults), coercion,
validation, redaction."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from conftest import self_signed
from softgate.settings import CLOCK_SKEW_S, Settings, SettingsError, unknown_variables


def test_defaults_run_on_a_laptop() -> None:
    s = Settings.load({}, env={})
    assert (s.grpc_host, s.grpc_port, s.admin_port) == ("0.0.0.0", 50051, 8080)
    assert s.device == "auto" and s.compile is None and not s.tls
    assert s.max_message_bytes == 512 << 20 and s.max_runs == 20 and s.max_tokens == 64 << 20
    assert s.max_connection_age_s == 300.0 and s.grace_seconds > 0 and s.max_concurrent_rpcs >= 1


def test_engine_defaults_are_the_engine_modules():
    """settings.py imports no torch, so it repeats these defaults; they must not drift."""
    from softgate.engine.compiled import DEFAULT_MAX_CONFIGURATIONS
    from softgate.engine.engine import DEFAULT_HOST_MAX_TOKENS
    from softgate.grpc.servicer import DEFAULT_INLINE_MAX_TOKENS

    s = Settings.load({}, env={})
    assert (s.host_max_tokens, s.inline_max_tokens) == (DEFAULT_HOST_MAX_TOKENS, DEFAULT_INLINE_MAX_TOKENS)
    assert s.max_compiled_kernels == DEFAULT_MAX_CONFIGURATIONS
    assert Settings.load({}, env={"SOFTGATE_HOST_MAX_TOKENS": "0"}).host_max_tokens == 0
    assert Settings.load({}, env={"SOFTGATE_MAX_COMPILED_KERNELS": "0"}).max_compiled_kernels == 0


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


def test_a_misspelt_variable_is_named_with_the_setting_meant() -> None:
    """A typo in a SOFTGATE_* name was ignored without a word; service links are not typos."""
    env = {
        "SOFTGATE_GRPC_PROT": "6000",
        "SOFTGATE_LOGLEVEL": "DEBUG",
        "SOFTGATE_XYZ": "1",
        "SOFTGATE_GRPC_PORT": "6001",  # (settings and the other readers' variables are known)
        "SOFTGATE_ENGINE_COMPILE": "0",
        "SOFTGATE_CONFIG": "",
        "SOFTGATE_SERVICE_HOST": "10.0.0.1",  # (Kubernetes' links for Services softgate, softgate-admin)
        "SOFTGATE_PORT": "tcp://10.0.0.1:50051",
        "SOFTGATE_PORT_50051_TCP_ADDR": "10.0.0.1",
        "SOFTGATE_ADMIN_SERVICE_PORT_HTTP": "8080",
        "PATH": "/bin",
    }
    assert unknown_variables(env) == [
        "SOFTGATE_GRPC_PROT: no setting reads it; did you mean SOFTGATE_GRPC_PORT?",
        "SOFTGATE_LOGLEVEL: no setting reads it; did you mean SOFTGATE_LOG_LEVEL?",
        "SOFTGATE_XYZ: no setting reads it",
    ]
    assert Settings.load({}, env=env).grpc_port == 6001  # (a warning, never a refusal)


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
        ({"grpc_port": "fifty"}, "grpc_port from flag --grpc-port: 'fifty' is not an integer"),
        ({"grace_seconds": "soon"}, "grace_seconds from flag --grace-seconds: 'soon' is not a number"),
        ({"log_format": "xml"}, "log_format"),
        ({"tls_cert": "/x.pem"}, "tls_key"),
        ({"tls_client_ca": "/ca.pem"}, "tls_client_ca"),
        ({"max_concurrent_rpcs": "0"}, "max_concurrent_rpcs"),
        ({"compile": "maybe"}, "compile"),
        ({"no_such_setting": "1"}, "unknown"),
        # these ended in a traceback after start-up had begun (torch's device parser,
        # OverflowError in gRPC's int32 channel arguments)
        ({"device": "foo"}, "device: 'foo' is not a device"),
        ({"device": "mps"}, "device: 'mps' is not a device"),
        ({"device": "cuda:x"}, "device: 'cuda:x' is not a device"),
        ({"keepalive_time_s": "inf"}, "keepalive_time_s: inf must be from 0 to 2147483"),
        ({"keepalive_time_s": "1e12"}, "keepalive_time_s"),
        ({"keepalive_timeout_s": "nan"}, "keepalive_timeout_s"),
        ({"max_connection_age_s": "inf"}, "max_connection_age_s"),
        # these turned connection aging off silently (found by an audit); none does that
        ({"max_connection_age_s": "-300"}, "max_connection_age_s: -300.0 must be from 0 to 2147483"),
        ({"max_connection_age_s": "0"}, "max_connection_age_s: 0 must be > 0 (or none)"),
        ({"max_connection_age_grace_s": "1e10"}, "max_connection_age_grace_s"),
        ({"grace_seconds": "inf"}, "grace_seconds"),
        ({"max_message_bytes": str(1 << 33)}, "max_message_bytes: 8589934592 must be below 2 GiB"),
        ({"max_message_bytes": str(1 << 31)}, "max_message_bytes"),
        # ListAlgorithms failed RESOURCE_EXHAUSTED under ~8 KB (an audit)
        ({"max_message_bytes": "4196"}, "max_message_bytes: 4196 must be >= 65536"),
        ({"host_max_tokens": "-1"}, "host_max_tokens: -1 must be >= 0"),
        ({"max_compiled_kernels": "-1"}, "max_compiled_kernels: -1 must be >= 0"),
        # rounded to 0 ms by gRPC: every call then failed UNAVAILABLE "max connection age" (an audit)
        ({"max_connection_age_s": "0.0001"}, "max_connection_age_s: 0.0001 rounds to 0 ms"),
        ({"keepalive_time_s": "0.0009"}, "keepalive_time_s: 0.0009 rounds to 0 ms"),
        ({"keepalive_timeout_s": "1e-6"}, "keepalive_timeout_s: 1e-06 rounds to 0 ms"),
        ({"max_connection_age_grace_s": "0.0005"}, "max_connection_age_grace_s: 0.0005 rounds to 0 ms"),
        # start-up ended in a traceback past int64 (ListAlgorithms' limits; an audit)
        ({"max_tokens": str(1 << 63)}, f"max_tokens: {1 << 63} must be at most {(1 << 63) - 1}"),
        ({"max_sequences": str(1 << 64)}, "max_sequences"),
        ({"max_groups": str(1 << 63)}, "max_groups"),
        # gRPC could not bind "" (exit 1) while an empty admin_host meant every interface (an audit)
        ({"grpc_host": ""}, "grpc_host: empty; give an address (0.0.0.0 or :: for every interface)"),
        ({"admin_host": " "}, "admin_host: empty"),
        # failed at bind, exit 1, which a supervisor retries (an audit)
        ({"grpc_host": " 127.0.0.1"}, "grpc_host: ' 127.0.0.1' is not a host name or address"),
        ({"admin_host": "127.0.0.1\n"}, "admin_host: '127.0.0.1\\n' is not a host name or address"),
        ({"grpc_host": "127.0.0.1:9000"}, "grpc_host: '127.0.0.1:9000' is not a host name or address"),
        ({"admin_host": "http://127.0.0.1"}, "admin_host: 'http://127.0.0.1' is not"),
        ({"grpc_host": "[::1]:9000"}, "grpc_host: '[::1]:9000' is not a host name or address"),
        ({"grpc_host": "a\tb"}, "grpc_host: 'a\\tb' is not a host name or address"),
        # brackets hold an IPv6 address only: gRPC cannot parse "[]:port" or "[127.0.0.1]:port"
        # (exit 1), and an admin_host "[]" listened on every interface, as "" did
        ({"grpc_host": "[127.0.0.1]"}, "grpc_host: '[127.0.0.1]' is not a host name or address"),
        ({"grpc_host": "[localhost]"}, "grpc_host: '[localhost]' is not a host name or address"),
        ({"admin_host": "[]"}, "admin_host: '[]' is not a host name or address"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(flags: dict[str, str], needle: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(needle)) as e:
        Settings.load(flags, env={})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "::1", "[::1]", "localhost", "softgate.example.com"])
def test_host_names_and_addresses_load(host: str) -> None:
    s = Settings.load({"grpc_host": host, "admin_host": host}, env={})
    assert (s.grpc_host, s.admin_host) == (host, host)


def test_the_stream_bounds_load_from_every_source_and_are_checked() -> None:
    """stream_idle_timeout_s and max_stream_chunks (an audit: a call that never sent held its
    slot for minutes; 100k empty chunks held one for 65 s and 400 MB): their defaults, off with
    0 (or none), from the environment and flags, and refused like the other times and counts."""
    from softgate.cli import build_parser, load_settings

    s = Settings.load({}, env={})
    assert (s.stream_idle_timeout_s, s.max_stream_chunks) == (30.0, 16384)
    env = {"SOFTGATE_STREAM_IDLE_TIMEOUT_S": "none", "SOFTGATE_MAX_STREAM_CHUNKS": "0"}
    s = Settings.load({}, env=env)
    assert (s.stream_idle_timeout_s, s.max_stream_chunks) == (None, 0)
    assert Settings.load({}, env={"SOFTGATE_STREAM_IDLE_TIMEOUT_S": "0"}).stream_idle_timeout_s == 0
    args = build_parser().parse_args(["serve", "--stream-idle-timeout-s", "0.5", "--max-stream-chunks", "8"])
    s = load_settings(args)
    assert (s.stream_idle_timeout_s, s.max_stream_chunks) == (0.5, 8)
    for flags, needle in (
        ({"stream_idle_timeout_s": "-1"}, "stream_idle_timeout_s: -1.0 must be from 0 to 2147483"),
        ({"stream_idle_timeout_s": "nan"}, "stream_idle_timeout_s: nan must be from 0"),
        ({"stream_idle_timeout_s": "inf"}, "stream_idle_timeout_s: inf must be from 0"),
        ({"stream_idle_timeout_s": "0.0005"}, "stream_idle_timeout_s: 0.0005 rounds to 0 ms"),
        ({"max_stream_chunks": "-1"}, "max_stream_chunks: -1 must be >= 0 (0: no limit)"),
        ({"max_stream_chunks": str(1 << 63)}, f"max_stream_chunks: {1 << 63} must be at most"),
    ):
        with pytest.raises(SettingsError, match=re.escape(needle)):
            Settings.load(flags, env={})


def test_bad_config_files(tmp_path: Path) -> None:
    bad = tmp_path / "x.yaml"
    bad.write_text("grpc_prot: 1\n")
    with pytest.raises(SettingsError, match="unknown setting"):
        Settings.load({"config": str(bad)}, env={})
    with pytest.raises(SettingsError, match="config file"):
        Settings.load({"config": str(tmp_path / "missing.yaml")}, env={})
    huge = tmp_path / "huge.yaml"  # an int past float's range: OverflowError, a traceback, before
    huge.write_text(f"grace_seconds: {10**400}\nmax_concurrent_rpcs: [4]\n")
    with pytest.raises(SettingsError, match=r"grace_seconds from config file .*: 1000+ is not a number"):
        Settings.load({"config": str(huge)}, env={})
    huge.write_text("max_concurrent_rpcs: [4]\n")
    with pytest.raises(
        SettingsError, match=r"max_concurrent_rpcs from config file .*: \[4\] is not an integer"
    ):
        Settings.load({"config": str(huge)}, env={})
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


def test_the_largest_values_grpc_takes_are_accepted() -> None:
    s = Settings.load(
        {"max_message_bytes": str((1 << 31) - 1), "keepalive_time_s": "2147483", "device": "cpu:0"}, env={}
    )
    assert s.max_message_bytes == (1 << 31) - 1 and s.keepalive_time_s == 2147483.0


def test_a_device_this_host_lacks_is_a_host_problem() -> None:
    """Settings for another host (a GPU overlay's, read on a laptop) load; `softgate serve`
    refuses them with host_problems() before it starts (torch asserted deep in start-up)."""
    s = Settings.load({"device": "cuda:999"}, env={})
    [problem] = s.host_problems()
    assert problem.startswith("device: 'cuda:999' is not available: ")
    assert Settings.load({"device": "cpu"}, env={}).host_problems() == []


def test_the_engine_s_compile_variable_is_checked_before_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """An audit: with compile auto the engine reads SOFTGATE_ENGINE_COMPILE, and a bad value
    failed after start-up began, naming neither the variable nor where it came from. It is a
    host problem now (exit 2, one line); every word the settings accept, the engine does."""
    import torch
    from softgate.engine.compiled import compile_mode
    from softgate.settings import _ENGINE_COMPILE_WORDS

    for word in _ENGINE_COMPILE_WORDS:
        compile_mode(word, torch.device("cpu"))
    from softgate.engine import compiled  # and every word the engine reads, the settings accept

    assert {*compiled._TRUE, *compiled._FALSE, "background", "", "auto", "none"} <= _ENGINE_COMPILE_WORDS
    monkeypatch.setenv("SOFTGATE_ENGINE_COMPILE", "maybe")
    [problem] = Settings.load({"device": "cpu"}, env={}).host_problems()
    assert problem.startswith("SOFTGATE_ENGINE_COMPILE: 'maybe'; expected")
    assert Settings.load({"device": "cpu", "compile": "false"}, env={}).host_problems() == []  # (not read)


def test_a_device_in_a_config_file_that_is_not_a_name(tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text("device: {a: 1}\n")
    with pytest.raises(
        SettingsError, match=r"device from config file .*: expected a string, the value is a mapping"
    ):
        Settings.load({"config": str(cfg)}, env={})


def test_a_malformed_config_file_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text("grpc_port: [1, 2\n")
    with pytest.raises(SettingsError, match="cannot parse") as e:
        Settings.load({"config": str(cfg)}, env={})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("var", ["SOFTGATE_WARMUP", "SOFTGATE_COMPILE"])
def test_an_empty_boolean_is_refused(var: str) -> None:
    name = var.removeprefix("SOFTGATE_").lower()
    with pytest.raises(SettingsError, match=f"{name} from environment variable {var}: empty; expected true"):
        Settings.load({}, env={var: ""})


def test_compile_takes_true_false_auto() -> None:
    for value, want in (("true", True), ("false", False), ("auto", None)):
        assert Settings.load({"compile": value}, env={}).compile is want
    with pytest.raises(SettingsError, match="'maybe'; expected true or false or auto"):
        Settings.load({"compile": "maybe"}, env={})


def test_every_log_level_is_documented() -> None:
    from softgate.settings import LOG_LEVELS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "server.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `log_level` |"))
    assert all(f"`{level}`" in row for level in LOG_LEVELS), row
    for level in LOG_LEVELS:
        assert Settings.load({"log_level": level.lower()}, env={}).log_level == level


# ---------------------------------------------------------------- TLS files


@pytest.fixture(scope="module")
def pems() -> dict[str, bytes]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    a, b = ca.issue_cert("localhost"), ca.issue_cert("other")
    return {
        "cert": b"".join(x.bytes() for x in a.cert_chain_pems),
        "key": a.private_key_pem.bytes(),
        "other_key": b.private_key_pem.bytes(),
        "rsa_key": ca.issue_cert("other", key_type=trustme.KeyType.RSA).private_key_pem.bytes(),
        "ca": ca.cert_pem.bytes(),
        "garbage": b"garbage\n",
        "bad_body": b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    }


@pytest.mark.parametrize(
    ("cert", "key", "ca", "needle"),
    [
        ("garbage", "key", None, "tls_cert: '.*cert.pem' holds no PEM CERTIFICATE block"),
        ("cert", "garbage", None, "tls_key: '.*key.pem' holds no PEM PRIVATE KEY block"),
        ("key", "cert", None, "tls_cert: .* no PEM CERTIFICATE block; tls_key: .* no PEM PRIVATE KEY"),
        ("missing", "key", None, "tls_cert: cannot read '.*missing.pem': No such file"),
        ("cert", "missing", None, "tls_key: cannot read"),
        ("cert", "key", "missing", "tls_client_ca: cannot read"),
        ("cert", "key", "garbage", "tls_client_ca: .* holds no PEM CERTIFICATE block"),
        ("cert", "other_key", None, "tls_key: .* is not the private key of tls_cert"),
        # a key of another type: OpenSSL 3 says NO_CERTIFICATE_ASSIGNED (an audit)
        ("cert", "rsa_key", None, "tls_key: .* is not the private key of tls_cert"),
        ("bad_body", "key", None, "tls_cert and tls_key: .*not a valid certificate"),
        ("cert", "key", "bad_body", "tls_client_ca: .* not valid PEM certificates"),
    ],
)
def test_tls_files_are_checked_and_named(
    tmp_path: Path, pems: dict[str, bytes], cert: str, key: str, ca: str | None, needle: str
) -> None:
    """A bad TLS file was reported as "cannot bind gRPC on ...", a missing one without the
    setting's name."""

    def path(kind: str, what: str) -> str:
        p = tmp_path / ("missing.pem" if what == "missing" else f"{kind}.pem")
        if what != "missing":
            p.write_bytes(pems[what])
        return str(p)

    flags = {"tls_cert": path("cert", cert), "tls_key": path("key", key)}
    if ca is not None:
        flags["tls_client_ca"] = path("ca", ca)
    problems = "; ".join(Settings.load(flags, env={}).host_problems())
    assert re.search(needle, problems) and "\n" not in problems, problems


PATH_FIELDS = ("tls_cert", "tls_key", "tls_client_ca", "status_file")


@pytest.mark.parametrize("raw", ["{}\n", " {}", "{} \r\n", "\t{}\t"])
def test_paths_are_stripped(tmp_path: Path, pems: dict[str, bytes], raw: str) -> None:
    """A ConfigMap made with `--from-file`, or an `echo`, ends in a newline: it became part of
    the path, "cannot read /x/server.pem<newline>: No such file" over two lines (an audit)."""
    paths = {}
    for name, what in zip(PATH_FIELDS, ("cert", "key", "ca", None), strict=True):
        paths[name] = str(tmp_path / f"{name}.pem")
        if what:
            Path(paths[name]).write_bytes(pems[what])
    env = {f"SOFTGATE_{k.upper()}": raw.format(v) for k, v in paths.items()}
    for s in (
        Settings.load({}, env=env),
        Settings.load({k: raw.format(v) for k, v in paths.items()}, env={}),
    ):
        assert {k: getattr(s, k) for k in PATH_FIELDS} == paths
        assert s.host_problems() == []


def test_tls_paths_are_quoted_in_messages(tmp_path: Path) -> None:
    """A path's odd characters show (repr), rather than break the line."""
    cert, key = str(tmp_path / "cert\n.pem"), str(tmp_path / "key .pem")
    problems = Settings(tls_cert=cert, tls_key=key).host_problems()
    assert problems == [
        f"tls_cert: cannot read {cert!r}: No such file or directory",
        f"tls_key: cannot read {key!r}: No such file or directory",
    ]


def test_paths_in_a_config_file_are_relative_to_its_directory(
    tmp_path: Path, pems: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """They were relative to the working directory: `tls_cert: certs/server.pem` next to the
    config file failed to start anywhere else (an audit). Flags and variables keep the working
    directory, as in Prometheus and nginx."""
    conf = tmp_path / "conf"
    (conf / "certs").mkdir(parents=True)
    for name, what in (("cert", "cert"), ("key", "key"), ("ca", "ca")):
        (conf / "certs" / f"{name}.pem").write_bytes(pems[what])
    cfg = conf / "softgate.yaml"
    cfg.write_text(
        "tls_cert: certs/cert.pem\ntls_key: ./certs/key.pem\n"
        f"tls_client_ca: {conf / 'certs' / 'ca.pem'}\nstatus_file: run/status.json\n"
    )
    monkeypatch.chdir(tmp_path)
    for config in (cfg, Path("conf/softgate.yaml")):  # (a relative config path: relative results)
        s = Settings.load({}, env={}, config_file=config)
        assert {k: getattr(s, k) for k in PATH_FIELDS} == {
            "tls_cert": str(config.parent / "certs/cert.pem"),
            "tls_key": str(config.parent / "certs/key.pem"),
            "tls_client_ca": str(conf / "certs" / "ca.pem"),  # absolute: as given
            "status_file": str(config.parent / "run/status.json"),
        }
        assert s.host_problems() == []
    # a flag or a variable over the file: relative to the working directory
    env = {"SOFTGATE_CONFIG": str(cfg), "SOFTGATE_TLS_KEY": "certs/key.pem"}
    s = Settings.load({"tls_cert": "certs/cert.pem", "tls_client_ca": "none"}, env=env)
    assert (s.tls_cert, s.tls_key, s.tls_client_ca) == ("certs/cert.pem", "certs/key.pem", None)
    assert s.status_file == str(conf / "run/status.json")


def test_good_tls_files_pass(tmp_path: Path, pems: dict[str, bytes]) -> None:
    for name in ("cert", "key", "ca"):
        (tmp_path / f"{name}.pem").write_bytes(pems[name])
    s = Settings.load(
        {
            k: str(tmp_path / f"{n}.pem")
            for k, n in (("tls_cert", "cert"), ("tls_key", "key"), ("tls_client_ca", "ca"))
        },
        env={},
    )
    assert s.tls and s.host_problems() == []


def test_the_config_flag_names_the_file_over_softgate_config(tmp_path: Path) -> None:
    """--config (a flag) chooses the file over the SOFTGATE_CONFIG variable."""
    by_flag, by_env = tmp_path / "flag.yaml", tmp_path / "env.yaml"
    by_flag.write_text("max_runs: 3\n")
    by_env.write_text("max_runs: 7\n")
    s = Settings.load({"config": str(by_flag)}, env={"SOFTGATE_CONFIG": str(by_env)})
    assert s.max_runs == 3 and s.config == str(by_flag)
    assert Settings.load({}, env={"SOFTGATE_CONFIG": str(by_env)}).max_runs == 7
    assert Settings.load({"config": by_flag}, env={}).config == str(by_flag)  # a Path is a path


def test_port_65535_is_a_port_and_65536_is_not() -> None:
    """the port range is 0..65535 inclusive, for both ports."""
    s = Settings.load({"grpc_port": "65535", "admin_port": "65535"}, env={})
    assert (s.grpc_port, s.admin_port) == (65535, 65535)
    for name in ("grpc_port", "admin_port"):
        with pytest.raises(SettingsError, match=name):
            Settings.load({name: "65536"}, env={})


def test_admin_port_minus_one_disables_it_from_any_source(tmp_path: Path) -> None:
    """-1 disables the admin endpoint as an int too (a YAML file, a typed flag)."""
    cfg = tmp_path / "s.yaml"
    cfg.write_text("admin_port: -1\n")
    assert Settings.load({}, env={}, config_file=cfg).admin_port is None
    assert Settings.load({"admin_port": -1}, env={}).admin_port is None
    assert Settings.load({}, env={"SOFTGATE_ADMIN_PORT": "-1"}).admin_port is None


def test_a_fractional_value_of_an_integer_setting_is_refused(tmp_path: Path) -> None:
    """1.5 for an integer setting is an error, never silently 1; 2.0 is 2."""
    cfg = tmp_path / "s.yaml"
    cfg.write_text("max_runs: 1.5\n")
    with pytest.raises(SettingsError, match="max_runs"):
        Settings.load({}, env={}, config_file=cfg)
    cfg.write_text("max_runs: 2.0\n")
    assert Settings.load({}, env={}, config_file=cfg).max_runs == 2


def test_a_softgate_section_with_other_top_level_keys_is_refused(tmp_path: Path) -> None:
    """a `softgate:` section is unwrapped only when it is the file's one key; beside
    other keys it is an unknown setting, never a silent drop of those keys."""
    cfg = tmp_path / "s.yaml"
    cfg.write_text("softgate:\n  max_runs: 3\nmax_tokens: 10\n")
    with pytest.raises(SettingsError, match="softgate"):
        Settings.load({}, env={}, config_file=cfg)
    cfg.write_text("softgate:\n  max_runs: 3\n")
    assert Settings.load({}, env={}, config_file=cfg).max_runs == 3


def test_inline_max_tokens_0_means_never_and_is_valid() -> None:
    """0 turns the inline path off (documented), only negatives are refused."""
    assert Settings.load({"inline_max_tokens": "0"}, env={}).inline_max_tokens == 0
    with pytest.raises(SettingsError, match="inline_max_tokens"):
        Settings.load({"inline_max_tokens": "-1"}, env={})


def test_a_config_file_cannot_name_another_config_file(tmp_path: Path) -> None:
    """`config` in a config file is an unknown setting (it would be silently ignored)."""
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"config: {tmp_path / 'other.yaml'}\n")
    with pytest.raises(SettingsError, match="unknown setting 'config'"):
        Settings.load({}, env={}, config_file=cfg)


def test_the_smallest_times_grpc_takes_are_accepted() -> None:
    """1 ms is gRPC's resolution; 0 still means 0 where it is allowed (grace, keepalive)."""
    s = Settings.load(
        {
            "max_connection_age_s": "0.001",
            "keepalive_time_s": "0",
            "keepalive_timeout_s": "0.001",
            "max_connection_age_grace_s": "0",
            "grace_seconds": "0.0001",  # (Python's own timer, not gRPC's milliseconds)
        },
        env={},
    )
    assert (s.max_connection_age_s, s.keepalive_time_s, s.max_connection_age_grace_s) == (0.001, 0, 0)
    big = str((1 << 63) - 1)
    s = Settings.load({"max_tokens": big, "max_sequences": big, "max_groups": big}, env={})
    assert s.max_tokens == s.max_sequences == s.max_groups == (1 << 63) - 1


# ---------------------------------------------------------------- admin_token


@pytest.mark.parametrize("raw", ["s3cret\n", "  s3cret", "s3cret \r\n", "\ts3cret\t"])
def test_the_admin_token_is_stripped(raw: str) -> None:
    """A Secret made with `kubectl create secret --from-file` ends in a newline: the server
    started, and no client could ever authenticate (an audit)."""
    assert Settings.load({}, env={"SOFTGATE_ADMIN_TOKEN": raw}).admin_token == "s3cret"
    assert Settings.load({"admin_token": raw}, env={}).admin_token == "s3cret"


@pytest.mark.parametrize("token", ["p\u00e4sswort", "a b", "tab\there", "nul\x00", "\u20ac"])
def test_an_admin_token_no_client_can_send_is_refused(token: str) -> None:
    """A header is decoded as Latin-1 and compared to the token's UTF-8: a non-ASCII token
    never matched (an audit); a space or a control character is no bearer token either."""
    with pytest.raises(SettingsError, match="admin_token: has a space, a control or a non-ASCII") as e:
        Settings.load({}, env={"SOFTGATE_ADMIN_TOKEN": token})
    assert token not in str(e.value)
    with pytest.raises(SettingsError, match="admin_token"):
        Settings(admin_token=token)


def test_every_visible_ascii_character_is_a_token() -> None:
    token = "".join(chr(c) for c in range(0x21, 0x7F))
    assert Settings.load({}, env={"SOFTGATE_ADMIN_TOKEN": token}).admin_token == token


@pytest.mark.parametrize("word", ["none", "off", "null", "disabled", "None", " OFF\n"])
def test_no_word_turns_the_admin_token_off(word: str, tmp_path: Path) -> None:
    """SOFTGATE_ADMIN_TOKEN=off turned authentication off, silently (an audit)."""
    needle = "looks like a placeholder; leave it unset for no token"
    with pytest.raises(
        SettingsError, match=f"admin_token from environment variable SOFTGATE_ADMIN_TOKEN: .*{needle}"
    ):
        Settings.load({}, env={"SOFTGATE_ADMIN_TOKEN": word})
    with pytest.raises(SettingsError, match=f"admin_token from flag --admin-token: .*{needle}"):
        Settings.load({"admin_token": word}, env={})
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f'admin_token: "{word.strip()}"\n')  # (quoted: YAML reads off as false)
    with pytest.raises(SettingsError, match=needle):
        Settings.load({}, env={}, config_file=cfg)


def test_an_empty_admin_token_is_no_token() -> None:
    """As for every optional setting, an empty variable is unset (the admin_listening event
    then says auth=false)."""
    assert Settings.load({}, env={"SOFTGATE_ADMIN_TOKEN": ""}).admin_token is None
    assert Settings.load({}, env={"SOFTGATE_ADMIN_TOKEN": "\n"}).admin_token is None


# ---------------------------------------------------------------- config file values


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        # YAML 1.1 reads these as a boolean, an octal number, a float: the token was "False" (an audit)
        (
            "admin_token: no",
            r"admin_token from config file .*: expected a string, the value is a boolean \(YAML",
        ),
        (
            "admin_token: 0123",
            r"admin_token from config file .*: expected a string, the value is a number; quote it$",
        ),
        (
            "grpc_host: 0123",
            r"grpc_host from config file .*: expected a string, the value is a number 83; quote",
        ),
        ("device: 1.5", r"device from config file .*: expected a string, the value is a number 1.5"),
        (
            "tls_cert: [a, b]",
            r"tls_cert from config file .*: expected a string, the value is a list \['a', 'b'\]",
        ),
        ("log_format: yes", "log_format from config file .*: expected a string, the value is a boolean True"),
        # `off` was "False is not a number"
        (
            "max_connection_age_s: off",
            r"max_connection_age_s from config file .*: False is not a number \(YAML reads "
            r"yes, no, on and off as true and false\); none disables it",
        ),
        ("grace_seconds: no", r"grace_seconds from config file .*: False is not a number \(YAML .*\)$"),
        ("max_runs: on", r"max_runs from config file .*: True is not an integer \(YAML"),
    ],
)
def test_a_config_value_of_another_type_is_never_made_a_string(
    tmp_path: Path, line: str, needle: str
) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text(line + "\n")
    with pytest.raises(SettingsError, match=needle):
        Settings.load({}, env={}, config_file=cfg)


def test_a_toml_table_is_not_a_host(tmp_path: Path) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text("[grpc_host]\na = 1\n")
    with pytest.raises(
        SettingsError,
        match=r"grpc_host from config file .*: expected a string, the value is a mapping \{'a': 1\}",
    ):
        Settings.load({}, env={}, config_file=cfg)
    cfg.write_text('grpc_host = "127.0.0.1"\nmax_connection_age_s = "none"\n')
    s = Settings.load({}, env={}, config_file=cfg)
    assert (s.grpc_host, s.max_connection_age_s) == ("127.0.0.1", None)


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path: Path, suffix: str) -> None:
    """UnicodeDecodeError ended `softgate serve` with a traceback, exit 1 (an audit)."""
    cfg = tmp_path / f"s{suffix}"
    cfg.write_bytes(b"grpc_port = 1 # \xff\n")
    with pytest.raises(SettingsError, match=rf"^config file {re.escape(str(cfg))}: not UTF-8 text$"):
        Settings.load({}, env={}, config_file=cfg)
    cfg.write_bytes(
        "max_runs = 3 # caf\u00e9\n".encode() if suffix == ".toml" else "max_runs: 3 # caf\u00e9\n".encode()
    )
    assert Settings.load({}, env={}, config_file=cfg).max_runs == 3


SUPPORTED = "supported: RSA of at least 2048 bits, or ECDSA on P-256, P-384 or P-521"


def _key(kind: str) -> Any:
    """A fresh private key of `kind` (cryptography's)."""
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

    makers = {
        "Ed25519": ed25519.Ed25519PrivateKey.generate,
        "Ed448": ed448.Ed448PrivateKey.generate,
        "DSA": lambda: dsa.generate_private_key(2048),
        "ECDSA secp256k1": lambda: ec.generate_private_key(ec.SECP256K1()),
        "ECDSA brainpoolP256r1": lambda: ec.generate_private_key(ec.BrainpoolP256R1()),
        "RSA-1024": lambda: rsa.generate_private_key(65537, 1024),
        "RSA-2048": lambda: rsa.generate_private_key(65537, 2048),
        "RSA-4096": lambda: rsa.generate_private_key(65537, 4096),
        "P-256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "P-384": lambda: ec.generate_private_key(ec.SECP384R1()),
        "P-521": lambda: ec.generate_private_key(ec.SECP521R1()),
    }
    return makers[kind]()


@pytest.mark.parametrize("kind", ["Ed25519", "Ed448", "DSA", "ECDSA secp256k1", "ECDSA brainpoolP256r1"])
def test_a_key_grpc_cannot_use_is_refused(tmp_path: Path, kind: str) -> None:
    """gRPC's TLS (BoringSSL) cannot use these: Ed25519 / Ed448 failed every handshake
    (NO_COMMON_SIGNATURE_ALGORITHMS), DSA and the other curves failed the bind with "cannot bind
    gRPC on ..." and exit 1 (audits)."""
    pytest.importorskip("cryptography")
    flags = self_signed(tmp_path, _key(kind))
    [problem] = Settings.load(flags, env={}).host_problems()
    assert problem == f"tls_key: {flags['tls_key']!r}: gRPC's TLS cannot use {kind} keys ({SUPPORTED})"


def test_an_rsa_pss_key_is_refused(tmp_path: Path) -> None:
    """An RSA-PSS key (its own algorithm, not rsaEncryption) failed gRPC's bind (an audit)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make an RSA-PSS key")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa-pss", "-pkeyopt", "rsa_keygen_bits:2048", "-nodes"),
            *("-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"),
        ],
        check=True,
        capture_output=True,
    )
    [problem] = Settings.load({"tls_cert": str(cert), "tls_key": str(key)}, env={}).host_problems()
    assert problem == f"tls_key: {str(key)!r}: gRPC's TLS cannot use RSA-PSS keys ({SUPPORTED})"


def test_a_small_rsa_key_is_too_small(tmp_path: Path) -> None:
    """RSA-1024 was "not a valid certificate ... (EE_KEY_TOO_SMALL)", from the host's OpenSSL
    security level rather than from gRPC (an audit)."""
    pytest.importorskip("cryptography")
    flags = self_signed(tmp_path, _key("RSA-1024"))
    [problem] = Settings.load(flags, env={}).host_problems()
    assert problem == (
        f"tls_key: {flags['tls_key']!r} is an RSA key of 1024 bits: key too small (RSA >= 2048 or ECDSA)"
    )


@pytest.mark.parametrize(
    ("days", "needle"),
    [
        ((-10, -1), "expired on {:%Y-%m-%d %H:%M:%S} UTC (notAfter)"),
        ((1, 10), "is not valid before {:%Y-%m-%d %H:%M:%S} UTC (notBefore; 300 s of clock skew allowed)"),
        (((CLOCK_SKEW_S + 60) / 86400, 10), "is not valid before {:%Y-%m-%d %H:%M:%S} UTC (notBefore; 300"),
    ],
)
def test_an_expired_or_not_yet_valid_certificate_is_refused(
    tmp_path: Path, days: tuple[float, float], needle: str
) -> None:
    """Such a certificate started without a word, and every client was refused (an audit)."""
    pytest.importorskip("cryptography")
    from cryptography import x509

    flags = self_signed(tmp_path, _key("P-256"), days=days)
    cert = x509.load_pem_x509_certificate(Path(flags["tls_cert"]).read_bytes())
    when = cert.not_valid_after_utc if days[1] < 0 else cert.not_valid_before_utc
    [problem] = Settings.load(flags, env={}).host_problems()
    assert problem.startswith(f"tls_cert: {flags['tls_cert']!r}: the certificate {needle.format(when)}"), (
        problem
    )


def test_a_certificate_a_little_ahead_of_this_clock_passes(tmp_path: Path) -> None:
    """Some issuers set notBefore to the issue time: a node whose clock was a second behind
    refused the certificate, and the pod exited 2, a bad setting (a review)."""
    pytest.importorskip("cryptography")
    for ahead in (1.0, 60.0, CLOCK_SKEW_S - 60):
        flags = self_signed(tmp_path, _key("P-256"), days=(ahead / 86400, 10))
        assert Settings.load(flags, env={}).host_problems() == [], ahead


@pytest.mark.parametrize("key_format", ["PKCS8", "TraditionalOpenSSL"])
def test_an_encrypted_key_says_so(tmp_path: Path, key_format: str) -> None:
    """An encrypted key was "not a valid certificate and unencrypted key", no reason (an audit)."""
    pytest.importorskip("cryptography")
    flags = self_signed(tmp_path, _key("P-256"), key_format=key_format, password=b"secret")
    key = flags["tls_key"]
    [problem] = Settings.load(flags, env={}).host_problems()
    assert problem == (
        f"tls_key: {key!r} is encrypted; gRPC needs an unencrypted key "
        f"(openssl pkey -in {key} -out {key}.plain)"
    )


def test_a_chain_in_the_wrong_order_hints_the_leaf_comes_first(tmp_path: Path) -> None:
    """An intermediate first gave "tls_key: ... is not the private key of tls_cert ...", true
    only of the first certificate (an audit)."""
    trustme = pytest.importorskip("trustme")
    leaf = trustme.CA().create_child_ca().issue_cert("localhost")
    cert, key = tmp_path / "chain.pem", tmp_path / "leaf.key"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems[:2][::-1]))
    key.write_bytes(leaf.private_key_pem.bytes())
    [problem] = Settings.load({"tls_cert": str(cert), "tls_key": str(key)}, env={}).host_problems()
    assert problem == (
        f"tls_key: {str(key)!r} is not the private key of tls_cert {str(cert)!r} (the first "
        "certificate in tls_cert must be the server's own, followed by its intermediates)"
    )


def test_rsa_and_ecdsa_keys_pass(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")

    for kind in ("RSA-2048", "RSA-4096", "P-256", "P-384", "P-521"):
        assert Settings.load(self_signed(tmp_path, _key(kind)), env={}).host_problems() == [], kind


@pytest.mark.parametrize(
    "line", ["admin_token: @Xk9-s3cr3t", "admin_token: 'Xk9-s3cr3t", "admin_token: a: Xk9-s3cr3t"]
)
def test_a_config_file_that_does_not_parse_quotes_none_of_its_lines(tmp_path: Path, line: str) -> None:
    """An audit: PyYAML's message quotes the offending line, and `softgate serve` printed it,
    the admin token in it, to its log. The error names the place instead."""
    cfg = tmp_path / "softgate.yaml"
    cfg.write_text(f"grpc_port: 50051\n{line}\n")
    with pytest.raises(SettingsError, match=r"cannot parse: .*\(line \d+, column \d+\)$") as e:
        Settings.load({}, env={}, config_file=cfg)
    assert "s3cr3t" not in str(e.value)
