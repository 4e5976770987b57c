"""Files appear whole or not at all."""

import os
import re
import stat

import pytest

from tests.conftest import dead_pid
from zeroseg.io import atomic_path, remove_dead_partials, write_atomically


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "results.json"
    write_atomically(target, "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as partial:
        partial.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    write_atomically(tmp_path / "deeper" / "new.bin", b"\x00\x01")
    assert (tmp_path / "deeper" / "new.bin").read_bytes() == b"\x00\x01"


def test_only_the_temporary_files_of_dead_writers_for_the_named_targets_are_removed(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    names = [f".a.pt.{dead}.partial", f".b.pt.{alive}.partial", f".c.json.{dead}.partial", ".notes", "d.pt"]
    for name in names:
        (tmp_path / name).write_text("x")
    assert remove_dead_partials(tmp_path, re.compile(r".+\.pt")) == [tmp_path / f".a.pt.{dead}.partial"]
    assert remove_dead_partials(tmp_path) == [tmp_path / f".c.json.{dead}.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[1], ".notes", "d.pt"])


def test_a_file_written_whole_gets_the_mode_the_umask_gives(tmp_path):
    previous = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "private-by-default") as partial:
            partial.touch(mode=0o600)  # as safetensors' save_file makes it
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "private-by-default").stat().st_mode) == 0o640
