"""Bad input through the real command line: the exit code, one stderr line naming the file or key,
no traceback, nothing half-written (docs/errors.md is the contract these tests hold the CLI to).

Most cases run ``python -m conditune`` in a subprocess, exactly as a user would; the many ``select``
cases (each would import torch again) run ``conditune.cli.main`` in-process: the same code path and
the same exit code, which ``python -m conditune`` passes to ``sys.exit``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conditune.cli import main

USER_ERROR, CHECK_FAILED, INTERRUPTED = 1, 2, 130
LAYER = "model.layers.{i}.mlp.up_proj.weight"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def conditune(*args, env: dict | None = None, timeout: float = 120, **kwargs) -> Result:
    """``python -m conditune ARGS`` as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "conditune", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        **kwargs,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def in_process(capsys, *args) -> Result:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return Result(code, out, err)


def assert_one_line(result: Result, code: int, *needles: str) -> str:
    """Exit ``code``, no traceback anywhere, and stderr exactly one line holding every needle."""
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


def assert_nothing_half_written(folder: Path) -> None:
    leftovers = [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".conditune-probe")]
    assert not leftovers, leftovers


@pytest.fixture(autouse=True)
def _private_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDITUNE_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 3-matrix safetensors checkpoint (plus a 1-D norm): scans in well under a second."""
    folder = tmp_path_factory.mktemp("tiny")
    g = torch.Generator().manual_seed(0)
    tensors = {LAYER.format(i=i): torch.randn(24, 16, generator=g) for i in range(3)}
    tensors["model.norm.weight"] = torch.ones(16)
    save_file(tensors, folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def scan_csv(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scan") / "scan.csv"
    result = conditune("scan", tiny_model, "-o", out, "-q", "--no-cache")
    assert result.returncode == 0, result.stderr
    return out


# ---------------------------------------------------------------------------------------------- usage errors
# One mechanism (conditune.cli.base) for every command: one line, exit 1, on every typer version allowed.

USAGE = [
    (["scna"], ["no such command 'scna'", "'scan'"]),
    (["models", "lst"], ["no such command 'lst'", "'list'"]),
    (["data", "chek"], ["conditune data", "'check'"]),
    (["frobnicate"], ["no such command", "commands: scan"]),
    (["scan"], ["conditune scan", "source"]),
    (["scan", "x", "--bogus"], ["--bogus"]),
    (["select", "x.csv", "--count", "abc"], ["--count", "valid int"]),
    (["select", "x.csv", "--policy"], ["--policy"]),
    (["theory", "--seed", "abc"], ["--seed"]),
    (["data", "synth"], ["--output"]),
    (["data", "check"], ["manifests"]),
    (["models", "fetch", "--force", "--bogus"], ["--bogus"]),
    (["train"], ["conditune train"]),
    (["transcribe"], ["conditune transcribe"]),
    (["evaluate"], ["conditune evaluate"]),
    (["experiment"], ["conditune experiment"]),
    (["demo", "--minutes", "abc"], ["--minutes"]),
    (["--debug"], ["missing command"]),
]


@pytest.mark.parametrize("args,needles", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_error_is_one_line(args, needles):
    assert_one_line(conditune(*args), USER_ERROR, *needles)


@pytest.mark.parametrize("args", [[], ["data"], ["models"]], ids=["conditune", "data", "models"])
def test_no_subcommand_prints_help_and_fails(args):
    result = conditune(*args)
    assert result.returncode == USER_ERROR and result.stderr == ""
    assert "Usage" in result.stdout or "Commands" in result.stdout


@pytest.mark.parametrize("args", [["--help"], ["scan", "--help"], ["data", "check", "--help"]])
def test_help_exits_zero(args):
    result = conditune(*args)
    assert result.returncode == 0 and "Usage" in result.stdout and result.stderr == ""


# ---------------------------------------------------------------------------------------------- exit codes


def _manifest(folder: Path, lines: list[str], name: str = "m.jsonl", bom: bool = False) -> Path:
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    sf.write(folder / "a.wav", (0.1 * np.sin(np.arange(1600) / 5)).astype("float32"), 16000)
    path = folder / name
    path.write_text(("\ufeff" if bom else "") + "".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD_LINE = json.dumps({"audio": "a.wav", "text": "hello there"})


def test_data_check_every_line_bad_fails_the_check(tmp_path):
    path = _manifest(tmp_path, ["{not json", json.dumps({"audio": "a.wav"}), json.dumps({"text": "x"})])
    result = conditune("data", "check", path)
    assert_one_line(result, CHECK_FAILED, "failed", "3 problem")
    assert f"{path}:1:" in result.stdout and f"{path}:3:" in result.stdout


def test_data_check_good_manifest_passes(tmp_path):
    result = conditune("data", "check", _manifest(tmp_path, [GOOD_LINE]), "--decode")
    assert result.returncode == 0 and result.stderr == "" and "1 utterances" in result.stdout


def test_data_check_keeps_the_first_line_after_a_byte_order_mark(tmp_path):
    path = _manifest(tmp_path, [GOOD_LINE, json.dumps({"audio": "a.wav", "text": "second", "id": "b"})], bom=True)
    result = conditune("data", "check", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 utterances" in result.stdout


def test_data_check_empty_manifest_fails_the_check(tmp_path):
    assert_one_line(conditune("data", "check", _manifest(tmp_path, [])), CHECK_FAILED, "1 problem")


@pytest.mark.parametrize("kind", ["missing", "folder", "png"])
def test_data_check_unreadable_manifest_is_a_user_error(tmp_path, kind):
    path = tmp_path / "m.jsonl"
    if kind == "folder":
        path.mkdir()
    elif kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    assert_one_line(conditune("data", "check", path), USER_ERROR, str(path))


def test_theory_failed_check_exits_2(tmp_path):
    scan = tmp_path / "nan.csv"
    scan.write_text(
        "name,shape,numel,status,kappa,sigma_max,sigma_min,kappa_mp,kappa_norm\n"
        f"{LAYER.format(i=0)},64x32,2048,ok,nan,2.0,0.5,3.0,nan\n"
        f"{LAYER.format(i=1)},64x32,2048,ok,4.0,2.0,0.5,3.0,1.3\n"
    )
    result = conditune("theory", "--output", tmp_path / "out", "--scan", scan, timeout=300)
    assert_one_line(result, CHECK_FAILED, "failed", "Scan columns agree")
    assert "FAIL" in result.stdout and (tmp_path / "out" / "theory.md").is_file()


def test_exit_codes_survive_a_shell_chain(tmp_path):
    """`a && b` must stop when a fails (it did not: exit codes were dropped)."""
    path = _manifest(tmp_path, ["{bad"])
    marker = tmp_path / "ran"
    cmd = f"{sys.executable} -m conditune data check {path} >/dev/null 2>&1 && touch {marker}; echo $?"
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60).stdout
    assert not marker.exists() and out.strip() == str(CHECK_FAILED)  # the chain stopped, with check's status


@pytest.fixture
def slow_model(tmp_path) -> Path:
    """Eight 1500x1400 matrices: each takes a noticeable fraction of a second to scan."""
    g = torch.Generator().manual_seed(1)
    folder = tmp_path / "slow"
    folder.mkdir()
    save_file({LAYER.format(i=i): torch.randn(1500, 1400, generator=g) for i in range(8)}, folder / "model.safetensors")
    return folder


def _cache_lines(home: Path) -> list[str]:
    return (
        [line for p in (home / "scans").glob("*.jsonl") for line in p.read_text().splitlines()] if home.exists() else []
    )


def test_ctrl_c_during_scan_exits_130_and_resumes(tmp_path, slow_model):
    home, out = tmp_path / "home", tmp_path / "out" / "scan.csv"
    env = {**os.environ, "CONDITUNE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "conditune", "scan", str(slow_model), "-o", str(out), "-q", "--device", "cpu"]
    # A shell ignores SIGINT in what it starts in the background (`pytest &`), and children inherit that:
    # give the scan the disposition it has under a terminal's Ctrl-C.
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=restore)
    deadline = time.time() + 120
    while time.time() < deadline and not _cache_lines(home) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert_one_line(Result(proc.returncode, stdout, stderr), INTERRUPTED, "interrupted")
    assert not out.exists()  # no partial result
    assert_nothing_half_written(tmp_path)
    done = _cache_lines(home)
    assert 0 < len(done) < 8, "the scan should have been interrupted part-way"
    assert all(json.loads(line)["name"] for line in done)  # whole records only
    rerun = conditune("scan", slow_model, "-o", out, "-q", "--device", "cpu", env={"OMP_NUM_THREADS": "1"})
    assert rerun.returncode == 0 and rerun.stderr == ""
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert meta["reused_from_cache"] >= len(done) and meta["computed"] == 8 - meta["reused_from_cache"]


# ---------------------------------------------------------------------------------------------- output paths


def test_scan_output_is_a_folder(tmp_path, tiny_model):
    target = tmp_path / "out.csv"
    target.mkdir()
    assert_one_line(conditune("scan", tiny_model, "-o", target, "-q"), USER_ERROR, str(target), "folder")
    assert not list((tmp_path / "home").rglob("*.jsonl")), "refused before scanning"


def test_scan_output_parent_is_a_file(tmp_path, tiny_model):
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "sub" / "out.csv"
    assert_one_line(conditune("scan", tiny_model, "-o", target, "-q"), USER_ERROR, str(tmp_path / "afile"), "is a file")


def test_scan_plot_parent_is_a_file(tmp_path, tiny_model):
    (tmp_path / "afile").write_text("x")
    result = conditune("scan", tiny_model, "--plot", tmp_path / "afile" / "k.png", "-q", "--no-cache")
    assert_one_line(result, USER_ERROR, "afile")


def test_select_output_is_a_folder(tmp_path, scan_csv):
    target = tmp_path / "names.txt"
    target.mkdir()
    assert_one_line(conditune("select", scan_csv, "-n", "1", "-o", target), USER_ERROR, str(target), "folder")


def test_select_output_parent_is_a_file(tmp_path, scan_csv):
    (tmp_path / "afile").write_text("x")
    result = conditune("select", scan_csv, "-n", "1", "-o", tmp_path / "afile" / "names.txt")
    assert_one_line(result, USER_ERROR, "afile", "is a file")


def test_theory_output_is_a_file(tmp_path):
    (tmp_path / "report").write_text("x")
    assert_one_line(conditune("theory", "-o", tmp_path / "report"), USER_ERROR, "report", "is a file")


def test_synth_output_is_a_file(tmp_path):
    (tmp_path / "data").write_text("x")
    result = conditune("data", "synth", "-o", tmp_path / "data", "--no-progress")
    assert_one_line(result, USER_ERROR, str(tmp_path / "data"), "is a file")


def test_conditune_home_is_a_file(tmp_path, tiny_model):
    home = tmp_path / "homefile"
    home.write_text("x")
    env = {"CONDITUNE_HOME": str(home)}
    assert_one_line(conditune("scan", tiny_model, "-q", env=env), USER_ERROR, str(home), "CONDITUNE_HOME")
    assert_one_line(conditune("models", "list", env=env), USER_ERROR, str(home), "CONDITUNE_HOME")
    assert conditune("scan", tiny_model, "-q", "--no-cache", env=env).returncode == 0  # no cache needed: runs


def _limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes beyond it fail with EFBIG

    return apply


def test_output_too_large_for_the_disk_is_one_line(tmp_path, tiny_model):
    out = tmp_path / "out" / "scan.json"
    result = conditune("scan", tiny_model, "-o", out, "-q", "--no-cache", preexec_fn=_limit_file_size(2000))
    assert_one_line(result, USER_ERROR, str(out), "too large")
    assert not out.exists()
    assert_nothing_half_written(tmp_path)


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs filled to the last byte (needs root: mount); skipped where it cannot be mounted."""
    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:  # ENOSPC: full
            pass
        finally:
            os.close(fd)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_one_line_and_leaves_nothing(full_disk, scan_csv):
    out = full_disk / "names.json"
    result = conditune("select", scan_csv, "-n", "2", "-o", out)
    assert_one_line(result, USER_ERROR, str(out), "no space left")
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no one may write to: a read-only tmpfs for root (who ignores permissions), else chmod."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)]).returncode:
            pytest.skip("root, but cannot mount a read-only tmpfs")
        try:
            yield folder
        finally:
            subprocess.run(["umount", "-l", str(folder)], check=False)
    else:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)


