"""The allocator of `softgate serve`: tcmalloc by default through a one-time re-exec with
LD_PRELOAD, `system` to opt out, an allocator already preloaded kept as is."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import softgate.allocator as alloc
from softgate.allocator import (
    REEXEC_MARK,
    Decision,
    find_library,
    kind_of,
    loaded_allocator,
    mapped_allocators,
    maybe_reexec,
    plan,
)
from softgate.settings import Settings, SettingsError

TCMALLOC = find_library("tcmalloc")
needs_tcmalloc = pytest.mark.skipif(TCMALLOC is None, reason="libtcmalloc-minimal4 is not installed")


def _fake_libs(tmp: Path, *names: str) -> list[str]:
    for n in names:
        (tmp / n).write_bytes(b"")
    return [str(tmp)]


def test_kind_of_resolves_symlinks(tmp_path: Path) -> None:
    real = tmp_path / "libtcmalloc_minimal.so.4"
    real.write_bytes(b"")
    link = tmp_path / "libsoftgate-malloc.so"  # the container images' name
    link.symlink_to(real)
    assert kind_of(str(link)) == "tcmalloc"
    assert kind_of("/usr/lib/libjemalloc.so.2") == "jemalloc"
    assert kind_of("/usr/lib/libfoo.so") == "other"


def test_plan_auto_prefers_tcmalloc(tmp_path: Path) -> None:
    dirs = _fake_libs(tmp_path, "libtcmalloc_minimal.so.4", "libjemalloc.so.2")
    d = plan("auto", {"PATH": "/bin"}, loaded="glibc", dirs=dirs)
    assert d.target == "tcmalloc" and d.env is not None
    assert d.env["LD_PRELOAD"] == str(tmp_path / "libtcmalloc_minimal.so.4")
    assert d.env[REEXEC_MARK] == "1" and d.env["PATH"] == "/bin"
    assert "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD" in d.env  # no stderr reports breaking log lines
    assert d.env["TCMALLOC_RELEASE_RATE"] == "0"  # freed pages kept, not faulted in again
    own = plan("auto", {"TCMALLOC_RELEASE_RATE": "2"}, loaded="glibc", dirs=dirs)
    assert own.env is not None and own.env["TCMALLOC_RELEASE_RATE"] == "2"  # the operator's value wins
    jem = plan("jemalloc", {}, loaded="glibc", dirs=dirs)
    assert jem.env is not None and "TCMALLOC_RELEASE_RATE" not in jem.env
    assert plan(" tcmalloc ", {}, loaded="glibc", dirs=dirs).target == "tcmalloc"  # (read stripped)


def test_plan_auto_falls_back(tmp_path: Path) -> None:
    jem = _fake_libs(tmp_path, "libjemalloc.so.2")
    assert plan("auto", {}, loaded="glibc", dirs=jem).target == "jemalloc"
    empty = tmp_path / "empty"
    empty.mkdir()
    d = plan("auto", {}, loaded="glibc", dirs=[str(empty)])
    assert d.target == "glibc" and d.env is None and d.warning is None


def test_plan_keeps_a_preloaded_allocator(tmp_path: Path) -> None:
    dirs = _fake_libs(tmp_path, "libtcmalloc_minimal.so.4")
    for req in ("auto", "jemalloc"):
        d = plan(req, {"LD_PRELOAD": "/x/libjemalloc.so.2"}, loaded="jemalloc", dirs=dirs)
        if req == "auto":
            assert d.env is None and d.target == "jemalloc"
    # the allocator asked for, by name or by path, already loaded: no re-exec
    assert plan("tcmalloc", {}, loaded="tcmalloc", dirs=dirs).env is None
    assert plan(str(tmp_path / "libtcmalloc_minimal.so.4"), {}, loaded="tcmalloc", dirs=dirs).env is None
    d = plan("tcmalloc", {"LD_PRELOAD": "/x/libjemalloc.so.2 /x/libother.so"}, loaded="jemalloc", dirs=dirs)
    assert d.env is not None
    assert d.env["LD_PRELOAD"] == f"{tmp_path / 'libtcmalloc_minimal.so.4'} /x/libother.so"


def test_plan_system_removes_a_preloaded_allocator(tmp_path: Path) -> None:
    d = plan(
        "system", {"LD_PRELOAD": "/usr/local/lib/libsoftgate-malloc.so:/x/libother.so"}, loaded="tcmalloc"
    )
    assert d.target == "glibc" and d.env is not None
    assert d.env["LD_PRELOAD"] == "/x/libother.so"
    d = plan("system", {"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}, loaded="tcmalloc")
    assert d.env is not None and "LD_PRELOAD" not in d.env
    assert plan("system", {}, loaded="glibc").env is None
    # glibc is another name for system
    dirs = _fake_libs(tmp_path, "libtcmalloc_minimal.so.4")
    lib = str(tmp_path / "libtcmalloc_minimal.so.4")
    d = plan("glibc", {"LD_PRELOAD": lib}, loaded="tcmalloc", dirs=dirs)
    assert d.target == "glibc" and d.env is not None and "LD_PRELOAD" not in d.env


def test_plan_never_loops_and_reports_missing(tmp_path: Path) -> None:
    dirs = _fake_libs(tmp_path, "libtcmalloc_minimal.so.4")
    d = plan("tcmalloc", {REEXEC_MARK: "1"}, loaded="glibc", dirs=dirs)
    assert d.env is None and d.warning and "did not load" in d.warning
    empty = tmp_path / "empty"
    empty.mkdir()
    d = plan("tcmalloc", {}, loaded="glibc", dirs=[str(empty)])
    assert d.env is None and d.warning and "libtcmalloc-minimal4" in d.warning
    d = plan("jemalloc", {}, loaded="glibc", dirs=[str(empty)])
    assert d.env is None and d.warning and "libjemalloc2" in d.warning
    d = plan(str(tmp_path / "nope.so"), {}, loaded="glibc")
    assert d.env is None and d.warning == f"allocator: library {tmp_path / 'nope.so'} does not exist"
    # a directory passed the check and went into LD_PRELOAD, which ignored it (an audit)
    d = plan(str(tmp_path), {}, loaded="glibc")
    assert d.env is None and d.warning == f"allocator: library {tmp_path} is not a file"
    # system asked for, and the preloaded allocator still there after the re-exec: a warning
    d = plan("system", {REEXEC_MARK: "1"}, loaded="tcmalloc", dirs=dirs)
    assert d.env is None and d.warning and "still loaded" in d.warning


def test_a_path_mapped_beside_a_known_malloc_still_reexecs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: a malloc by path, preloaded after tcmalloc (which then serves malloc), was
    taken as running, logged allocator=other; it re-executes without tcmalloc instead."""
    lib = tmp_path / "libmymalloc.so"
    lib.write_bytes(b"\x7fELF")
    monkeypatch.setattr(alloc, "is_mapped", lambda path, maps_path="": True)
    assert plan(str(lib), {}, loaded="glibc").env is None  # (it alone: running)
    d = plan(str(lib), {"LD_PRELOAD": f"/x/libtcmalloc.so.4 {lib}"}, loaded="tcmalloc")
    assert d.env is not None and d.env["LD_PRELOAD"] == str(lib)


