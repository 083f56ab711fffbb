"""Hostfile parsing and --include/--exclude filters, checked against the deepspeed launcher's own."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.errors import LaunchError
from launcher.hostfile import apply_filters, parse_filter, parse_hostfile, read_hostfile, render_hostfile


def test_parses_comments_blank_lines_and_inline_comments_in_order():
    text = "# cluster\n\nnode-b slots=8   # rack 2\n  node-a\tslots=4 max_slots=8\n"
    assert list(parse_hostfile(text).items()) == [("node-b", 8), ("node-a", 4)]


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("gpu1", "host 'gpu1' has no slots"),
        ("gpu1 slots=0", "slots=0"),
        ("gpu1 slots=eight", "malformed slots 'eight'"),
        ("gpu1 slots=-1", "malformed slots '-1'"),
        ("gpu1 slots=", "malformed slots ''"),
        ("gpu1 slots=4.0", "malformed slots '4.0'"),
        ("gpu1 slot=4", "has no slots"),
        ("slots=4", "expected a host name first"),
        ("gpu1 slots=4 extra", "unexpected 'extra'"),
        ("gpu1 slots=4 max_slots=x", "unexpected 'max_slots=x'"),
        ("gpu/1 slots=4", "is not a host name"),
    ],
)
def test_each_malformed_line_is_reported_with_file_and_line(line, fragment):
    with pytest.raises(LaunchError) as err:
        parse_hostfile(f"# header\nok slots=2\n{line}\n", "hosts.txt")
    assert "hosts.txt:3: " in str(err.value)
    assert fragment in str(err.value)


def test_duplicate_host_names_both_lines():
    with pytest.raises(LaunchError, match=r"hf:4: host 'a' is listed again \(first on line 1\)"):
        parse_hostfile("a slots=1\nb slots=1\n\na slots=2\n", "hf")


def test_all_problems_are_listed_at_once():
    with pytest.raises(LaunchError) as err:
        parse_hostfile("a\nb slots=0\nc slots=1\n", "hf")
    assert "hf:1:" in str(err.value) and "hf:2:" in str(err.value) and "hf:3" not in str(err.value)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_a_file_without_hosts_is_an_error(text):
    with pytest.raises(LaunchError, match="no hosts found"):
        parse_hostfile(text, "empty")


def test_read_hostfile_names_a_missing_file(tmp_path):
    with pytest.raises(LaunchError, match=r"cannot read hostfile .*nope"):
        read_hostfile(tmp_path / "nope")
    (tmp_path / "hf").write_text("x slots=3\n")
    assert read_hostfile(tmp_path / "hf") == {"x": 3}


POOL = {"a": 4, "b": 4, "c": 2}


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        ("", "", {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3], "c": [0, 1]}),
        ("b", "", {"b": [0, 1, 2, 3]}),
        ("c@a:3,1", "", {"a": [1, 3], "c": [0, 1]}),  # hostfile order, not spec order
        ("a@a:2", "", {"a": [2]}),  # as DeepSpeed: named slots win over a bare name
        ("", "b", {"a": [0, 1, 2, 3], "c": [0, 1]}),
        ("", "a:0@c:0,1", {"a": [1, 2, 3], "b": [0, 1, 2, 3]}),
    ],
)
def test_filters(include, exclude, expected):
    assert apply_filters(POOL, include, exclude) == expected


@pytest.mark.parametrize(
    ("include", "exclude", "fragment"),
    [
        ("a", "b", "mutually exclusive"),
        ("zz", "", "host 'zz', which is not in the host list"),
        ("a:4", "", "there is no slot 4"),
        ("", "a@b@c", "leaves no GPU slots"),
        ("a:x", "", "must be whole numbers"),
        ("a:", "", "must be whole numbers"),
        ("a@@b", "", "does not start with a host name"),
    ],
)
def test_filter_errors_name_the_option(include, exclude, fragment):
    with pytest.raises(LaunchError, match=fragment) as err:
        apply_filters(POOL, include, exclude)
    assert "--include" in str(err.value) or "--exclude" in str(err.value)


def test_parse_filter_and_render():
    assert parse_filter("h1:1,0@h2@h1:3") == {"h1": [0, 1, 3], "h2": None}
    assert render_hostfile({"h1": [0, 1], "h2": range(8)}) == "h1 slots=2\nh2 slots=8\n"
    assert parse_hostfile(render_hostfile({"h1": [0, 1]})) == {"h1": 2}


@pytest.fixture(scope="module")
def deepspeed_runner():
    return pytest.importorskip("deepspeed.launcher.runner")


_specs = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.lists(st.integers(0, 3), max_size=3)), min_size=1, max_size=3
).map(lambda nodes: "@".join(h + (":" + ",".join(map(str, s)) if s else "") for h, s in nodes))


@settings(max_examples=150, deadline=None)
@given(spec=_specs, mode=st.sampled_from(["include", "exclude"]))
def test_filters_agree_with_the_deepspeed_launcher(deepspeed_runner, spec, mode):
    pool = {"a": 4, "b": 2, "c": 3}
    kwargs = {"include": spec, "exclude": ""} if mode == "include" else {"include": "", "exclude": spec}
    try:
        theirs = dict(deepspeed_runner.parse_inclusion_exclusion(pool, kwargs["include"], kwargs["exclude"]))
    except ValueError:
        theirs = None
    try:
        ours = apply_filters(pool, **kwargs)
    except LaunchError:
        ours = None
    if theirs == {}:  # DeepSpeed lets a filter remove everything and fails later; we say so at once
        assert ours is None
    else:
        assert ours == theirs


@settings(max_examples=100, deadline=None)
@given(pool=st.dictionaries(st.from_regex(r"[a-z][a-z0-9\-]{0,8}", fullmatch=True), st.integers(1, 16), min_size=1))
def test_hostfiles_deepspeed_accepts_parse_the_same(deepspeed_runner, pool):
    text = "# generated\n" + "".join(f"{h}  slots={n}  # note\n" for h, n in pool.items())
    assert parse_hostfile(text) == dict(deepspeed_runner._parse_hostfile(text.splitlines()))