def test_read_only_output_folder_refused_before_work(read_only_folder, scan_csv, tiny_model):
    out = read_only_folder / "names.txt"
    assert_one_line(conditune("select", scan_csv, "-n", "1", "-o", out), USER_ERROR, str(out), "does not accept")
    result = conditune("scan", tiny_model, "-o", read_only_folder / "s.csv", "-q")
    assert_one_line(result, USER_ERROR, "does not accept")
    assert not list((Path(os.environ["CONDITUNE_HOME"])).rglob("*.jsonl")), "refused before scanning"


# ---------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--device", "bogus"], ["--device", "bogus"]),
        (["--device", "cpu:x"], ["--device"]),
        (["--spectrum", "all"], ["--spectrum", "fast, full"]),
        (["--include", "("], ["--include"]),
        (["-o", "x.txt"], ["unknown output format"]),
        (["--plot", "k.jpg"], ["--plot", "png"]),
    ],
    ids=["device", "device-index", "spectrum", "include", "format", "plot"],
)
def test_scan_values_checked_before_work(tmp_path, tiny_model, args, needles):
    assert_one_line(conditune("scan", tiny_model, *args, cwd=tmp_path), USER_ERROR, *needles)
    assert not list(tmp_path.rglob("*.jsonl")), "nothing scanned, nothing cached"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_scan_cuda_without_a_gpu(tiny_model):
    assert_one_line(conditune("scan", tiny_model, "--device", "cuda", "-q"), USER_ERROR, "--device", "no CUDA")


