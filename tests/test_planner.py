import pytest

from moverd import FileEntry, UnsafePathError, UserError
from moverd.planner import archive_id, plan_datablocks


def files(*sizes, prefix="f"):
    return [FileEntry(path=f"{prefix}{i:03d}", size=s) for i, s in enumerate(sizes)]


def test_blocks_respect_target_in_path_order():
    plans = plan_datablocks("p/1", list(reversed(files(40, 40, 40, 10))), target_size=100)
    assert [[f.path for f in p.files] for p in plans] == [["f000", "f001"], ["f002", "f003"]]
    assert all(p.size <= 100 for p in plans)


def test_big_file_gets_its_own_block_and_no_block_is_empty():
    plans = plan_datablocks("p", files(10, 500, 10), target_size=100)
    assert [p.size for p in plans] == [10, 500, 10]
    assert all(p.files for p in plans)
    assert plan_datablocks("p", [], 100) == []
    assert [p.size for p in plan_datablocks("p", files(500), 100)] == [500]


def test_archive_ids_are_deterministic_and_path_safe():
    a = plan_datablocks("20.500.11935/abc", files(1, 2), 1)
    b = plan_datablocks("20.500.11935/abc", list(reversed(files(1, 2))), 1)
    assert [p.archive_id for p in a] == [p.archive_id for p in b]
    assert a[0].archive_id == "20.500.11935%2Fabc/datablocks/20.500.11935%2Fabc_00000.tar"
    assert archive_id("x", 3).endswith("x_00003.tar")


def test_empty_files_are_planned():
    plans = plan_datablocks("p", files(0, 0, 0), 100)
    assert len(plans) == 1 and len(plans[0].files) == 3


def test_duplicates_and_file_folder_conflicts_are_user_errors():
    with pytest.raises(UserError, match="twice"):
        plan_datablocks("p", [FileEntry(path="a", size=1), FileEntry(path="a", size=1)], 10)
    with pytest.raises(UserError, match="both a file and the folder"):
        plan_datablocks("p", [FileEntry(path="a", size=1), FileEntry(path="a/b", size=1)], 10)


def test_unsafe_paths_are_refused_at_the_model():
    with pytest.raises(UnsafePathError, match=r"'\.\.'"):
        FileEntry(path="../../etc/passwd", size=1)
