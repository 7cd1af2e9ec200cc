import pytest

from moverd import UnsafePathError, parse_duration, parse_size, path_safe_id, safe_key


@pytest.mark.parametrize(
    "text,expected",
    [("512", 512), ("64MiB", 64 * 2**20), ("20GiB", 20 * 2**30), ("500 GB", 500 * 10**9), ("1.5KiB", 1536), (7, 7)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["20 gibibytes", "-1", "GiB", "", "1e9", True, -5])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


def test_parse_duration():
    assert parse_duration("5m") == 300
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration(2.5) == 2.5
    with pytest.raises(ValueError, match="duration"):
        parse_duration("soon")


@pytest.mark.parametrize("key,norm", [("a/b", "a/b"), ("./a//b/", "a/b"), ("ü/ñ.txt", "ü/ñ.txt")])
def test_safe_key_normalises(key, norm):
    assert safe_key(key) == norm


@pytest.mark.parametrize(
    "bad,why",
    [("../x", r"'\.\.'"), ("a/../../x", r"'\.\.'"), ("/etc/passwd", "absolute"), ("a\x00b", "NUL"),
     ("a\nb", "control"), ("", "empty"), ("a\\b", "backslash")],
)
def test_safe_key_refuses(bad, why):
    with pytest.raises(UnsafePathError, match=why):
        safe_key(bad)


def test_path_safe_id_is_injective_and_one_component():
    a, b = path_safe_id("20.500/abc"), path_safe_id("20.500_abc")
    assert "/" not in a and a != b
    with pytest.raises(UnsafePathError):
        path_safe_id("..")
