"""Done markers and atomic writes: a partial or altered file never counts as done."""
import json

from jobs.state import atomic_write_json, is_done, mark_done


def test_done_needs_marker_and_intact_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert not is_done(tmp_path)
    mark_done(tmp_path, ["a.json"])
    assert is_done(tmp_path) and is_done(tmp_path, verify_checksums=True)
    text = (tmp_path / "a.json").read_text()
    (tmp_path / "a.json").write_text(text.replace("1", "2"))  # same size, other content
    assert is_done(tmp_path) and not is_done(tmp_path, verify_checksums=True)
    (tmp_path / "a.json").write_text("{")  # truncated
    assert not is_done(tmp_path)
    (tmp_path / "a.json").unlink()
    assert not is_done(tmp_path)


def test_atomic_write_leaves_no_temporary(tmp_path):
    atomic_write_json(tmp_path / "sub" / "b.json", [1, 2])
    assert json.loads((tmp_path / "sub" / "b.json").read_text()) == [1, 2]
    assert [path.name for path in (tmp_path / "sub").iterdir()] == ["b.json"]


def test_corrupt_marker_is_not_done(tmp_path):
    (tmp_path / "DONE.json").write_text("{not json")
    assert not is_done(tmp_path)
