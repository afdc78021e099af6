"""`softgate demo`: a tiny policy trained with every loss and gradient from softgate over gRPC
learns (the evaluation reward after training is clearly above the untrained policy's)."""

from __future__ import annotations

import csv
import errno
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

from softgate.demo import main
from softgate.demo.runs import DEFAULT_RUNS, parse_run
from softgate.demo.task import EOS, DigitSumTask
from softgate.engine.config import OBJECTIVES


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_task_reward_is_graded_and_verifiable():
    task = DigitSumTask(max_target=27, max_len=5, reward_scale=5.0)
    targets = torch.tensor([7, 7, 7, 0])
    tokens = torch.tensor(
        [
            [3, 4, EOS, EOS, EOS],  # 3 + 4 = 7: exact
            [9, 9, 9, 9, 9],  # 45: far off, cut at max_len
            [3, 3, EOS, 9, 9],  # 6: off by one (tokens after EOS do not count)
            [EOS, EOS, EOS, EOS, EOS],  # empty answer sums to 0: exact
        ]
    )
    lengths = torch.tensor([3, 5, 3, 1])
    reward, hit = task.rewards(targets, tokens, lengths)
    assert reward.tolist() == pytest.approx([1.0, 0.0, 0.8, 1.0])
    assert hit.tolist() == [True, False, False, True]


def test_parse_run():
    assert parse_run("sapo").params == {"tau_pos": 1.0, "tau_neg": 1.05}
    spec = parse_run("sapo(tau_pos=1.05, tau_neg=1.0)")
    assert spec.params == {"tau_pos": 1.05, "tau_neg": 1.0}
    assert spec.label == "sapo tau+=1.05 tau-=1"
    assert parse_run("grpo(eps_high=0.28)").params == {"eps_low": 0.2, "eps_high": 0.28}
    with pytest.raises(ValueError):
        parse_run("sapo(tau_pos)")
    cispo = parse_run("cispo")  # no demo default: the engine's
    assert cispo.params == {"eps_low": 1.0, "eps_high": 0.28}
    assert (cispo.label, cispo.key) == ("cispo eps=1/0.28", "cispo_el1_eh0.28")
    assert parse_run("grpo(dual_clip=3)").label == "grpo eps=0.2/0.27 dual_clip=3"
    # clip_cov's seed: an integer (as a float, 12345678 and 12345679 shared one key), a new one
    # each call (the same seed drops the same positions of every batch of one layout)
    a, b = parse_run("clip_cov(seed=12345678)"), parse_run("clip_cov(seed=12345679)")
    assert a.params["seed"] == 12345678 and a.key != b.key and a.key.endswith("seed12345678")
    assert [a.call_params(i)["seed"] for i in range(3)] == [12345678, 12345679, 12345680]
    assert parse_run(f"clip_cov(seed={2**64 - 1})").call_params(1)["seed"] == 0
    assert parse_run("sapo").call_params(5) == parse_run("sapo").params
    with pytest.raises(ValueError, match="not an integer"):
        parse_run("clip_cov(seed=1.5)")


def test_near_identical_runs_are_two_rows(tmp_path, capsys):
    """Found by an audit: keys printed 6 significant digits, so grpo(eps_low=0.2) and
    grpo(eps_low=0.2000001) shared one key and were averaged into one row. The default run's
    keys are as they were (the committed outputs name them)."""
    assert [parse_run(r).key for r in DEFAULT_RUNS] == [
        "sapo_tp1_tn1.05",
        "grpo_el0.2_eh0.27",
        "gspo_el0.0003_eh0.0004",
        "reinforce",
        "sapo_tp1.05_tn1",
        "sapo_tp1_tn2",
        "sapo_tp2_tn1",
    ]
    near = parse_run("grpo(eps_low=0.2000001)")
    assert (near.key, near.label) == ("grpo_el0.2000001_eh0.27", "grpo eps=0.2000001/0.27")
    argv = ["--objectives", "grpo(eps_low=0.2)", "grpo(eps_low=0.2000001)", "--steps", "1", "--seeds", "1"]
    argv += ["--prompts-per-step", "4", "--minibatches", "2", "--in-process", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "demo-summary.json").read_text())["summary"]
    assert [(r["run"], r["seeds"]) for r in summary] == [
        ("grpo_el0.2_eh0.27", 1),
        ("grpo_el0.2000001_eh0.27", 1),
    ]


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_engine_objective_has_a_label(name):
    """Found by an audit: cispo, gppo and gspo_token had no demo defaults, and their label read
    eps_low: a KeyError after every run had trained. Their parameters are the engine's defaults."""
    spec = parse_run(name)
    assert spec.label.startswith(name) and spec.key.startswith(name)