def test_scan_meta_never_records_a_bogus_device(tmp_path, tiny_model):
    out = tmp_path / "s.json"
    assert conditune("scan", tiny_model, "-o", out, "-q").returncode == 0
    assert conditune("scan", tiny_model, "-o", out, "-q", "--device", "bogus").returncode == USER_ERROR
    assert json.loads(out.read_text())["meta"]["device"] == "cpu"


@pytest.mark.parametrize(
    "args,needles",
    [
        (["-n", "0"], ["--count"]),
        (["--budget", "2"], ["--budget"]),
        (["--budget", "nan"], ["--budget"]),
        (["--params", "-5"], ["parameter count"]),
        (["--policy", "best"], ["unknown policy"]),
        (["-n", "1", "--format", "xml"], ["xml"]),
    ],
    ids=["count0", "budget2", "budget-nan", "params-neg", "policy", "format"],
)
def test_select_values(scan_csv, capsys, args, needles):
    assert_one_line(in_process(capsys, "select", scan_csv, *args), USER_ERROR, *needles)


def test_select_count_beyond_the_tensors_warns(scan_csv):
    result = conditune("select", scan_csv, "-n", "1000")
    assert result.returncode == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --count 1000 is more than the 3 candidate tensors: all 3 are selected"]
    assert len([line for line in result.stdout.splitlines() if not line.startswith("#")]) == 3


