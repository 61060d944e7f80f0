"""Where a cluster's calibrations live and which one plan and run take: the newest, by when it
was measured, of the spec's own and the one `orchestrator calibrate` stored for that cluster."""

from __future__ import annotations

from pathlib import Path

from orchestrator.calibrations import cluster_key, newest, store, stored_path
from orchestrator.planner import Calibration, ClusterSpec

SPEC = ClusterSpec(nodes=2, gpus_per_node=4, intra_node_GBps=32, inter_node_GBps=3.125, intra_link="pcie",
                   inter_link="ethernet", gpu="A10")


def _calibrated(spec: ClusterSpec, when: str, inter: float) -> ClusterSpec:
    return spec.replace(calibration=Calibration(source="jobs", measured_at=when, intra_GBps=5.0, inter_GBps=inter,
                                                base_latency_us=10.0, latency_us=5.0, inter_latency_us=20.0,
                                                overlap=0.5, observations=12))


def test_a_cluster_is_known_by_its_hardware_not_its_calibration_or_price() -> None:
    assert cluster_key(SPEC) == cluster_key(_calibrated(SPEC, "2026-01-01T00:00:00Z", 1.0))
    assert cluster_key(SPEC) == cluster_key(SPEC.replace(gpu_hour_cost=2.5, latency_us=9.0))
    assert cluster_key(SPEC) != cluster_key(SPEC.replace(nodes=3))
    assert cluster_key(SPEC) != cluster_key(SPEC.replace(inter_link="infiniband"))


def test_the_newest_calibration_of_the_cluster_is_used_and_said(tmp_path: Path) -> None:
    assert newest(SPEC, tmp_path) == (SPEC, None)  # nothing stored: the spec as given
    stored = store(_calibrated(SPEC, "2026-06-01T00:00:00Z", 0.9), tmp_path)
    assert stored == stored_path(SPEC, tmp_path) and stored.name == f"calibrated-{cluster_key(SPEC)}.yaml"
    used, said = newest(SPEC, tmp_path)
    assert used.calibration.inter_GBps == 0.9 and "newest calibration of this cluster" in used.calibration.note
    assert said.startswith("calibration: the newest of this cluster, from jobs (12 observations, 2026-06-01")
    older = _calibrated(SPEC, "2026-01-01T00:00:00Z", 2.0)
    assert newest(older, tmp_path)[0].calibration.inter_GBps == 0.9  # the stored one is newer
    fresher = _calibrated(SPEC, "2026-07-01T00:00:00Z", 2.0)
    assert newest(fresher, tmp_path) == (fresher, None)  # the spec's own is newer: it stands
    other = SPEC.replace(nodes=4)
    assert newest(other, tmp_path) == (other, None)  # another cluster's calibration is not this one's


def test_an_older_calibration_never_replaces_a_stored_newer_one(tmp_path: Path) -> None:
    store(_calibrated(SPEC, "2026-06-01T00:00:00Z", 0.9), tmp_path)
    # `calibrate` printed "stored as cluster K's calibration" for the older one it did not store
    assert store(_calibrated(SPEC, "2026-05-01T00:00:00Z", 0.5), tmp_path) is None
    assert newest(SPEC, tmp_path)[0].calibration.inter_GBps == 0.9
    store(_calibrated(SPEC, "2026-06-02T00:00:00Z", 0.5), tmp_path)
    assert newest(SPEC, tmp_path)[0].calibration.inter_GBps == 0.5
    assert [p.name for p in tmp_path.iterdir()] == [f"calibrated-{cluster_key(SPEC)}.yaml"]  # no temp files left


def test_a_calibration_stamped_by_a_clock_far_ahead_does_not_win_for_ever(tmp_path: Path) -> None:
    """A calibration stamped 2099 (a clock running ahead) was kept over every later one: `store`
    refused each as older, and `newest` preferred it to a cluster file's fresh calibration."""
    store(_calibrated(SPEC, "2099-01-01T00:00:00Z", 0.9), tmp_path)
    assert store(_calibrated(SPEC, "2026-06-01T00:00:00Z", 0.5), tmp_path) is not None
    assert newest(SPEC, tmp_path)[0].calibration.inter_GBps == 0.5
    assert store(_calibrated(SPEC, "2099-01-01T00:00:00Z", 0.9), tmp_path) is None  # nor replaces one
    store(_calibrated(SPEC, "2099-01-01T00:00:00Z", 0.9), tmp_path / "only")  # the only one stored: still used
    assert newest(SPEC, tmp_path / "only")[0].calibration.inter_GBps == 0.9
    own = _calibrated(SPEC, "2026-06-01T00:00:00Z", 0.7)
    assert newest(own, tmp_path) == (own, None)