# a one-step run, for a flag whose refusal, were it missing, would train (fast, to fail fast)
_TINY = ["--objectives", "sapo", "--steps", "1", "--seeds", "1", "--in-process", "--no-progress"]


@pytest.mark.parametrize(
    "flags, why",
    [
        (["--prompts-per-step", "6", "--minibatches", "4"], "multiple of --minibatches"),
        # these ran on (--steps -1: an empty report) or ended in a traceback (ZeroDivisionError,
        # torch's 'Invalid learning rate', float()'s 'could not convert string to float')
        (["--minibatches", "0"], "--minibatches must be at least 1, got 0"),
        (["--steps", "-1"], "--steps must be at least 1, got -1"),
        (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
        (["--seeds", "0"], "--seeds must be at least 1, got 0"),
        # (an audit: a ValueError and an allocator's RuntimeError traceback)
        (["--threads", "2147483648"], "--threads must be at most 1024, got 2147483648"),
        (["--hidden", "4097", *_TINY], "--hidden must be at most 4096, got 4097"),
        (["--lr", "1e38", *_TINY], "--lr must be at most 10, got 1e+38"),  # (an audit: Adam overflowed)
        # (an audit: allocated until the OOM killer ended it, without a word)
        (
            ["--group-size", "100000000", *_TINY],
            "--prompts-per-step x --group-size must be at most 65536 rollouts a step, got 16 x 100000000",
        ),
        (["--objectives", "sapo(tau_pos=x)"], "'x' is not a number"),
        # found by an audit: tracebacks (TypeError from the client or the engine, KeyError,
        # InputError), some only after the other runs had trained, and the seed's OverflowError
        (["--objectives", "sapo(tau=1)"], "sapo has no parameter 'tau'"),
        (["--in-process", "--objectives", "sapo", "foo"], "unknown objective 'foo'"),
        (["--in-process", "--objectives", "sapo(tau_pos=-1)"], "tau_pos: out_of_range: -1.0 must be > 0"),
        (["--objectives", "grpo(dual_clip=1)"], "dual_clip: out_of_range: 1.0 must be > 1"),
        ([*_TINY, "--objectives", "sapo(tau_pos=1,tau_pos=2)"], "sapo's parameter 'tau_pos' is given twice"),
        # found by an audit: a run given twice was one row of twice the seeds (seeds=4 for 2)
        (
            [*_TINY, "--objectives", "sapo", "grpo", "sapo(tau_pos=1.0)"],
            "--objectives: 'sapo(tau_pos=1.0)' is the same run as 'sapo' (sapo_tp1_tn1.05)",
        ),
        (["--seed", "99999999999999999999999"], "--seed must be between 0 and 4294967295"),
        (["--seed", "4294967295", "--seeds", "2"], "--seed must be between 0 and 4294967295"),
        (["--tls"], "--server-name-override need --target"),
        (["--client-cert", "c.pem", "--in-process"], "need --target"),
        # found by an audit: --target was ignored with --in-process; and a bad one waited out
        # the client's 60 s of retries (port 99999 dialled 34463, 99999 mod 65536)
        ([*_TINY, "--target", "h:1"], "--in-process calls the engine in this process"),
        *(
            (["--target", t], f"--target {t!r} is not host[:port] with a port in 1..65535")
            for t in ("", "localhost:abc", "256.1.1.1:5", "127.0.0.1:99999", "h:0", "[::1]:x")
        ),
    ],
)
def test_bad_flags_exit_2(tmp_path, capsys, flags, why):
    out = tmp_path / "out"
    assert main([*flags, "--out", str(out)]) == 2
    assert why in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


def test_target_forms_the_client_takes_are_accepted():
    from softgate.demo.cli import _check_target

    for t in (
        "localhost:50051",
        " 10.0.0.1:1 ",
        # without a port: the client's 50051 (a review: they were refused)
        "localhost",
        "10.0.0.1",
        "::1",
        "[::1]",
        "dns:///softgate",
        "[::1]:65535",
        "softgate-0.softgate.default.svc.cluster.local:50051",
        "dns:///softgate:50051",
        "dns:softgate:50051",
        "unix:/tmp/softgate.sock",
        "ipv4:127.0.0.1:50051",
    ):
        _check_target(t)


def test_out_naming_a_file_exits_2(tmp_path, capsys):
    """Found by an audit: a FileExistsError traceback."""
    (tmp_path / "f").touch()
    assert main(["--out", str(tmp_path / "f")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "f" / "sub")]) == 2
    assert "cannot create --out" in capsys.readouterr().err


