"""Server settings: one frozen dataclass, loaded from four sources.

Precedence, highest first: command-line flags > `SOFTGATE_*` environment variables > a
YAML or TOML config file (`--config PATH` or `SOFTGATE_CONFIG`) > the defaults below, which
run on a laptop CPU. Every field `x` is the flag `--x` (dashes for underscores) and the
environment variable `SOFTGATE_X`; the config file holds the same names as keys (flat, or
under a top-level `softgate:` / `[softgate]` section).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import difflib
import os
import re
import shlex
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

MiB = 1 << 20
SECRET_FIELDS = frozenset({"admin_token"})
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ALLOCATORS = ("auto", "system", "glibc", "tcmalloc", "jemalloc")
_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}
# what engine/compiled.py's compile_mode reads from SOFTGATE_ENGINE_COMPILE (this module imports no torch)
_ENGINE_COMPILE_WORDS = {
    "1",
    "true",
    "yes",
    "on",
    "sync",
    "0",
    "false",
    "no",
    "off",
    "background",
    "",
    "auto",
    "none",
}
_NONE_WORDS = ("none", "null", "off", "disabled")  # an optional setting's "unset"
# what a client can send after "Bearer ": visible ASCII, no space (RFC 6750's b64token is a
# subset); Starlette decodes a header as Latin-1 and the token compares as UTF-8 (an audit)
_TOKEN = re.compile(r"[\x21-\x7e]+")
INT64_MAX = (1 << 63) - 1  # the request limits become protobuf int64 fields (ListAlgorithms)
# gRPC takes its time and size settings as 32-bit ints (milliseconds, bytes)
INT32_MAX = (1 << 31) - 1
MIN_MESSAGE_BYTES = 64 << 10  # every response that is not a batch's fits
DEFAULT_STREAM_IDLE_TIMEOUT_S = 30.0  # a silent call's slot is freed after it (also the servicer's default)
MAX_SECONDS = INT32_MAX // 1000  # 2,147,483 s, about 24.8 days
# a certificate up to this far ahead of this host's clock (its notBefore) is served, with a
# warning: some issuers set notBefore to the issue time, and a node's clock a second behind
# theirs refused it and exited 2, a bad setting that supervisors do not retry (a review)
CLOCK_SKEW_S = 300.0


class SettingsError(ValueError):
    """A setting is missing, malformed or inconsistent; the message names the source."""


@dataclass(frozen=True)
class Settings:
    """Everything `softgate serve` can be told. See docs/server.md for each field."""

    # ---- gRPC endpoint
    grpc_host: str = field(default="0.0.0.0", metadata={"help": "gRPC listen address"})
    grpc_port: int = field(default=50051, metadata={"help": "gRPC port; 0 picks a free one (logged)"})
    # ---- admin HTTP endpoint (health, readiness, metrics)
    admin_host: str = field(default="0.0.0.0", metadata={"help": "admin HTTP listen address"})
    admin_port: int | None = field(
        default=8080, metadata={"help": "admin HTTP port; 0 picks a free one, -1 or 'none' disables it"}
    )
    admin_token: str | None = field(
        default=None, metadata={"help": "bearer token required by the admin API (secret, never logged)"}
    )
    # ---- engine
    device: str = field(
        default="auto", metadata={"help": "engine device: auto (cuda if present), cpu, cuda:N"}
    )
    compile: bool | None = field(
        default=None,
        metadata={
            "help": "torch.compile the engine's per-token kernel: true, false, or auto (CUDA: compile "
            "before use; CPU: first calls eager while it compiles in the background)"
        },
    )
    warmup: bool = field(default=True, metadata={"help": "run every objective once before serving"})
    engine_workers: int = field(
        default=2,
        metadata={"help": "threads that run engine calls (RPCs past it queue, up to max_concurrent_rpcs)"},
    )
    inline_max_tokens: int = field(
        default=32768,
        metadata={
            "help": "calls up to this many tokens may run on the event loop thread instead of the pool "
            "when alone in flight and the engine has been fast (saves the thread hop); 0: never"
        },
    )
    host_max_tokens: int = field(
        default=65536,  # engine.DEFAULT_HOST_MAX_TOKENS (this module imports no torch)
        metadata={
            "help": "a CUDA engine computes calls of at most this many tokens on the host CPU, where "
            "they cost less than the GPU's launches and copies; 0: every call on the GPU"
        },
    )
    max_compiled_kernels: int = field(
        default=64,  # compiled.DEFAULT_MAX_CONFIGURATIONS (this module imports no torch)
        metadata={
            "help": "engine configurations compiled at most (each ~20 s of a core and ~2 MB of disk "
            "cache); later new ones run eager; 0: no limit"
        },
    )
    allocator: str = field(
        default="auto",
        metadata={
            "help": "malloc of the server process (LD_PRELOAD, set by re-executing at start): auto "
            "(tcmalloc if installed, else jemalloc, else glibc), tcmalloc, jemalloc, system, or a library path"
        },
    )
    # ---- transport
    max_message_bytes: int = field(
        default=512 * MiB,
        metadata={"help": "largest message received or sent, bytes (64 KiB to below 2 GiB)"},
    )
    max_concurrent_rpcs: int = field(
        default=32, metadata={"help": "RPCs in progress at once; past it RESOURCE_EXHAUSTED at once"}
    )
    stream_idle_timeout_s: float | None = field(
        default=DEFAULT_STREAM_IDLE_TIMEOUT_S,
        metadata={
            "help": "a call that sends no request message for this long (its first included, each "
            "whole) ends DEADLINE_EXCEEDED and frees its slot, s; 0 or none: never"
        },
    )
    keepalive_time_s: float = field(default=60.0, metadata={"help": "server keepalive ping interval, s"})
    keepalive_timeout_s: float = field(default=20.0, metadata={"help": "keepalive ping ack timeout, s"})
    max_connection_age_s: float | None = field(
        default=300.0,
        metadata={"help": "close connections after this age so clients re-resolve DNS (k8s); none: never"},
    )
    max_connection_age_grace_s: float = field(
        default=60.0, metadata={"help": "time RPCs of an aged connection get to finish, s"}
    )
    grace_seconds: float = field(
        default=30.0, metadata={"help": "on SIGTERM/SIGINT, time in-flight RPCs get to finish, s"}
    )
    # ---- TLS
    tls_cert: str | None = field(
        default=None, metadata={"help": "server certificate chain (PEM); enables TLS"}
    )
    tls_key: str | None = field(default=None, metadata={"help": "server private key (PEM)"})
    tls_client_ca: str | None = field(
        default=None, metadata={"help": "CA bundle (PEM) for client certificates; set: mutual TLS required"}
    )
    # ---- logs and metrics
    log_format: str = field(default="text", metadata={"help": "text or json (one object per line)"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING, ERROR, CRITICAL"})
    log_requests: bool = field(
        default=False,
        metadata={"help": "one INFO line per finished RPC: rpc, run, status, seconds, sizes, peer, error"},
    )
    max_runs: int = field(
        default=20,
        metadata={
            "help": "distinct softgate-run labels in metrics; past it the least recently active run is dropped"
        },
    )
    # ---- request limits (0: no limit)
    max_tokens: int = field(
        default=64 * MiB, metadata={"help": "tokens per request (per stream), 0: no limit"}
    )
    max_sequences: int = field(
        default=1 * MiB, metadata={"help": "sequences per request (per stream), 0: no limit"}
    )
    max_groups: int = field(
        default=1 * MiB, metadata={"help": "distinct groups per request (per stream), 0: no limit"}
    )
    max_stream_chunks: int = field(
        default=16384, metadata={"help": "messages (chunks) in one StreamLoss stream, 0: no limit"}
    )
    status_file: str | None = field(
        default=None,
        metadata={
            "help": "write the bound gRPC and admin addresses here (JSON) once listening, removed at "
            "exit; `softgate health` reads it (the container images set /tmp/softgate-status.json)"
        },
    )
    # ---- where these came from
    config: str | None = field(default=None, metadata={"help": "YAML or TOML config file"})

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise SettingsError("; ".join(problems))

    # ------------------------------------------------------------ checks
    def problems(self) -> list[str]:
        p: list[str] = []
        if not 0 <= self.grpc_port <= 65535:
            p.append(f"grpc_port: {self.grpc_port} is not a port (0..65535)")
        if self.admin_port is not None and not 0 <= self.admin_port <= 65535:
            p.append(f"admin_port: {self.admin_port} is not a port (0..65535, or -1 to disable)")
        if self.log_format not in LOG_FORMATS:
            p.append(f"log_format: {self.log_format!r}; one of {list(LOG_FORMATS)}")
        if self.log_level.upper() not in LOG_LEVELS:
            p.append(f"log_level: {self.log_level!r}; one of {list(LOG_LEVELS)}")
        for name in ("max_concurrent_rpcs", "engine_workers", "max_runs"):
            if getattr(self, name) < 1:
                p.append(f"{name}: {getattr(self, name)} must be >= 1")
        if self.max_message_bytes < MIN_MESSAGE_BYTES:
            p.append(
                f"max_message_bytes: {self.max_message_bytes} must be >= {MIN_MESSAGE_BYTES} "
                "(ListAlgorithms' catalogue alone is ~8 KB)"
            )
        if self.max_message_bytes > INT32_MAX:
            p.append(
                f"max_message_bytes: {self.max_message_bytes} must be below 2 GiB ({INT32_MAX + 1}), gRPC's limit"
            )
        if self.inline_max_tokens < 0:
            p.append(f"inline_max_tokens: {self.inline_max_tokens} must be >= 0 (0: never inline)")
        if self.host_max_tokens < 0:
            p.append(f"host_max_tokens: {self.host_max_tokens} must be >= 0 (0: every call on the device)")
        for name in (
            "max_tokens",
            "max_sequences",
            "max_groups",
            "max_stream_chunks",
            "max_compiled_kernels",
        ):
            if getattr(self, name) < 0:
                p.append(f"{name}: {getattr(self, name)} must be >= 0 (0: no limit)")
        for name in ("max_tokens", "max_sequences", "max_groups", "max_stream_chunks"):
            if getattr(self, name) > INT64_MAX:  # failed start-up with a traceback (an audit)
                p.append(f"{name}: {getattr(self, name)} must be at most {INT64_MAX} (a 64-bit integer)")
        for name in (
            "keepalive_time_s",
            "keepalive_timeout_s",
            "max_connection_age_s",
            "max_connection_age_grace_s",
            "grace_seconds",
            "stream_idle_timeout_s",
        ):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= MAX_SECONDS:  # (NaN fails too)
                p.append(f"{name}: {v} must be from 0 to {MAX_SECONDS} seconds (gRPC's 32-bit milliseconds)")
            elif name != "grace_seconds" and v is not None and 0 < v < 0.001:
                # gRPC takes whole milliseconds: 0.0001 was 0, and an age of 0 closed every
                # connection before its first call (an audit)
                least = (
                    "at least 0.001, or none" if name == "max_connection_age_s" else "0, or at least 0.001"
                )
                p.append(f"{name}: {v} rounds to 0 ms; gRPC takes whole milliseconds ({least})")
        if self.max_connection_age_s == 0:
            p.append("max_connection_age_s: 0 must be > 0 (or none)")
        for name in ("grpc_host", "admin_host"):
            host = getattr(self, name)
            if not host.strip():  # gRPC could not bind "", uvicorn took all interfaces
                p.append(f"{name}: empty; give an address (0.0.0.0 or :: for every interface)")
            elif (
                re.search(r"\s|/", host)
                or host.count(":") == 1
                or host.startswith("[") != host.endswith("]")
                or (host.startswith("[") and ":" not in host[1:-1])  # ([], [127.0.0.1]: gRPC cannot parse)
            ):
                # failed at bind, exit 1 (a transient failure to a supervisor; an audit)
                p.append(f"{name}: {host!r} is not a host name or address (no spaces, scheme, path or port)")
        if self.admin_token and not _TOKEN.fullmatch(self.admin_token):
            p.append(
                "admin_token: has a space, a control or a non-ASCII character; no client could send it "
                "(visible ASCII only)"
            )
        device = _device_problem(self.device, on_this_host=False)
        if device:
            p.append(f"device: {self.device!r} {device}")
        if self.allocator.strip().lower() not in ALLOCATORS and not self.allocator.startswith("/"):
            p.append(f"allocator: {self.allocator!r}; one of {list(ALLOCATORS)} or an absolute library path")
        if (self.tls_cert is None) != (self.tls_key is None):
            p.append("tls_cert and tls_key: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            p.append("tls_client_ca: mutual TLS needs tls_cert and tls_key too")
        return p

    def host_problems(self) -> list[str]:
        """What this host must provide: the CUDA device asked for, and TLS files that are readable
        and valid. Not checked on construction, so that the settings of another host (a GPU
        overlay's, on a laptop) still load; `softgate serve` checks them before it starts."""
        p: list[str] = []
        device = _device_problem(self.device, on_this_host=True)
        if device:
            p.append(f"device: {self.device!r} {device}")
        if self.tls_cert is not None and self.tls_key is not None:
            p += tls_problems(self.tls_cert, self.tls_key, self.tls_client_ca)
        raw = os.environ.get("SOFTGATE_ENGINE_COMPILE", "")  # (the engine's own: read when compile is auto)
        if self.compile is None and raw.strip().lower() not in _ENGINE_COMPILE_WORDS:
            p.append(
                f"SOFTGATE_ENGINE_COMPILE: {raw!r}; expected 1, 0, true, false, background or auto (read when compile is auto)"
            )
        return p

    # ------------------------------------------------------------ views
    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def redacted(self) -> dict[str, Any]:
        """Every field, secrets replaced by "***" (when set), for logs and the admin API."""
        out = dataclasses.asdict(self)
        for k in SECRET_FIELDS:
            if out.get(k):
                out[k] = "***"
        return out

    def __repr__(self) -> str:  # never show the secret in a traceback or log
        inner = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"Settings({inner})"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        flags: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        config_file: str | os.PathLike[str] | None = None,
    ) -> Settings:
        """Merge the sources: `flags` (already parsed; None values mean "not given") over
        `SOFTGATE_*` variables of `env` (default os.environ) over the config file (from
        `config_file`, else flags["config"], else SOFTGATE_CONFIG) over the defaults. A relative
        file path is relative to the config file's directory in it, else to the working one."""
        env = os.environ if env is None else env
        flags = {k: v for k, v in (flags or {}).items() if v is not None}
        unknown = set(flags) - _FIELDS.keys()
        if unknown:
            raise SettingsError(f"unknown setting(s): {sorted(unknown)}")
        path = config_file or flags.get("config") or env.get("SOFTGATE_CONFIG") or None
        values: dict[str, Any] = {}
        if path:
            for k, v in _read_config_file(Path(path)).items():
                value = _coerce(k, v, f"config file {path}")
                if k in _PATH_FIELDS and value:
                    # relative to the config file, as in Prometheus and nginx: certs/tls.crt
                    # beside it was looked for in the working directory (an audit)
                    value = str(Path(path).parent / value)
                values[k] = value
            values["config"] = str(path)
        for k in _FIELDS:
            var = "SOFTGATE_" + k.upper()
            if var in env and k != "config":
                values[k] = _coerce(k, env[var], f"environment variable {var}")
        for k, v in flags.items():
            values[k] = _coerce(k, v, f"flag --{k.replace('_', '-')}")
        try:
            return cls(**values)
        except SettingsError:
            raise
        except (TypeError, ValueError) as e:  # pragma: no cover - _coerce catches these
            raise SettingsError(str(e)) from e


