"""Hostile and broken input files, through the real `orchestrator validate` command: each is one
line naming the file and what is wrong, exit code 2, no traceback, and no hang (the subprocess
timeout would fail the test long before a "billion laughs" file finished expanding)."""

from __future__ import annotations

import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.errors import UserError
from orchestrator.files import MAX_FILE_BYTES, read_json, read_yaml

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def _billion_laughs(levels: int = 12) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nname: laughs\nmodel: *a{levels - 1}\n"


HOSTILE: dict[str, tuple[bytes, str]] = {
    "binary": (bytes(range(256)) * 8, "not UTF-8 text (byte 128 is 0x80)"),
    "billion-laughs": (_billion_laughs().encode(), "expands to more than 100,000 values"),
    # an alias inside the collection it names: a list or mapping that holds itself (RecursionError, exit 1)
    "self-alias": (b"name: x\nmodel: &a [*a]\n", "expands to more than 100,000 values"),
    "self-alias-mapping": (b"name: x\nmodel: &m {kwargs: *m}\n", "expands to more than 100,000 values"),
    "deep": (b"a: " + b"[" * 20000 + b"]" * 20000 + b"\n", "nested too deeply"),
    "deep-block": (b"- " * 5000 + b"x\n", "nested too deeply"),
    # 4 MB of small values (within the size limit): building them took PyYAML a minute, past the
    # command test's 30 s timeout; counting the parser's events stops at the limit
    "many-values": (b"x: [" + b",".join([b"1"] * 2_000_000) + b"]\n", "more than 100,000 values"),
    "python-tag": (b"name: !!python/object/apply:os.system [echo]\n",
                   "not valid YAML (line 1): tag !!python/object/apply:os.system is not allowed"),
    "duplicate-key": (b"name: a\nname: b\n", "not valid YAML (line 2): duplicate key 'name'"),
    "oversized": (b"#" * (MAX_FILE_BYTES + 1), "too large for a config file"),
    "tab-indent": (b"name: x\nmodel:\n\tname: cnn\n", "not valid YAML (line 3)"),
    "utf16": ("name: x\n".encode("utf-16"), "not UTF-8 text"),
    "huge-int": (b"name: x\ntraining:\n  epochs: " + b"1" * 5000 + b"\n",
                 "not valid YAML (line 3): cannot read '1111111111111111111111111111111111111111' (Exceeds the limit"),
    "bad-int-tag": (b"name: x\nseed: !!int abc\n", "not valid YAML (line 2): cannot read 'abc' (invalid literal"),
    "no-such-month": (b"name: x\nseed: !!timestamp 2020-13-45\nx: !!float y\n",
                      "not valid YAML (line 3): cannot read 'y'"),
    "set-tag": (b"name: !!set {a, b}\n", "not valid YAML (line 1): tag !!set is not allowed"),
    "binary-tag": (b"name: !!binary aGVsbG8=\n", "not valid YAML (line 1): tag !!binary is not allowed"),
}


def _validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "orchestrator"), "validate", str(path)], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_config_is_one_user_error(kind: str, tmp_path: Path) -> None:
    content, message = HOSTILE[kind]
    path = tmp_path / f"{kind}.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        load_config(path)
    text = str(caught.value)
    assert "\n" not in text and str(path) in text and message in text, text