def test_out_that_cannot_be_written_exits_2_before_training(tmp_path, capsys):
    """Found by an audit: an --out the results could not be written to (a folder where a file
    goes, /proc) was a traceback after every run had trained, the results lost."""
    (tmp_path / "demo-results.json").mkdir()
    assert main([*_TINY, "--out", str(tmp_path)]) == 2
    assert "demo-results.json there is not a file" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["demo-results.json"]
    if Path("/proc/self").is_dir():  # (Linux: no file can be created there, root or not)
        assert main([*_TINY, "--out", "/proc"]) == 2
        assert "softgate demo: cannot write to --out /proc" in capsys.readouterr().err
        assert main([*_TINY, "--out", "/proc/softgate-demo"]) == 2
        assert "cannot write to --out /proc/softgate-demo (/proc)" in capsys.readouterr().err


def test_results_that_fail_to_write_exit_1_with_the_table(tmp_path, capsys, monkeypatch):
    """Found by an audit: a write failing after training (a full disk) was a traceback, and
    the summary table, printed after the files, was lost with it."""
    import softgate.demo.report

    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(softgate.demo.report, "write_csv", full)
    assert main([*_TINY, "--out", str(tmp_path / "out")]) == 1
    out, err = capsys.readouterr()
    assert "sapo tau+=1 tau-=1.05" in out
    assert f"softgate demo: cannot write the results to --out {tmp_path / 'out'}: " in err
    assert "No space left on device" in err and "Traceback" not in err