@pytest.mark.parametrize("seed", ["-1", "2.5"])
def test_theory_seed(tmp_path, seed):
    assert_one_line(conditune("theory", "-o", tmp_path / "t", "--seed", seed), USER_ERROR, "--seed")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    "args,key",
    [
        (["--jobs", "0"], "--jobs"),
        (["--count-train", "-1"], "--count-train"),
        (["--heldout-count", "-3"], "--heldout-count"),
        (["--min-words", "0"], "--min-words"),
        (["--min-words", "6", "--max-words", "3"], "--max-words"),
        (["--vocab-size", "0"], "--vocab-size"),
        (["--seed", "-2"], "--seed"),
        (["--languages", " , "], "--languages"),
    ],
    ids=["jobs", "count-train", "heldout", "min-words", "max-words", "vocab", "seed", "languages"],
)
def test_synth_values(tmp_path, args, key):
    result = conditune("data", "synth", "-o", tmp_path / "d", "--no-progress", *args)
    assert_one_line(result, USER_ERROR, key)
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------------------------- scan files


BAD_SCANS = {
    "kappa-not-a-number.csv": (
        "name,shape,numel,status,kappa\nw1,4x4,16,ok,3.0\nw2,4x4,16,ok,abc\n",
        ["line 3", "'kappa'", "abc"],
    ),
    "kappa-negative.csv": ("name,shape,numel,status,kappa\nw1,4x4,16,ok,-3.0\n", ["line 2", "'kappa'", "below 1"]),
    "numel-negative.csv": ("name,shape,numel,status,kappa\nw1,4x4,-16,ok,3.0\n", ["line 2", "'numel'", "negative"]),
    "bad-shape.csv": ("name,shape,numel,status,kappa\nw1,4y4,16,ok,3.0\n", ["line 2", "'shape'"]),
    "no-name.csv": ("shape,numel,kappa\n4x4,16,3.0\n", ["line 2", "name"]),
    "ints.json": ("[1, 2, 3]", ["record 1", "not a record"]),
    "object.json": ('{"x": 1}', ["not a scan file"]),
    "number.json": ("42", ["not a scan file"]),
    "broken.json": ('{"records": [', ["cannot read scan file"]),
    "kappa-string.json": ('{"records": [{"name": "w", "kappa": "high"}]}', ["record 1", "'kappa'"]),
    "png.csv": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["png image"]),
    "garbage.parquet": (b"PAR1 not really", ["cannot read scan file"]),
    "image.png": (b"\x89PNG\r\n", ["unknown"]),
}


