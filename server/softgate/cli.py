"""The `softgate` command.

    softgate serve [--grpc-port 50051] [--admin-port 8080] [--config server.yaml] ...
    softgate demo ...      # the end-to-end RL example (softgate.demo)
    softgate health [--status-file F]   # exit 0 when the server of that status file answers
    softgate version

Every setting of `softgate.settings.Settings` is a `serve` flag (`--max-concurrent-rpcs 8`);
flags override `SOFTGATE_*` environment variables, which override the config file.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from dataclasses import fields

from softgate import __version__
from softgate.settings import Settings, SettingsError, field_help


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="run the gRPC loss server (and the admin HTTP API)",
        description="Run the softgate gRPC server. Flags override SOFTGATE_* environment variables, "
        "which override the --config file (YAML or TOML), which overrides the defaults.",
    )
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        tp = str(f.type)
        helptext = field_help(f.name)
        if f.name != "config":
            shown = "auto" if f.name == "compile" and f.default is None else f.default
            shown = str(shown).lower() if isinstance(shown, bool) else shown
            helptext += f" [default: {shown}; env SOFTGATE_{f.name.upper()}]"
        else:
            helptext += " [env SOFTGATE_CONFIG]"
        if tp.startswith("bool"):
            # `--warmup`, `--warmup false`, `--no-warmup` (`--compile auto` too): Settings coerces
            choices = "true|false|auto" if f.name == "compile" else "true|false"
            p.add_argument(flag, dest=f.name, nargs="?", const="true", metavar=choices, help=helptext)
            p.add_argument(
                "--no-" + flag[2:], dest=f.name, action="store_const", const="false", help=f"{flag} false"
            )
        else:
            p.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=helptext)
    return p


def _seconds(text: str) -> float:
    """A health check's --timeout: a finite number of seconds above 0 (0 timed out at once, a
    healthy server read as unhealthy; -1, nan and inf ended in a traceback; an audit)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds above 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="softgate", description="softgate: a gRPC loss service for LLM RL.")
    ap.add_argument("--version", action="version", version=f"softgate {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="{serve,demo,health,version}")
    _serve_parser(sub)
    sub.add_parser("demo", help="end-to-end RL demo (softgate demo --help)", add_help=False)
    health = sub.add_parser(
        "health",
        help="exit 0 when the server of a status file is alive (a container's health check)",
        description="Read the status file a `softgate serve --status-file F` writes, then ask its "
        "admin /healthz (with the admin server off: connect to its gRPC port). Exit 0 when it "
        "answers, else 1 with the reason.",
    )
    health.add_argument(
        "--status-file",
        default=os.environ.get("SOFTGATE_STATUS_FILE"),
        help="the server's status file [env SOFTGATE_STATUS_FILE]",
    )
    health.add_argument(
        "--timeout", type=_seconds, default=2.0, help="seconds to wait for an answer [default: 2]"
    )
    sub.add_parser("version", help="print the version")
    return ap


def load_settings(args: argparse.Namespace) -> Settings:
    flags = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    return Settings.load(flags)


def main(argv: list[str] | None = None) -> int:
    argv_given = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        try:
            from softgate.demo import main as demo_main
        except ImportError as e:
            print(f"softgate demo is not available: {e}", file=sys.stderr)
            return 2
        return int(demo_main(argv[1:]) or 0)
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command == "version":
        print(f"softgate {__version__}")
        return 0
    if args.command == "health":
        if not args.status_file:
            print("softgate health: no status file (--status-file, or SOFTGATE_STATUS_FILE)", file=sys.stderr)
            return 2
        from softgate.status import check

        if (problem := check(args.status_file, args.timeout)) is not None:
            print(f"softgate health: {problem}", file=sys.stderr)
            return 1
        return 0
    if args.command != "serve":
        ap.print_help()
        return 2
    try:
        return _serve(args, argv_given)
    except KeyboardInterrupt:  # Ctrl-C before serve's handlers are in (torch imports: seconds)
        print("softgate serve: interrupted", file=sys.stderr)
        return 130


def _end_on_signal_until_serving() -> None:
    """SIGTERM and SIGHUP end the process, exit 128 + the signal, until serve sets its own
    handlers (torch's imports: seconds). Their default action does so too, except in a
    container's PID 1, which the kernel spares default-action signals: a `docker stop` in the
    first seconds waited its 10 s for SIGKILL (an audit). An ignored one (nohup) stays so."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, lambda n, _frame: os._exit(128 + n))


def _serve(args: argparse.Namespace, argv_given: bool) -> int:
    """`softgate serve`: settings, the allocator, the host checks, then the server."""
    if not argv_given:  # (a real command line: an embedding caller's handlers are its own)
        _end_on_signal_until_serving()
    try:
        settings = load_settings(args)
    except SettingsError as e:
        print(f"softgate serve: {e}", file=sys.stderr)
        return 2
    # the allocator must be chosen before torch / grpc allocate: re-exec this command line with
    # LD_PRELOAD set (only for a real command line, never when embedded with an explicit argv)
    from softgate.allocator import Decision, loaded_allocator, maybe_reexec

    if argv_given:
        now = loaded_allocator()
        decision = Decision(settings.allocator, now, now, None, None)
    else:
        decision = maybe_reexec(settings.allocator)
    # the device and TLS files, once re-executed (the device check imports torch)
    if problems := settings.host_problems():
        print(f"softgate serve: {'; '.join(problems)}", file=sys.stderr)
        return 2
    from softgate.serve import run

    return run(settings, allocator=decision)


if __name__ == "__main__":
    sys.exit(main())