def test_a_refused_tls_flag_leaves_no_out_folder(tmp_path, capsys):
    """Found by an audit: --out was created before the client, so a TLS file it refused
    (exit 2) left an empty folder."""
    out = tmp_path / "out"
    argv = ["--target", "127.0.0.1:1", "--root-certificates", str(tmp_path / "missing.pem")]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 2
    assert "missing.pem" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("missing", "flags"),
    [(("matplotlib",), ["--no-progress"]), (("tqdm",), []), (("matplotlib", "tqdm"), [])],
    ids=["matplotlib", "tqdm", "both"],
)
def test_without_the_demo_extra_exits_2_before_training(tmp_path, capsys, monkeypatch, missing, flags):
    """Found by an audit: without the [demo] extra the demo died on tqdm's import, or with
    --no-progress trained every run and then died on matplotlib's, with a traceback each time."""
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # find_spec and import then see no module
    out = tmp_path / "out"
    assert main(["--in-process", "--steps", "1", "--seeds", "1", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"needs {' and '.join(missing)}" in err and "pip install '.[demo]'" in err, err
    assert not out.exists()


@pytest.mark.parametrize("path", [["--in-process"], []], ids=["in-process", "grpc"])
def test_a_refused_batch_exits_1_without_a_traceback(tmp_path, capsys, monkeypatch, path):
    """Found by an audit: a diverging run (--lr 1e37: NaN log-probs) ended in the in-process
    engine's InputError traceback; over gRPC the same refusal was a clean exit 1."""
    import softgate.demo.train

    token_logp = softgate.demo.train.token_logp
    monkeypatch.setattr(softgate.demo.train, "token_logp", lambda *a: token_logp(*a) * math.nan)
    argv = ["--objectives", "sapo", "--steps", "1", "--seeds", "1", "--prompts-per-step", "4"]
    argv += ["--minibatches", "2", "--no-progress", *path, "--out", str(tmp_path / "out")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "softgate demo: the loss service failed: " in err and "logp[0]: non_finite" in err, err
    assert not (tmp_path / "out").exists()  # created only with the results


def test_cispo_runs_and_one_seed_prints_no_nan(tmp_path, capsys):
    """Found by an audit: --objectives cispo crashed in the report (its label), after training;
    with one seed the table printed the standard error as nan."""
    argv = ["--objectives", "cispo", "--steps", "2", "--prompts-per-step", "4", "--minibatches", "2"]
    assert main([*argv, "--seeds", "1", "--in-process", "--no-progress", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "cispo eps=1/0.28" in table and "nan" not in table
    data = json.loads((tmp_path / "demo-results.json").read_text())
    assert data["runs"][0]["run"] == "cispo_el1_eh0.28" and data["cpu"]
    # the closing line names every file written (demo-summary.json was left out; an audit)
    wrote = table.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        n.rstrip(",").rsplit("/", 1)[-1] for n in wrote.partition("wrote ")[2].split()
    )


def test_sapo_over_grpc_learns(tmp_path):
    """SAPO through the real gRPC path (an in-process server on a free port): the evaluation
    reward on fixed prompts rises well above the untrained policy's (same seed, same prompts)."""
    out = tmp_path / "demo"
    # lr 3e-3 (the default is 1e-2): at 30 steps it lifts every seed tried (0-4) by 0.2-0.3
    argv = ["--objectives", "sapo", "--steps", "30", "--lr", "3e-3", "--seeds", "1", "--seed", "0"]
    rc = main([*argv, "--no-progress", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "demo-results.json").read_text())
    assert data["backend"].startswith("in-process softgate gRPC server")
    (run,) = data["runs"]
    before, after = run["eval_before"]["reward"], run["eval_after"]["reward"]
    assert after > before + 0.15, (before, after)
    curves = run["curves"]
    assert len(curves["reward"]) == 30
    # the service's trust-region metrics came back and are meaningful (null: a step whose
    # mini-batches had no learning signal, every group degenerate)
    assert sum(g is not None for g in curves["grad_retained"]) >= 20
    assert all(0.0 < g <= 1.0 + 1e-6 for g in curves["grad_retained"] if g is not None)
    assert all(math.isfinite(k) for k in curves["approx_kl"])
    assert all(0.0 <= s <= 1.0 for s in curves["trust_region"] if s is not None)
    # figure, CSV, summary
    assert (out / "demo.png").stat().st_size > 10_000
    with (out / "demo-results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30 and rows[0]["run"] == "sapo_tp1_tn1.05"
    assert data["summary"][0]["eval_reward_after"] == pytest.approx(after, abs=1e-4)
    assert data["summary"][0]["eval_reward_after_by_seed"] == {"0": pytest.approx(after, abs=1e-4)}
    assert data["torch"] == torch.__version__ and data["cpu_capability"]
    summary = json.loads((out / "demo-summary.json").read_text())
    assert "runs" not in summary and summary["summary"] == data["summary"]


def test_every_run_has_its_own_figure_style():
    """Found by an audit: each objective's second run, and the first of an objective without a
    style of its own, all took the same colour and dash. The default run's are as they were."""
    from softgate.demo.report import _ABLATION, _styles

    styles = _styles([parse_run(r) for r in DEFAULT_RUNS])
    assert list(styles.values()) == [
        ("tab:blue", "-"),
        ("tab:orange", "-"),
        ("tab:green", "-"),
        ("tab:gray", "-"),
        ("tab:purple", "--"),
        ("tab:red", ":"),
        ("tab:brown", "-."),
    ]
    runs = ["sapo", "grpo", "grpo(eps_low=0.1)", "gspo(eps_low=1e-4)", "cispo", "dro", "gmpo"]
    styles = _styles([parse_run(r) for r in [*runs, *DEFAULT_RUNS[4:]]])
    assert len(styles) == 10 and len(set(styles.values())) == 10
    assert len(set(_ABLATION)) == len(_ABLATION)


def test_trust_region_metrics_leave_out_mini_batches_without_signal():
    """Found by an audit: a mini-batch whose groups are all degenerate (no advantage) carries
    the engine's stand-ins, grad_retained 1 and saturation 0, and those pulled SAPO's averages
    (a quarter to three quarters of its mini-batches) towards "keeps everything"."""
    from softgate.demo.backends import curve_metrics
    from softgate.demo.report import _standard_error

    m = {"gate_saturation_pos": 0.0, "gate_saturation_neg": 0.0, "grad_retained": 1.0, "approx_kl": 0.01}
    none = curve_metrics("sapo", {**m, "tokens_pos": 0, "tokens_neg": 0})
    assert math.isnan(none["trust_region"]) and math.isnan(none["grad_retained"])
    some = curve_metrics("sapo", {**m, "tokens_pos": 3, "tokens_neg": 1, "gate_saturation_neg": 1.0})
    assert some["trust_region"] == 0.25 and some["grad_retained"] == 1.0
    assert _standard_error([0.5, 0.7, 0.9]) == pytest.approx(0.2 / math.sqrt(3))


def test_grpc_and_in_process_engine_agree(tmp_path):
    """The same seed gives the same curves whether the losses come over gRPC or from the engine
    in this process: the service adds transport, not arithmetic."""
    curves = {}
    for name, extra in (("grpc", []), ("engine", ["--in-process"])):
        out = tmp_path / name
        argv = [
            "--objectives",
            "grpo",
            "gspo",
            "--steps",
            "3",
            "--seeds",
            "1",
            "--no-progress",
            "--out",
            str(out),
        ]
        argv += extra
        assert main(argv) == 0
        data = json.loads((out / "demo-results.json").read_text())
        curves[name] = [r["curves"] for r in data["runs"]]
    for a, b in zip(curves["grpc"], curves["engine"], strict=True):
        for key in ("reward", "loss", "grad_retained", "approx_kl", "trust_region"):
            assert [x is None for x in a[key]] == [x is None for x in b[key]], key
            got, want = ([x for x in c[key] if x is not None] for c in (a, b))
            assert got == pytest.approx(want, rel=1e-5, abs=1e-7), key


def test_demo_reaches_a_mutual_tls_target(tmp_path, capsys, certs):
    """Found by an audit: the demo had no TLS flags, so a TLS server refused it (`Socket closed`)."""
    import grpc
    from test_client_harness import ServerThread

    key = tmp_path / "client.key"
    cert = tmp_path / "client.pem"
    key.write_bytes(certs.client_key_pem)
    cert.write_bytes(certs.client_cert_pem)
    creds = grpc.ssl_server_credentials(
        [(certs.server_key_pem, certs.server_cert_pem)],
        root_certificates=certs.ca_pem,
        require_client_auth=True,
    )
    argv = ["--objectives", "sapo", "--steps", "1", "--prompts-per-step", "4", "--minibatches", "2"]
    argv += ["--seeds", "1", "--no-progress", "--root-certificates", str(certs.ca_file)]
    with ServerThread(server_credentials=creds) as s:
        mtls = ["--target", f"localhost:{s.port}", "--client-cert", str(cert), "--client-key", str(key)]
        assert main([*argv, *mtls, "--out", str(tmp_path / "ok")]) == 0
        data = json.loads((tmp_path / "ok" / "demo-results.json").read_text())
        assert data["backend"] == "softgate" and len(data["runs"][0]["curves"]["reward"]) == 1
        # a key that is not the certificate's: refused by name before any call, exit 2
        key.write_bytes(certs.other_client_key_pem)
        assert main([*argv, *mtls, "--out", str(tmp_path / "bad")]) == 2
        assert "softgate demo: client_key: not the private key of client_cert" in capsys.readouterr().err