_FIELDS = {f.name: f for f in fields(Settings)}

# SOFTGATE_* variables read elsewhere: the config file's path, the engine's compile switch,
# the allocator's re-exec mark, scripts/install.sh's
_OTHER_VARIABLES = frozenset(
    {"SOFTGATE_CONFIG", "SOFTGATE_ENGINE_COMPILE", "SOFTGATE_ALLOCATOR_REEXEC", "SOFTGATE_INSTALL_UNLOCKED"}
)
# what Kubernetes' service links inject for a Service named softgate or softgate-*
# (SOFTGATE_SERVICE_HOST, SOFTGATE_ADMIN_PORT_8080_TCP_ADDR, ...; deploy/ turns them off)
_SERVICE_LINK = re.compile(
    r"SOFTGATE(_\w+?)?_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)(_\w+)?)"
)


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """The `SOFTGATE_*` variables of `env` that no setting reads, each with the likeliest one
    meant: a misspelt variable is otherwise ignored without a word (an audit's finding)."""
    names = ["SOFTGATE_" + k.upper() for k in _FIELDS if k != "config"] + sorted(_OTHER_VARIABLES)
    out = []
    for var in sorted(env):
        if not var.startswith("SOFTGATE_") or var in names or _SERVICE_LINK.fullmatch(var):
            continue
        if var.endswith("_PORT") and re.match(r"(tcp|udp|sctp)://", env[var]):
            continue  # (a service link's SOFTGATE_X_PORT=tcp://10.0.0.1:8080)
        close = difflib.get_close_matches(var[9:], [n[9:] for n in names], n=1)  # (less the prefix)
        out.append(f"{var}: no setting reads it" + (f"; did you mean SOFTGATE_{close[0]}?" if close else ""))
    return out


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise SettingsError(f"config file {path}: {e.strerror or e}") from e
    except UnicodeDecodeError:  # (a traceback, before: an audit)
        raise SettingsError(f"config file {path}: not UTF-8 text") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data: Any = tomllib.loads(text)
        elif suffix in (".yaml", ".yml", ".json"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise SettingsError(f"config file {path}: unknown format {suffix!r}; use .yaml, .yml or .toml")
    except SettingsError:
        raise
    except Exception as e:
        # not str(e) for YAML's: it quotes the offending line, which may be admin_token's (an audit)
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        why = str(e) if problem is None else f"{getattr(e, 'context', None) or ''} {problem}"
        where = "" if mark is None else f" (line {mark.line + 1}, column {mark.column + 1})"
        raise SettingsError(f"config file {path}: cannot parse: {' '.join(why.split())}{where}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path}: expected a mapping of setting names to values")
    if isinstance(data.get("softgate"), dict) and len(data) == 1:
        data = data["softgate"]
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key not in _FIELDS or key == "config":
            raise SettingsError(f"config file {path}: unknown setting {k!r}")
        out[key] = v
    return out


_PATH_FIELDS = frozenset({"tls_cert", "tls_key", "tls_client_ca", "status_file"})
_BOOL_HINT = " (YAML reads yes, no, on and off as true and false)"
_TYPE_NAMES = {bool: "boolean", int: "number", float: "number", list: "list", dict: "mapping"}


def _coerce(name: str, value: Any, source: str) -> Any:
    """`value` (a string from the environment, or a typed value) as the field's type."""
    tp = str(_FIELDS[name].type)
    optional = "None" in tp
    try:
        if name == "admin_token" and isinstance(value, str):
            # a Secret made with `kubectl create secret --from-file` ends in a newline, which no
            # client sends (an audit); and no word may turn a secret off
            value = value.strip()
            if value.lower() in _NONE_WORDS:
                raise ValueError(f"{value!r} looks like a placeholder; leave it unset for no token")
        if name in _PATH_FIELDS and isinstance(value, str):
            value = value.strip()  # (a ConfigMap made with --from-file, or `echo`, ends in a newline)
        if isinstance(value, str):
            s = value.strip()
            if optional and s.lower() in _NONE_WORDS and name != "compile":
                return None
            if name == "compile" and s.lower() in ("auto", "none", "null"):
                return None
            if name == "admin_port" and s == "-1":
                return None
        if value is None:
            if optional:
                return None
            raise ValueError("must not be empty")
        if tp.startswith("bool"):
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            given = repr(value) if s else "empty"
            raise ValueError(f"{given}; expected true or false" + (" or auto" if name == "compile" else ""))
        if tp.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                hint = _BOOL_HINT if isinstance(value, bool) else ""
                raise ValueError(f"{value!r} is not an integer{hint}")
            try:
                iv = int(str(value).strip().replace("_", "")) if isinstance(value, str) else int(value)
            except (TypeError, ValueError):  # (int's own message: "invalid literal for int() ...")
                raise ValueError(f"{value!r} is not an integer") from None
            if name == "admin_port" and iv == -1:
                return None
            return iv
        if tp.startswith("float"):
            if isinstance(value, bool):
                disables = "; none disables it" if optional else ""
                raise ValueError(f"{value!r} is not a number{_BOOL_HINT}{disables}")
            try:
                fv = float(value)
            except (TypeError, ValueError, OverflowError):  # (OverflowError: an int past 1e308)
                raise ValueError(f"{value!r} is not a number") from None
            return fv
        if isinstance(value, os.PathLike):  # a typed flag: Settings.load({"config": Path(...)})
            value = os.fspath(value)
        if not isinstance(value, str):
            # YAML and TOML read `no` as False, `0123` as 83, a list as a list: never str() them
            # into a setting (an audit); a secret's value is not repeated
            kind = _TYPE_NAMES.get(type(value), type(value).__name__)
            shown = "" if name in SECRET_FIELDS else f" {value!r}"
            hint = _BOOL_HINT if isinstance(value, bool) else ""
            raise ValueError(f"expected a string, the value is a {kind}{shown}{hint}; quote it")
        s = value
        if name == "log_level":
            s = s.upper()
        if optional and s == "":
            return None
        return s
    except (TypeError, ValueError) as e:
        raise SettingsError(f"{name} from {source}: {e}") from e


_DEVICE = re.compile(r"(cpu|cuda)(:[0-9]+)?")


def _device_problem(device: str, *, on_this_host: bool) -> str | None:
    """Why `device` is not one (or, `on_this_host`, not there), or None. Only the check on this
    host imports torch, which the CLI does once it has re-executed itself (allocator.py)."""
    if device in ("", "auto", "cpu"):  # "" is auto, as in serve.make_engine
        return None
    if not _DEVICE.fullmatch(device):
        return "is not a device; auto, cpu, cuda or cuda:N"
    if not on_this_host:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return "is not a device; auto, cpu, cuda or cuda:N"
    if dev.type == "cpu":
        return None
    if not torch.cuda.is_available():
        return "is not available: this torch has no CUDA or the host no CUDA device"
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        return f"is not available: this host has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
    return None


_PEM_BEGIN = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----")
_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)
# what gRPC's TLS (BoringSSL) signs handshakes with; the other keys OpenSSL loads (Ed25519,
# DSA, RSA-PSS, secp256k1, brainpool) passed this check, then failed the bind or every handshake
SUPPORTED_KEYS = "supported: RSA of at least 2048 bits, or ECDSA on P-256, P-384 or P-521"
_RSA, _EC = "1.2.840.113549.1.1.1", "1.2.840.10045.2.1"
_CURVES = {"1.2.840.10045.3.1.7": "P-256", "1.3.132.0.34": "P-384", "1.3.132.0.35": "P-521"}
_KEY_NAMES = {
    "1.2.840.113549.1.1.10": "RSA-PSS",
    "1.2.840.10040.4.1": "DSA",
    "1.3.101.112": "Ed25519",
    "1.3.101.113": "Ed448",
    "1.3.132.0.10": "secp256k1",
    "1.3.36.3.3.2.8.1.1.7": "brainpoolP256r1",
    "1.3.36.3.3.2.8.1.1.11": "brainpoolP384r1",
    "1.3.36.3.3.2.8.1.1.13": "brainpoolP512r1",
}