def test_maybe_reexec_takes_the_mark_out_of_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The re-executed process reports reexecuted and drops the mark (its children must not
    inherit it)."""
    monkeypatch.setenv(REEXEC_MARK, "1")
    monkeypatch.setattr(alloc, "plan", lambda req: Decision(req, "tcmalloc", "tcmalloc", None, None))
    d = maybe_reexec("auto")
    assert d.reexecuted is True and REEXEC_MARK not in os.environ


def test_mapped_allocators_reads_maps(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n"
        "7f02-7f03 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "7f04-7f05 rw-p 00000000 00:00 0 [heap]\n"
    )
    assert loaded_allocator(str(maps)) == "tcmalloc"
    assert mapped_allocators(str(maps)) == {
        "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10"
    }
    assert loaded_allocator(str(tmp_path / "absent")) == "glibc"


def test_setting_is_validated() -> None:
    assert Settings().allocator == "auto"
    assert Settings.load({}, env={"SOFTGATE_ALLOCATOR": "system"}).allocator == "system"
    assert Settings(allocator="/usr/lib/libjemalloc.so.2").allocator.endswith("jemalloc.so.2")
    with pytest.raises(SettingsError, match="allocator"):
        Settings(allocator="mimalloc")


# ---------------------------------------------------------------- a real `softgate serve`


def _allocator_event(logs: str) -> dict[str, str]:
    m = re.search(r"allocator allocator=(\S+) library=(\S+) requested=(\S+) reexecuted=(\S+)", logs)
    assert m, logs[-3000:]
    return {"allocator": m[1], "library": m[2], "requested": m[3], "reexecuted": m[4]}


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@needs_tcmalloc
def test_serve_runs_on_tcmalloc_by_default(serve_process: Any) -> None:
    env = {"LD_PRELOAD": ""}  # whatever the test runner has
    server = serve_process(admin_port=-1, env=env)
    ev = _allocator_event(server.logs())
    assert ev["allocator"] == "tcmalloc" and ev["requested"] == "auto" and ev["reexecuted"] == "true"
    assert "tcmalloc" in _maps(server.pid)  # really loaded, in the same process (same pid)


@needs_tcmalloc
def test_serve_allocator_system_opts_out(serve_process: Any) -> None:
    assert TCMALLOC is not None
    # even with tcmalloc preloaded by the environment (as in the container images)
    server = serve_process(admin_port=-1, allocator="system", env={"LD_PRELOAD": TCMALLOC})
    ev = _allocator_event(server.logs())
    assert ev["allocator"] == "glibc" and ev["requested"] == "system"
    assert "tcmalloc" not in _maps(server.pid)


@needs_tcmalloc
def test_serve_keeps_a_preloaded_tcmalloc(serve_process: Any) -> None:
    assert TCMALLOC is not None
    server = serve_process(admin_port=-1, env={"LD_PRELOAD": TCMALLOC})
    ev = _allocator_event(server.logs())
    assert ev["allocator"] == "tcmalloc" and ev["reexecuted"] == "false"


@needs_tcmalloc
def test_serve_runs_a_malloc_given_by_a_path_of_no_known_name(serve_process: Any, tmp_path: Path) -> None:
    """An audit: a malloc by path whose name is not tcmalloc's or jemalloc's (mimalloc, say)
    ran, but was logged as glibc with the warning "did not load"."""
    assert TCMALLOC is not None
    lib = tmp_path / "libmymalloc.so"
    shutil.copy(TCMALLOC, lib)
    server = serve_process(admin_port=-1, allocator=str(lib), env={"LD_PRELOAD": ""})
    ev = _allocator_event(server.logs())
    assert ev == {"allocator": "other", "library": str(lib), "requested": str(lib), "reexecuted": "true"}
    assert "did not load" not in server.logs() and str(lib) in _maps(server.pid)


def test_embedded_main_never_reexecs(monkeypatch: pytest.MonkeyPatch) -> None:
    """`main([...])` inside another process (tests, embedding) must not exec over it."""
    import softgate.serve as serve
    from softgate.cli import main

    seen: dict[str, Any] = {}
    monkeypatch.setattr(alloc.os, "execve", lambda *a: pytest.fail("re-executed an embedded main"))
    monkeypatch.setattr(serve, "run", lambda settings, allocator=None: seen.setdefault("d", allocator) and 0)
    monkeypatch.setenv("SOFTGATE_ALLOCATOR", "tcmalloc")
    main(["serve", "--grpc-port", "0", "--admin-port", "-1"])
    assert seen["d"].loaded == loaded_allocator() and seen["d"].env is None
    assert os.environ.get(REEXEC_MARK) is None
