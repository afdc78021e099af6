"""``softgate demo``: train a tiny policy with SAPO, GRPO and GSPO, every loss and gradient
from a running softgate (an in-process server on a free loopback port unless ``--target``)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import ipaddress
import platform
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from softgate_client._channel import normalise_target
from softgate_client.errors import SoftgateError

from softgate.demo.backends import LossBackend
from softgate.demo.runs import DEFAULT_RUNS, RunSpec, parse_runs
from softgate.demo.task import DigitSumTask
from softgate.demo.train import RunResult, TrainConfig, check_counts, check_seeds, train
from softgate.engine.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="softgate demo",
        description=(
            "End-to-end RL example: a tiny GRU policy learns to write digit strings whose digit "
            "sum hits a target, trained with group sampling and several mini-batch updates per "
            "rollout batch; every loss and per-token gradient comes from softgate over gRPC."
        ),
    )
    p.add_argument("--steps", type=int, default=150, help="rollout batches per run (default 150)")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt, G (default 8)")
    p.add_argument("--prompts-per-step", type=int, default=16, help="prompts per rollout batch (default 16)")
    p.add_argument(
        "--minibatches",
        type=int,
        default=4,
        help="optimiser steps per rollout batch, first on-policy (default 4)",
    )
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate, at most 10 (default 1e-2)")
    p.add_argument("--hidden", type=int, default=64, help="GRU width, at most 4096 (default 64)")
    p.add_argument("--seed", type=int, default=0, help="first seed; every run starts from the same weights")
    p.add_argument("--seeds", type=int, default=3, help="seeds per run: seed, seed+1, ... (default 3)")
    p.add_argument(
        "--objectives",
        nargs="+",
        default=list(DEFAULT_RUNS),
        metavar="RUN",
        help="runs to compare: name or name(key=value,...), e.g. sapo grpo gspo "
        "'sapo(tau_pos=1.05,tau_neg=1.0)' 'grpo(eps_low=0.2,eps_high=0.28)' (default: %(default)s)",
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default ./demo-out)")
    p.add_argument(
        "--target",
        help="host:port of a running softgate (default: start one in-process); not with --in-process",
    )
    tls = p.add_argument_group("TLS to --target")
    tls.add_argument(
        "--tls",
        action="store_true",
        help="speak TLS (trusting the OS's CA bundle unless --root-certificates)",
    )
    tls.add_argument(
        "--root-certificates", metavar="PEM", help="CA certificates to trust (a PEM file); implies --tls"
    )
    tls.add_argument(
        "--client-cert", metavar="PEM", help="mutual TLS: the client's certificate chain (a PEM file)"
    )
    tls.add_argument(
        "--client-key", metavar="PEM", help="mutual TLS: its unencrypted private key (a PEM file)"
    )
    tls.add_argument(
        "--server-name-override",
        metavar="NAME",
        help="check the server's certificate against NAME, not the target's host",
    )
    p.add_argument("--in-process", action="store_true", help="call the engine directly, no gRPC")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, at most 1024 (default 1)")
    p.add_argument("--last-k", type=int, default=20, help="steps averaged for the summary (default 20)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


_TLS_FLAGS = ("tls", "root_certificates", "client_cert", "client_key", "server_name_override")


class _BadFlag(Exception):
    """A flag's value found unusable only when used (a TLS file the client refuses)."""


def _tls_options(args: argparse.Namespace) -> dict[str, Any]:
    """The SoftgateClient keywords of the TLS flags given (a ValueError without --target)."""
    given = {name: getattr(args, name) for name in _TLS_FLAGS if getattr(args, name)}
    if given and (args.target is None or args.in_process):
        raise ValueError(
            "--tls, --root-certificates, --client-cert, --client-key and --server-name-override need --target"
        )
    return given


_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")