def _pem_problem(name: str, path: str, kind: str) -> str | None:
    """Why the file of setting `name` is unusable: unreadable, or no PEM block whose label ends
    with `kind` ("CERTIFICATE", "PRIVATE KEY": also "RSA PRIVATE KEY", "EC PRIVATE KEY")."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"{name}: cannot read {path!r}: {e.strerror or e}"
    if not any(label == kind or label.endswith(" " + kind) for label in _PEM_BEGIN.findall(text)):
        return f"{name}: {path!r} holds no PEM {kind} block"
    return None


# OpenSSL's reasons for a key that is not the certificate's: of its type, or of another type
# (OpenSSL 3 then reports the certificate's slot as empty; an audit)
KEY_MISMATCH = ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED")


def tls_problems(cert: str, key: str, client_ca: str | None) -> list[str]:
    """The TLS files: readable, PEM of the right kind, an unencrypted key of an algorithm gRPC
    can use, that belongs to a certificate valid now (the first in `cert`), and a client CA
    that parses. Checked at start and on every reload; [] when all is well."""
    import ssl

    p = [
        x
        for x in (
            _pem_problem("tls_cert", cert, "CERTIFICATE"),
            _pem_problem("tls_key", key, "PRIVATE KEY"),
            client_ca and _pem_problem("tls_client_ca", client_ca, "CERTIFICATE"),
        )
        if x
    ]
    if p:
        return p
    key_text = Path(key).read_text(errors="replace")
    if "-----BEGIN ENCRYPTED PRIVATE KEY-----" in key_text or "Proc-Type: 4,ENCRYPTED" in key_text:
        plain = shlex.quote(key + ".plain")
        return [
            f"tls_key: {key!r} is encrypted; gRPC needs an unencrypted key "
            f"(openssl pkey -in {shlex.quote(key)} -out {plain})"
        ]
    leaf = _leaf_certificate(Path(cert).read_text(errors="replace"))
    if leaf is not None:  # (one that does not parse: OpenSSL's load below says so)
        p += _validity_problems(cert, *leaf[:2])
        p += _key_problems(key, *leaf[2:])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # BoringSSL has no security levels: without this, the host's openssl.cnf decided (RSA-1024
    # was EE_KEY_TOO_SMALL here, fine on another host); the key check above decides instead
    with contextlib.suppress(ssl.SSLError):
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        ctx.load_cert_chain(cert, key, password=lambda: b"")  # (no prompt)
    except ssl.SSLError as e:
        if e.reason in KEY_MISMATCH:
            p.append(
                f"tls_key: {key!r} is not the private key of tls_cert {cert!r} (the first certificate "
                "in tls_cert must be the server's own, followed by its intermediates)"
            )
        elif not p:
            why = f" ({e.reason})" if e.reason else ""
            p.append(f"tls_cert and tls_key: {cert!r}, {key!r}: not a valid certificate and key{why}")
    if client_ca is not None:
        try:
            ctx.load_verify_locations(client_ca)
        except ssl.SSLError as e:
            why = f" ({e.reason})" if e.reason else ""
            p.append(f"tls_client_ca: {client_ca!r}: not valid PEM certificates{why}")
    return p


def cert_not_after(pem: str) -> datetime.datetime | None:
    """The notAfter of the first certificate of a PEM chain, None when it does not parse."""
    leaf = _leaf_certificate(pem)
    return leaf[1] if leaf is not None else None


def cert_early_s(pem: str) -> float:
    """How far the first certificate of a PEM chain is ahead of this host's clock (its notBefore
    less now), seconds; 0 when it is valid now or does not parse."""
    leaf = _leaf_certificate(pem)
    if leaf is None:
        return 0.0
    return max((leaf[0] - datetime.datetime.now(datetime.timezone.utc)).total_seconds(), 0.0)


def _validity_problems(cert: str, not_before: datetime.datetime, not_after: datetime.datetime) -> list[str]:
    now = datetime.datetime.now(datetime.timezone.utc)
    if not_after < now:
        return [
            f"tls_cert: {cert!r}: the certificate expired on {not_after:%Y-%m-%d %H:%M:%S} UTC (notAfter)"
        ]
    if (not_before - now).total_seconds() > CLOCK_SKEW_S:
        return [
            f"tls_cert: {cert!r}: the certificate is not valid before {not_before:%Y-%m-%d %H:%M:%S} UTC "
            f"(notBefore; {CLOCK_SKEW_S:g} s of clock skew allowed)"
        ]
    return []


def _key_problems(key: str, algorithm: str, detail: str | int) -> list[str]:
    """Why gRPC cannot use a certificate's key (its algorithm OID, and the curve OID of an EC
    key or the bits of an RSA one); the key file holds that key, or load_cert_chain says not."""
    if algorithm == _RSA:
        if int(detail) < 2048:
            return [f"tls_key: {key!r} is an RSA key of {detail} bits: key too small (RSA >= 2048 or ECDSA)"]
        return []
    if algorithm == _EC:
        if detail in _CURVES:
            return []
        name = "ECDSA " + _KEY_NAMES.get(str(detail), str(detail) or "(explicit curve parameters)")
    else:
        name = _KEY_NAMES.get(algorithm, f"OID {algorithm}")
    return [f"tls_key: {key!r}: gRPC's TLS cannot use {name} keys ({SUPPORTED_KEYS})"]


# A few lines of DER rather than a dependency on `cryptography`: an X.509 certificate is
# SEQUENCE { tbsCertificate SEQUENCE { [0] version, serial, signature, issuer, validity
# SEQUENCE { notBefore, notAfter }, subject, subjectPublicKeyInfo SEQUENCE { algorithm
# SEQUENCE { OID, parameters }, BIT STRING }, ... }, ... } (RFC 5280)
def _leaf_certificate(pem: str) -> tuple[datetime.datetime, datetime.datetime, str, str | int] | None:
    """(notBefore, notAfter, key algorithm OID, its curve OID (EC) or modulus bits (RSA)) of the
    first certificate of a PEM chain, or None when it does not parse."""
    m = _PEM_CERT.search(pem)
    if m is None:
        return None
    try:
        der = base64.b64decode("".join(m.group(1).split()), validate=True)
        tbs = _elements(der, *_elements(der, 0, len(der))[0][1:])[0]
        items = _elements(der, tbs[1], tbs[2])
        items = items[1:] if items[0][0] == 0xA0 else items  # (the optional version)
        not_before, not_after = (_time(der, *t) for t in _elements(der, *items[3][1:]))
        algorithm_id, public_key = _elements(der, *items[5][1:])
        oid, *params = _elements(der, *algorithm_id[1:])
        algorithm = _oid(der[oid[1] : oid[2]])
        detail: str | int = ""
        if algorithm == _EC and params and params[0][0] == 0x06:  # a named curve
            detail = _oid(der[params[0][1] : params[0][2]])
        elif algorithm == _RSA:  # BIT STRING (past its unused-bits byte) of RSAPublicKey { n, e }
            rsa_key = _elements(der, public_key[1] + 1, public_key[2])[0]
            modulus = _elements(der, *rsa_key[1:])[0]
            detail = int.from_bytes(der[modulus[1] : modulus[2]], "big").bit_length()
        return not_before, not_after, algorithm, detail
    except (IndexError, ValueError):  # (binascii.Error, a short or malformed DER)
        return None


def _elements(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """The DER elements in der[start:end]: (tag, start, end of their contents)."""
    out = []
    while start < end:
        tag, n, i = der[start], der[start + 1], start + 2
        if n & 0x80:  # long form: the next n & 0x7f bytes hold the length
            n, i = int.from_bytes(der[i : i + (n & 0x7F)], "big"), i + (n & 0x7F)
        if i + n > end:
            raise ValueError("truncated DER")
        out.append((tag, i, i + n))
        start = i + n
    return out


def _time(der: bytes, tag: int, start: int, end: int) -> datetime.datetime:
    """A UTCTime (0x17, YYMMDDHHMMSSZ, 1950-2049) or GeneralizedTime (YYYYMMDDHHMMSSZ)."""
    text = der[start:end].decode("ascii")
    if tag == 0x17:
        text = ("19" if text[:2] >= "50" else "20") + text
    return datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.timezone.utc)


def _oid(body: bytes) -> str:
    """An OBJECT IDENTIFIER's contents, dotted: base-128 numbers, the first holding two."""
    numbers, n = [], 0
    for byte in body:
        n = n << 7 | byte & 0x7F
        if not byte & 0x80:
            numbers.append(n)
            n = 0
    first = min(numbers[0] // 40, 2)
    return ".".join(map(str, [first, numbers[0] - 40 * first, *numbers[1:]]))


def host_port(host: str, port: int | None) -> str:
    """host:port as gRPC targets, URLs and the logs write it: an IPv6 host in brackets
    ([::1]:8080), given with or without them."""
    return f"[{host.strip('[]')}]:{port}" if ":" in host else f"{host}:{port}"


def bind_tcp(host: str, port: int, what: str) -> socket.socket:
    """A TCP socket bound to host:port (IPv4 or IPv6, "[::1]" as "::1", "" as every address;
    port 0: a free one), or an OSError "cannot bind <what> on host:port: reason"."""
    try:
        # without brackets: getaddrinfo knows no "[::1]", which grpc_host accepts (an audit)
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError:
            sock.close()
            raise
    except OSError as e:
        raise OSError(f"cannot bind {what} on {host_port(host, port)}: {e.strerror or e}") from e
    return sock


def field_help(name: str) -> str:
    return str(_FIELDS[name].metadata.get("help", ""))


def field_names() -> list[str]:
    return [f.name for f in fields(Settings)]