def test_a_damaged_stored_calibration_is_passed_over(tmp_path: Path) -> None:
    stored_path(SPEC, tmp_path).write_text("nodes: [\n")
    assert newest(SPEC, tmp_path) == (SPEC, None)


def test_a_folder_where_the_calibration_goes_is_one_line_naming_it_and_leaves_nothing(tmp_path: Path) -> None:
    import pytest

    from orchestrator.errors import UserError

    calibrated = _calibrated(SPEC, "2026-01-02T00:00:00+00:00", 1.0)
    (stored_path(SPEC, tmp_path) / "sub").mkdir(parents=True)
    with pytest.raises(UserError, match=rf"^{stored_path(SPEC, tmp_path)}: cannot write"):
        store(calibrated, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [stored_path(SPEC, tmp_path).name]  # no .tmp left


def test_one_observation_is_said_as_one() -> None:
    from orchestrator.calibrations import History

    assert History([object()], None, 1, {}).summary() == "1 observation from 1 run(s)"  # was "1 observations"


def test_a_planted_link_or_another_users_file_in_a_shared_cache_is_not_used_nor_written_through(
        tmp_path: Path, monkeypatch) -> None:
    # With XDG_CACHE_HOME on a shared folder, a link planted at the entry's (predictable) name was
    # read as this cluster's calibration, and `store` wrote through it, replacing the link's target.
    import os

    victim = tmp_path / "victim.yaml"
    store(_calibrated(SPEC, "2026-06-01T00:00:00Z", 0.9), tmp_path / "theirs")
    victim.write_bytes(stored_path(SPEC, tmp_path / "theirs").read_bytes())
    before = victim.read_bytes()
    stored_path(SPEC, tmp_path).symlink_to(victim)
    assert newest(SPEC, tmp_path) == (SPEC, None)
    store(_calibrated(SPEC, "2026-07-01T00:00:00Z", 0.5), tmp_path)
    assert victim.read_bytes() == before and not stored_path(SPEC, tmp_path).is_symlink()
    assert newest(SPEC, tmp_path)[0].calibration.inter_GBps == 0.5
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(victim).st_uid + 1)  # the entry is now another user's
    assert newest(SPEC, tmp_path) == (SPEC, None)


def test_an_entry_swapped_for_a_link_after_the_check_is_not_read_through(tmp_path: Path, monkeypatch) -> None:
    # In a cache folder another user can write (XDG_CACHE_HOME on a shared folder, group- or
    # world-writable, or theirs), the entry was checked (lstat: this user's own file) and then read
    # again by name: swapped for a link meanwhile, the link's target was read as this cluster's
    # calibration. The entry is now opened once, never through a link, and checked on what was opened.
    import os

    store(_calibrated(SPEC, "2026-06-01T00:00:00Z", 0.9), tmp_path)
    entry = stored_path(SPEC, tmp_path)
    planted = tmp_path / "planted.yaml"
    store(_calibrated(SPEC, "2026-07-01T00:00:00Z", 0.001), tmp_path / "theirs")
    planted.write_bytes(stored_path(SPEC, tmp_path / "theirs").read_bytes())
    lstat = os.lstat

    def then_swapped(path, *args, **kwargs):  # the other user's move, right after any look at the entry
        st = lstat(path, *args, **kwargs)
        if Path(path) == entry and not entry.is_symlink():
            entry.unlink()
            entry.symlink_to(planted)
        return st

    monkeypatch.setattr(os, "lstat", then_swapped)
    used, _ = newest(SPEC, tmp_path)
    assert used.calibration is None or used.calibration.inter_GBps != 0.001