@pytest.mark.parametrize("kind", ["binary", "billion-laughs", "many-values", "self-alias"])
def test_hostile_config_through_the_command_is_one_line_exit_2(kind: str, tmp_path: Path) -> None:
    content, message = HOSTILE[kind]
    path = tmp_path / f"{kind}.yaml"
    path.write_bytes(content)
    result = _validate(path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and str(path) in lines[0] and message in lines[0], result.stderr[-2000:]


def test_a_hostile_set_value_gets_the_same_bounds_as_a_file() -> None:
    """`--set` values are YAML too: a "billion laughs" value hung validate past 20 s."""
    result = subprocess.run([str(BIN / "orchestrator"), "validate", str(ROOT / "configs" / "digits.yaml"), "--set",
                             f"model.kwargs={_billion_laughs(8)}"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --set model.kwargs: expands to more than 100,000 values (nested YAML aliases?); "
        "a job config file is far smaller"], result.stderr[-2000:]
    deep = "[" * 100 + "]" * 100
    with pytest.raises(UserError, match="--set name: nested too deeply"):
        load_config(ROOT / "configs" / "digits.yaml", [f"name={deep}"])
    assert load_config(ROOT / "configs" / "digits.yaml", ["training.lr=0.01"]).training.lr == 0.01


def test_a_date_is_read_as_the_text_written_and_a_long_bad_value_is_cut(tmp_path: Path) -> None:
    """YAML's implicit dates became datetime.date objects (a JSON TypeError traceback in validate)."""
    job = load_config(ROOT / "configs" / "digits.yaml", ["name=2020-01-01"])
    assert job.name == "2020-01-01"
    with pytest.raises(UserError) as caught:
        load_config(ROOT / "configs" / "digits.yaml", ["training.seed=" + "1" * 5000])
    assert str(caught.value).startswith("training.seed: ") and str(caught.value).endswith("... (5,002 characters)")


def test_not_a_regular_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)  # reading it would block forever
    for path in (fifo, tmp_path, Path("/dev/zero")):
        with pytest.raises(UserError, match="not a regular file"):
            read_yaml(path, "config")
    with pytest.raises(UserError, match="file not found"):
        read_yaml(tmp_path / "missing.yaml", "config")
    with pytest.raises(UserError, match=r"^/proc/self/mem: cannot read the config file \("):
        read_yaml("/proc/self/mem", "config")  # a regular file whose read fails (as no permission would)


def test_a_file_name_holding_a_nul_byte_is_one_line_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"  # YAML's "\0": a name no path holds (os.open raises ValueError)
    text = (ROOT / "configs" / "digits.yaml").read_text()
    text = text.replace("  use_gpu: auto", '  use_gpu: auto\n  cluster: "a\\0b"')
    config.write_text(text)
    result = _validate(config)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines == ["error: 'a\\x00b': not a cluster file name (it holds a NUL byte)"], result.stderr[-2000:]


def test_json_files_get_the_same_care(tmp_path: Path) -> None:
    deep = tmp_path / "plan.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(UserError, match="nested too deeply"):
        read_json(deep, "plan")
    binary = tmp_path / "profile.json"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(UserError, match="not UTF-8 text"):
        read_json(binary, "profile")
    huge = tmp_path / "huge.json"
    huge.write_text('{"param_count": ' + "2" * 5000 + "}")
    with pytest.raises(UserError, match=r"huge.json: not valid JSON \(Exceeds the limit \(4300 digits\)"):
        read_json(huge, "profile")
    twice = tmp_path / "cluster.json"
    twice.write_text('{"nodes": 2, "gpus": {"a": 1, "a": 2}}')  # json keeps the last; YAML refuses it
    with pytest.raises(UserError, match=r"cluster.json: not valid JSON \(duplicate key 'a'\)$"):
        read_json(twice, "cluster")


def test_a_place_that_cannot_be_written_is_one_line_and_a_uri_is_no_local_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.planner import ClusterSpec, save_cluster
    from orchestrator.profiler import cache_path

    (tmp_path / "file").write_text("kept\n")
    for place, why in ((tmp_path / "file" / "c.yaml", f"{tmp_path / 'file'} is a file, not a folder"), (Path("/proc/orchestrator/c.yaml"), ".+")):
        with pytest.raises(UserError, match=rf"^{place}: cannot write \({why}\)$"):
            save_cluster(ClusterSpec(nodes=1, gpus_per_node=1, intra_node_GBps=16, inter_node_GBps=12.5), place)
    assert (tmp_path / "file").read_text() == "kept\n"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for storage, folder in ((str(tmp_path / "runs"), tmp_path / "runs" / "profiles"),
                            (f"file://{tmp_path}/runs", tmp_path / "runs" / "profiles"),
                            ("s3://bucket/runs", tmp_path / "cache" / "orchestrator" / "profiles")):
        job = load_config(ROOT / "configs" / "digits.yaml", [f"checkpoint.storage_path={storage}"])
        assert cache_path(job, "cpu").parent == folder


def test_aliases_within_reason_still_load(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text("defaults: &d {lr: 0.1, seed: 1}\ntraining: *d\nother: *d\n")
    assert read_yaml(path, "config")["training"] == {"lr": 0.1, "seed": 1}


@pytest.mark.parametrize("command", ["validate", "run", "profile"])
def test_a_bad_config_is_refused_before_torch_or_ray_are_imported(command: str, tmp_path: Path) -> None:
    """What makes the error come within a second: importing torch alone takes ~2 s here."""
    path = tmp_path / "binary.yaml"
    path.write_bytes(HOSTILE["binary"][0])
    probe = ("import sys\nfrom orchestrator.cli import main\nsys.argv = ['orchestrator', sys.argv[1], sys.argv[2]]\n"
             "try:\n    main()\nexcept SystemExit as exc:\n"
             "    print(exc.code, sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", probe, command, str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.split() == ["2", "[]"], result.stdout + result.stderr[-2000:]
    assert "not UTF-8 text" in result.stderr


def test_an_output_that_cannot_be_written_is_found_before_the_work_it_would_hold(tmp_path: Path) -> None:
    from orchestrator.files import check_writable

    (tmp_path / "file").write_text("kept\n")
    with pytest.raises(UserError, match=rf"^{tmp_path / 'file' / 'c.yaml'}: cannot write \(.+ is a file, not a folder\)$"):
        check_writable(tmp_path / "file" / "c.yaml")
    assert check_writable(tmp_path / "new" / "c.yaml").parent.is_dir()
    assert not (tmp_path / "new" / "c.yaml").exists()  # no empty file left where the result goes
    check_writable(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "kept\n"  # an existing file is untouched


def test_an_output_that_fails_midway_leaves_the_previous_file_whole(tmp_path: Path) -> None:
    """`plan -o`, `calibrate -o`, `k8s render -o` write through files.write_text: a full disk or a
    quota (here RLIMIT_FSIZE, in a child) used to leave the first 4 KiB of the new file."""
    import stat

    keep, link = tmp_path / "keep.json", tmp_path / "link.json"
    keep.write_text('{"old": true}\n')
    keep.chmod(0o640)
    script = ("import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "from orchestrator.files import write_text\nfrom orchestrator.errors import UserError\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
              f"try:\n    write_text({str(keep)!r}, 'x' * 10000)\nexcept UserError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.stdout == f"{keep}: cannot write (File too large)\n", result.stdout + result.stderr[-2000:]
    assert keep.read_text() == '{"old": true}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]
    from orchestrator.files import write_text

    link.symlink_to(keep)
    write_text(link, "new\n")  # through the link to its file, whose mode stays
    assert link.is_symlink() and keep.read_text() == "new\n" and stat.S_IMODE(keep.stat().st_mode) == 0o640


def test_numbers_in_exponent_form_read_as_numbers_as_in_yaml_1_2(tmp_path: Path) -> None:
    # PyYAML's YAML 1.1 rules read 1e-4 and 1.25e1 as text: a cluster's `inter_node_GBps: 1.25e1`
    # was refused as "must be a number, got '1.25e1'".
    from orchestrator.planner import load_cluster

    path = tmp_path / "c.yaml"
    path.write_text("nodes: 2\ngpus_per_node: 4\nintra_node_GBps: 3e1\ninter_node_GBps: 1.25e1\n")
    spec = load_cluster(path)
    assert (spec.intra_node_GBps, spec.inter_node_GBps) == (30.0, 12.5)
    assert read_yaml_text("a: 1e-4\nb: '1e-4'\nc: e5\nd: 0x10\n") == {"a": 1e-4, "b": "1e-4", "c": "e5", "d": 16}


def test_base_60_numbers_are_text_as_in_yaml_1_2(tmp_path: Path) -> None:
    """YAML 1.1 reads `1:30` as 90: `resources.deadline_hours: 1:30` (an hour and a half) planned for
    90 hours, `--set training.epochs=1:30` trained 90 epochs, each without a word."""
    assert read_yaml_text("a: 1:30\nb: 1:30:00.5\nc: -.5\nd: +.5e+3\ne: 010\nf: -.inf\n") == {
        "a": "1:30", "b": "1:30:00.5", "c": -0.5, "d": 500.0, "e": 8, "f": float("-inf")}
    config = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
    for override, field in (("resources.deadline_hours=1:30", "resources.deadline_hours"),
                            ("training.epochs=1:30", "training.epochs"),
                            ("resources.workers=1:30", "resources.workers")):  # was 90 workers
        with pytest.raises(UserError, match=rf"^{re.escape(field)}: .*got '1:30'"):
            load_config(config, [override])


def read_yaml_text(text: str) -> object:
    from orchestrator.files import load_yaml

    return load_yaml(text, "x.yaml", "job")


def test_a_cache_write_takes_nothing_from_a_planted_link(tmp_path: Path, monkeypatch) -> None:
    """`write_text(follow_links=False)` (the calibration and probe caches, in a possibly shared
    folder) replaces a link planted at its name. It gave the new file the link target's mode: a link
    to another user's file of mode 0666 made this user's entry world-writable, so its figures could
    be rewritten by anyone and still pass as this user's own. And a link swapped in after it looked
    (here to a device) was written through in place."""
    import stat

    from orchestrator.files import write_text

    theirs, entry = tmp_path / "theirs", tmp_path / "calibrated-k.yaml"
    theirs.write_text("their own\n")
    theirs.chmod(0o666)
    entry.symlink_to(theirs)
    write_text(entry, "ours\n", follow_links=False)
    assert theirs.read_text() == "their own\n" and not entry.is_symlink() and entry.read_text() == "ours\n"
    assert not stat.S_IMODE(entry.stat().st_mode) & 0o022

    swapped = tmp_path / "cluster-f-gpu.yaml"
    looked = Path.is_symlink

    def plant_after_the_look(self: Path) -> bool:
        seen = looked(self)
        if self == swapped and not seen:
            swapped.symlink_to(os.devnull)
        return seen

    monkeypatch.setattr(Path, "is_symlink", plant_after_the_look)
    write_text(swapped, "ours\n", follow_links=False)
    assert not looked(swapped) and swapped.read_text() == "ours\n"


def test_the_staged_copy_swapped_for_a_link_never_changes_the_link_targets_mode(tmp_path: Path, monkeypatch) -> None:
    """The staged copy's mode was set by name: in a folder another user can write, the staged file
    swapped for a link (here right after it was written) had the link's target, any file of this
    user's, set to the cache entry's mode."""
    import stat

    from orchestrator import files

    entry, victim = tmp_path / "calibrated-k.yaml", tmp_path / "private"
    entry.write_text("old\n")
    entry.chmod(0o644)
    victim.write_text("secret\n")
    victim.chmod(0o600)
    looked = files._lmode

    def swap_then_look(path: Path) -> int:
        staged = next(p for p in tmp_path.iterdir() if p.name.startswith(".calibrated-k.yaml."))
        staged.unlink()
        staged.symlink_to(victim)
        return looked(path)

    monkeypatch.setattr(files, "_lmode", swap_then_look)
    files.write_text(entry, "new\n", follow_links=False)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600 and victim.read_text() == "secret\n"


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_worker_count_the_cluster_file_cannot_hold_is_said_before_anything_starts(command: str, tmp_path: Path) -> None:
    """`workers: 64` on a 4 x 8 cluster file (or 17: no even spread) passed `validate`; `run` said it
    only after starting Ray and profiling the model (driver.sizing places a fixed count)."""
    config, cluster = ROOT / "configs" / "digits.yaml", ROOT / "configs" / "clusters" / "dgx_a100.yaml"
    for workers, message in (("64", "resources.workers: must be between 1 and the cluster's 32 GPUs, got 64"),
                             ("17", "resources.workers: 17 workers cannot be spread evenly over 4 nodes of 8 GPUs")):
        result = subprocess.run([str(BIN / "orchestrator"), command, str(config), "--set", f"resources.cluster={cluster}",
                                 "--set", f"resources.workers={workers}"], capture_output=True, text=True, timeout=60,
                                cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert (result.returncode, result.stderr) == (2, f"error: {message}\n"), result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