def _check_target(target: str) -> None:
    """Refuse a --target that is not `host[:port]` (port 1..65535, 50051 when left out, as the
    client adds it; the host a name, an IPv4 address or an IPv6 one), `dns:` and one, or one of
    gRPC's own schemes as the client passes them (`unix:`, `unix-abstract:`, `ipv4:`, `ipv6:`);
    ValueError naming --target. (An audit: '', 'localhost:abc' and '256.1.1.1:5' each waited out
    the client's 60 s of retries, and port 99999 dialled 99999 mod 65536.)"""
    t = normalise_target(target)[0]  # (stripped, the default port added, as the client does)
    if t.startswith(("unix:", "unix-abstract:", "ipv4:", "ipv6:")):
        return
    if t.startswith("dns:"):  # dns:host:port, dns:///host:port or dns://authority/host:port
        t = t.rpartition("/")[2] if "/" in t else t[4:]
    host, _, port = t.rpartition(":")
    ok = re.fullmatch(r"[0-9]{1,5}", port) is not None and 1 <= int(port) <= 65535
    try:
        if host.startswith("[") and host.endswith("]"):
            ipaddress.IPv6Address(host[1:-1])
        elif host.replace(".", "").isdigit():  # dotted digits: an IPv4 address, not a name
            ipaddress.IPv4Address(host)
        else:
            ok = ok and _HOST_NAME.fullmatch(host) is not None
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"--target {target!r} is not host[:port] with a port in 1..65535 (nor [IPv6]:port, "
            "dns:host:port, unix:PATH, ipv4:..., ipv6:...)"
        )


@contextlib.contextmanager
def _backend(args: argparse.Namespace) -> Iterator[tuple[LossBackend, str]]:
    from softgate.demo.backends import EngineBackend, GrpcBackend
    from softgate.grpc.in_process import in_process_server

    with contextlib.ExitStack() as stack:
        backend: LossBackend
        if args.in_process:
            backend, where = EngineBackend(), "in-process engine"
        else:
            target = args.target
            where = f"softgate at {target}"
            if target is None:
                target = stack.enter_context(in_process_server(engine_workers=1))
                where = f"in-process softgate gRPC server at {target}"
            try:
                backend = GrpcBackend(target, **_tls_options(args))
            except (ValueError, OSError) as e:  # a TLS file missing, or refused by the client
                raise _BadFlag(str(e)) from None
        stack.callback(backend.close)
        yield backend, where


# the files the demo writes into --out
_OUTPUTS = ("demo-results.json", "demo-summary.json", "demo-results.csv", "demo.png")


def _check_out(out: Path) -> None:
    """Refuse an --out the results could not be written to, before anything trains (ValueError
    naming --out): a file, or a folder whose output names are folders, or one (or, not there yet,
    its nearest existing parent) where no file can be created. (An audit: these were tracebacks
    after every run had trained, the results lost.) Creates nothing: --out itself is created
    only when the results are written, so a refused flag or a failed run leaves no folder."""
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder")
        for name in _OUTPUTS:
            if (out / name).exists() and not (out / name).is_file():
                raise ValueError(f"--out {out}: {name} there is not a file, so cannot be written")
        parent = out
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise ValueError(f"cannot create --out {out}: {parent} is a file")
    except OSError as e:  # no permission to look
        raise ValueError(f"cannot create --out {out}: {e.strerror or e}") from None
    try:
        with tempfile.TemporaryFile(dir=parent):  # created and removed
            pass
    except OSError as e:
        where = "" if parent == out else f" ({parent})"  # (the parent checked in its stead)
        raise ValueError(f"cannot write to --out {out}{where}: {e.strerror or e}") from None