@pytest.mark.parametrize("name", list(BAD_SCANS))
def test_bad_scan_file_for_select(tmp_path, capsys, name):
    content, needles = BAD_SCANS[name]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_one_line(in_process(capsys, "select", path, "-n", "1"), USER_ERROR, str(path), *needles)


@pytest.mark.parametrize("name", ["kappa-not-a-number.csv", "ints.json", "png.csv"])
def test_bad_scan_file_for_theory_refused_before_the_checks(tmp_path, name):
    content, needles = BAD_SCANS[name]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = conditune("theory", "-o", tmp_path / "t", "--scan", path)
    assert_one_line(result, USER_ERROR, str(path), *needles)
    assert not (tmp_path / "t").exists()


def test_scan_file_that_is_a_folder_or_missing(tmp_path):
    folder = tmp_path / "scan.csv"
    folder.mkdir()
    assert_one_line(conditune("select", folder), USER_ERROR, str(folder), "folder")
    assert_one_line(conditune("theory", "--scan", tmp_path / "nope.csv"), USER_ERROR, "nope.csv", "not found")


def test_damaged_csv_metadata_names_the_meta_file(tmp_path, scan_csv):
    copy = tmp_path / "scan.csv"
    shutil.copy(scan_csv, copy)
    (tmp_path / "scan.csv.meta.json").write_text("{half")
    assert_one_line(conditune("select", copy, "-n", "1"), USER_ERROR, "scan.csv.meta.json")


