"""Files appear whole or not at all."""

import pytest

from zeroseg.io import atomic_path, write_atomically


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