def _missing_extras(progress: bool) -> list[str]:
    """The [demo] extra's packages this run needs and cannot import (tqdm only for the progress bar)."""
    needed = ["matplotlib", "tqdm"] if progress else ["matplotlib"]
    return [name for name in needed if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # checked first: matplotlib is imported only for the figure, after every run has trained
    if missing := _missing_extras(not args.no_progress):
        print(
            f"softgate demo: needs {' and '.join(missing)} (the demo extra): "
            "pip install '.[demo]' in the softgate checkout",
            file=sys.stderr,
        )
        return 2
    base = TrainConfig(
        steps=args.steps,
        prompts_per_step=args.prompts_per_step,
        group_size=args.group_size,
        minibatches=args.minibatches,
        lr=args.lr,
        hidden=args.hidden,
        seed=args.seed,
        task=DigitSumTask(),
    )
    try:
        specs = parse_runs(args.objectives)  # checked as the engine checks them, none twice
        base.check()
        check_counts({"seeds": args.seeds, "threads": args.threads, "last-k": args.last_k})
        check_seeds(args.seed, args.seeds)
        if args.target is not None:
            if args.in_process:  # (an audit: --target was ignored)
                raise ValueError("--in-process calls the engine in this process: it takes no --target")
            _check_target(args.target)
        _tls_options(args)
        _check_out(args.out)
    except ValueError as e:
        print(f"softgate demo: {e}", file=sys.stderr)
        return 2
    seeds = [args.seed + i for i in range(args.seeds)]
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    try:
        results, where = _train_all(args, specs, seeds, base)
    except _BadFlag as e:
        print(f"softgate demo: {e}", file=sys.stderr)
        return 2
    # unreachable --target, a refused request, ...; InputError: the in-process engine's refusal
    # (a diverging run's NaN log-probs), which gRPC would have sent as a SoftgateError (an audit)
    except (SoftgateError, InputError) as e:
        print(f"softgate demo: the loss service failed: {e}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - t0
    try:
        _report(args, base, seeds, results, where, elapsed)
    except OSError as e:  # checked before training, but a disk fills, a folder goes, ...
        print(f"softgate demo: cannot write the results to --out {args.out}: {e}", file=sys.stderr)
        return 1
    return 0


def _train_all(
    args: argparse.Namespace, specs: list[RunSpec], seeds: list[int], base: TrainConfig
) -> tuple[list[RunResult], str]:
    results: list[RunResult] = []
    with _backend(args) as (backend, where):
        print(
            f"softgate demo: {len(specs)} runs x {len(seeds)} seed(s), {args.steps} steps, "
            f"{args.prompts_per_step} prompts x {args.group_size} samples, {args.minibatches} "
            f"mini-batches per step; losses from {where}",
            file=sys.stderr,
        )
        bar = None
        if not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(specs) * len(seeds) * args.steps, unit="step", dynamic_ncols=True)
        try:
            for spec in specs:
                for seed in seeds:
                    cfg = TrainConfig(**{**base.__dict__, "seed": seed})

                    def on_step(step: int, row: dict[str, float], _spec=spec, _seed=seed) -> None:
                        if bar is not None:
                            bar.set_description(f"{_spec.label} seed {_seed}", refresh=False)
                            bar.set_postfix(reward=f"{row['reward']:.3f}", refresh=False)
                            bar.update(1)

                    results.append(train(spec, cfg, backend, on_step))
        finally:
            if bar is not None:
                bar.close()
    return results, where


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine() or "unknown"


def _report(
    args: argparse.Namespace,
    base: TrainConfig,
    seeds: list[int],
    results: list[RunResult],
    where: str,
    elapsed: float,
) -> None:
    from softgate.demo import report

    rows = report.summarize(results, args.last_k)
    meta = {
        "backend": where.split(" at ")[0],
        "seeds": seeds,
        "seconds_total": round(elapsed, 1),
        # the trajectories are bit-exact for one torch build on one CPU model only: two CPUs
        # with the same capability string gave different curves (an audit)
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": _cpu_model(),
    }
    json_path, csv_path, png_path = (
        args.out / n for n in ("demo-results.json", "demo-results.csv", "demo.png")
    )
    # the table first: a write that fails below still leaves the summary on stdout
    print(report.format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)  # (only now: a failed run leaves no folder)
    report.write_json(json_path, base, meta, results, rows)
    report.write_csv(csv_path, results)
    title = (
        f"softgate demo: digit-sum task, {args.prompts_per_step}x{args.group_size} rollouts/step, "
        f"{args.minibatches} mini-batches/step, lr {args.lr:g}, "
        f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} (mean{', min-max band' if len(seeds) > 1 else ''})"
    )
    report.write_figure(png_path, results, title)
    summary_path = json_path.with_name("demo-summary.json")  # (written beside the results)
    print(f"\n{elapsed:.0f} s; wrote {png_path}, {json_path}, {summary_path}, {csv_path}")