# ---------------------------------------------------------------------------------------------- scan cache


def _rescan(capsys, model: Path, out: Path) -> tuple[Result, dict]:
    result = in_process(capsys, "scan", model, "-o", out, "-q")
    data = json.loads(out.read_text())
    for row in data["records"]:
        row.pop("seconds")  # timings differ between runs; every other column must not
    return result, data


@pytest.mark.parametrize(
    "damage",
    ['{"name": "x", "kappa": "not a number"}', "[1, 2, 3]", "\x00\x00garbage", '{"name": "', '"just a string"'],
    ids=["bad-value", "json-list", "binary", "torn", "json-string"],
)
def test_damaged_cache_line_is_skipped_counted_and_rescanned(tmp_path, tiny_model, capsys, damage):
    out = tmp_path / "s.json"
    first, fresh = _rescan(capsys, tiny_model, out)
    assert first.returncode == 0
    (cache,) = (tmp_path / "home" / "scans").glob("*.jsonl")
    lines = cache.read_text().splitlines()
    lines[1] = damage
    cache.write_text("\n".join(lines) + "\n")
    again, data = _rescan(capsys, tiny_model, out)
    assert_one_line(again, 0, "skipped 1 damaged line", str(cache), "line 2")
    assert data["meta"]["computed"] == 1 and data["records"] == fresh["records"]
    third, data = _rescan(capsys, tiny_model, out)  # the cache keeps working for every later scan
    assert third.returncode == 0 and data["meta"]["computed"] == 0 and data["records"] == fresh["records"]


# ---------------------------------------------------------------------------------------------- quiet output


def test_scan_writes_nothing_but_results_to_stdout_and_no_warnings(tmp_path):
    from fixtures import write_tiny_gguf

    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf)
    result = conditune("scan", gguf, "-o", tmp_path / "s.csv", "--no-cache")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # the progress bar and the summary are on stderr
    assert "Warning" not in result.stderr and "it/s" not in result.stderr
    assert "records" in result.stderr  # the summary


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "ints.json"
    path.write_text("[1]")
    result = conditune("--debug", "select", path)
    assert result.returncode != 0 and "Traceback" in result.stderr and "CondituneError" in result.stderr


# ---------------------------------------------------------------------------------------------- demo models


def _fake_install(home: Path, name: str, *, cut: int | None = None, drop: bool = False) -> Path:
    """Lay out an installed demo model with files of the pinned sizes (zeros), then damage it."""
    from conditune import models

    folder = home / "models" / name
    folder.mkdir(parents=True)
    for f in models.DEMO_MODELS[name].files:
        with open(folder / f.name, "wb") as handle:
            handle.truncate(f.size)
    (folder / ".complete").write_text("")
    first = folder / models.DEMO_MODELS[name].files[0].name
    if cut is not None:
        with open(first, "r+b") as handle:
            handle.truncate(cut)
    if drop:
        first.unlink()
    return folder


def test_models_list_tells_damaged_and_incomplete_from_installed(tmp_path):
    home = tmp_path / "home"
    _fake_install(home, "smollm2", cut=1000)
    _fake_install(home, "whisper-base", drop=True)
    result = conditune("models", "list")
    assert result.returncode == 0, result.stderr
    states = {line.split("\t")[0]: line.split("\t")[1] for line in result.stdout.splitlines()}
    assert states["smollm2"].startswith("damaged (SmolLM2-135M-Instruct.Q4_1.gguf: 1000 of")
    assert states["whisper-base"] == "incomplete (model.bin missing)"
    shutil.rmtree(home / "models")
    _fake_install(home, "smollm2")
    assert conditune("models", "list").stdout.split("\t")[1] == "installed"
