"""Option parsing and the request model: every front end goes through gpulane.jobs."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpulane.jobs import (
    MAX_COMMAND_ARGS,
    MAX_COMMAND_BYTES,
    MAX_TIME_SECONDS,
    MEMORY_FORMS,
    TIME_FORMS,
    OptionError,
    Request,
    build_request,
    format_duration,
    parse_count,
    parse_duration,
    parse_memory,
)

HUGE = "9" * 5000  # beyond int()'s 4300-digit limit and float's range


def short_id(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} chars)"


def assert_one_line(error: pytest.ExceptionInfo[OptionError]) -> str:
    message = str(error.value)
    assert message
    assert len(message.splitlines()) == 1, message
    return message


# --time


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("02:00:00", 7200),
        ("1:02:03", 3723),
        ("100:00:00", 360000),
        ("30:00", 1800),
        ("90:00", 5400),
        ("0:30", 30),
        ("1:5", 65),
        ("30", 1800),
        ("1", 60),
        ("90s", 90),
        ("90m", 5400),
        ("2h", 7200),
        ("1d", 86400),
        ("1.5h", 5400),
        ("2 h", 7200),
        ("  2H ", 7200),
        ("366d", MAX_TIME_SECONDS),
    ],
)
def test_parse_duration_accepted_forms(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "abc",
        "",
        "   ",
        "-5",
        "-5m",
        "1:99",
        "1:60",
        "1:00:60",
        "1:2:3:4",
        ":30",
        "0",
        "00:00",
        "0s",
        "0.5s",
        "12X",
        "5w",
        "1e3",
        "367d",
        "99999999",
        HUGE,
        HUGE + "s",
        "1\n2",
    ],
    ids=short_id,
)
def test_parse_duration_refuses_malformed(text: str) -> None:
    with pytest.raises(OptionError) as error:
        parse_duration(text)
    message = assert_one_line(error)
    assert message.startswith("--time ")
    assert TIME_FORMS in message


def test_parse_duration_names_the_option_it_parses() -> None:
    with pytest.raises(OptionError, match=r"^--timeout "):
        parse_duration("soon", "--timeout")


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=MAX_TIME_SECONDS))
def test_format_and_parse_duration_round_trip(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_format_duration_shapes() -> None:
    assert format_duration(None) == "--:--"
    assert format_duration(59) == "00:59"
    assert format_duration(3723) == "1:02:03"


# --mem


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512M", 512 * 1024**2),
        ("8G", 8 * 1024**3),
        ("8g", 8 * 1024**3),
        ("8GB", 8 * 1024**3),
        ("8GiB", 8 * 1024**3),
        ("8 G", 8 * 1024**3),
        ("1.5T", int(1.5 * 1024**4)),
        ("64K", 64 * 1024),
        ("4096", 4096),
        ("4096B", 4096),
        ("1024T", 1024**5),
        ("1P", 1024**5),  # the unit table profile files share
    ],
)
def test_parse_memory_accepted_forms(text: str, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize(
    "text",
    [
        "abc",
        "",
        "-5",
        "-5G",
        "0",
        "0G",
        "0.5",
        "1:99",
        "12X",
        "8GG",
        "1025T",
        "1e9",
        HUGE,
        HUGE + "T",
    ],
    ids=short_id,
)
def test_parse_memory_refuses_malformed(text: str) -> None:
    with pytest.raises(OptionError) as error:
        parse_memory(text)
    message = assert_one_line(error)
    assert message.startswith("--mem ")
    assert MEMORY_FORMS in message


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_memory_only_raises_option_error(text: str) -> None:
    try:
        size = parse_memory(text)
    except OptionError as error:
        assert len(str(error).splitlines()) == 1
    else:
        assert 1 <= size <= 1024**5


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_duration_only_raises_option_error(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except OptionError as error:
        assert len(str(error).splitlines()) == 1
    else:
        assert 1 <= seconds <= MAX_TIME_SECONDS


@settings(max_examples=80, deadline=None)
@given(st.from_regex(r"\A[0-9]{1,30}(\.[0-9]{1,5})?\s?[kKmMgGtTbB]?(i?[bB])?\Z"))
def test_parse_memory_numeric_shapes_never_crash(text: str) -> None:
    with contextlib.suppress(OptionError):
        parse_memory(text)


# --gpus / --slices


@pytest.mark.parametrize("text", ["1", "8", " 2 ", 64, "64"])
def test_parse_count_accepts(text: str | int) -> None:
    assert parse_count(text, "--gpus") == int(text)


@pytest.mark.parametrize(
    "text", ["abc", "", "-5", "0", "65", "1.5", "12X", "1:99", HUGE, True], ids=short_id
)
def test_parse_count_refuses(text: Any) -> None:
    with pytest.raises(OptionError) as error:
        parse_count(text, "--gpus")
    message = assert_one_line(error)
    assert message.startswith("--gpus ")
    assert "whole number from 1 to 64" in message


def test_build_request_parses_every_option() -> None:
    request = build_request(gpus="2", time="30:00", mem="8G", name="train-1", command=["x"])
    assert request == Request(
        gpus=2, slices=0, time_limit=1800, mem=8 * 1024**3, name="train-1", command=("x",)
    )
    assert request.whole_gpus
    sliced = build_request(slices="2")
    assert (sliced.gpus, sliced.slices, sliced.whole_gpus) == (1, 2, False)
    assert build_request() == Request()


def test_build_request_refuses_gpus_with_slices() -> None:
    with pytest.raises(OptionError, match="--gpus and --slices") as error:
        build_request(gpus="1", slices="1")
    assert_one_line(error)
    with pytest.raises(OptionError, match="--gpus and --slices"):
        Request(gpus=2, slices=1)


@pytest.mark.parametrize("option", ["gpus", "slices", "time", "mem"])
def test_build_request_reports_the_bad_option(option: str) -> None:
    with pytest.raises(OptionError, match=f"^--{option} ") as error:
        build_request(**{option: "12X"})
    assert_one_line(error)


@pytest.mark.parametrize(
    "name", ["", "-job", ".hidden", "a b", "a/b", "job\n", "x" * 65, "naïve", "a;rm"]
)
def test_bad_name_refused(name: str) -> None:
    with pytest.raises(OptionError, match=r"^--name ") as error:
        build_request(name=name)
    assert_one_line(error)


@pytest.mark.parametrize("name", ["a", "job", "Train_1.2:x+y-z", "x" * 64])
def test_good_name_accepted(name: str) -> None:
    assert build_request(name=name).name == name


# Request.from_json


def test_from_json_round_trips_to_json() -> None:
    request = Request(gpus=2, time_limit=60, mem=1024, name="n", command=("python", "-c", "1"))
    document = request.to_json()
    assert document["command"] == ["python", "-c", "1"]
    assert Request.from_json(document) == request
    assert Request.from_json({}) == Request()
    assert "detached" not in document  # an older broker refuses fields it does not know
    detached = Request(command=("jupyterhub-singleuser",), detached=True)
    assert detached.to_json()["detached"] is True
    assert Request.from_json(detached.to_json()) == detached


@pytest.mark.parametrize(
    "document",
    [
        {"gpus": 1, "priority": 10},
        {"uid": 0},
        {"gpus": "2"},
        {"gpus": 1.0},
        {"gpus": True},
        {"gpus": 0},
        {"gpus": -1},
        {"gpus": 65},
        {"slices": False},
        {"slices": -1},
        {"gpus": 2, "slices": 1},
        {"time_limit": True},
        {"time_limit": "1h"},
        {"time_limit": 0},
        {"time_limit": MAX_TIME_SECONDS + 1},
        {"mem": False},
        {"mem": -5},
        {"mem": 0},
        {"name": 5},
        {"name": "bad name"},
        {"name": "job\n"},
        {"command": "python train.py"},
        {"command": ("python",)},
        {"command": ["python", 3]},
        {"command": ["python", None]},
        {"command": ["python", b"x"]},
        {"command": ["bad\x00arg"]},
        {"command": ["\ud800"]},
        {"command": ["x"] * (MAX_COMMAND_ARGS + 1)},
        {"command": ["x" * (MAX_COMMAND_BYTES + 1)]},
        {"command": ["é" * (MAX_COMMAND_BYTES // 2 + 1)]},
        {"detached": 1},
        {"detached": "yes"},
    ],
    ids=short_id,
)
def test_from_json_refuses(document: dict[str, Any]) -> None:
    with pytest.raises(OptionError) as error:
        Request.from_json(document)
    assert_one_line(error)


@pytest.mark.parametrize("document", [[], "gpus=1", None, 3])
def test_from_json_refuses_non_objects(document: Any) -> None:
    with pytest.raises(OptionError, match="JSON object"):
        Request.from_json(document)


def test_from_json_names_unknown_fields() -> None:
    with pytest.raises(OptionError, match=r"unknown field\(s\) in request: priority, uid$"):
        Request.from_json({"uid": 0, "priority": 1, "gpus": 1})


def test_from_json_accepts_limits() -> None:
    command = ["x"] * MAX_COMMAND_ARGS
    assert Request.from_json({"command": command}).command == tuple(command)
    big = ["x" * MAX_COMMAND_BYTES]
    assert Request.from_json({"command": big}).command == tuple(big)
    assert Request.from_json({"gpus": None, "slices": None}) == Request()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["gpus", "slices", "time_limit", "mem", "name", "command", "other"]),
        json_values,
    )
)
def test_from_json_only_raises_option_error(document: dict[str, Any]) -> None:
    try:
        request = Request.from_json(document)
    except OptionError as error:
        assert len(str(error).splitlines()) == 1
    else:
        assert 1 <= request.gpus <= 64
        assert all(isinstance(arg, str) for arg in request.command)


def test_gpu_mem_parsed_and_sent_only_when_set() -> None:
    request = build_request(gpu_mem="10G")
    assert request.gpu_mem == 10 * 1024**3
    assert request.to_json()["gpu_mem"] == 10 * 1024**3
    assert Request.from_json(request.to_json()) == request
    assert "gpu_mem" not in build_request().to_json()  # an older broker refuses unknown keys
    assert request.describe() == "10.0 GiB of one GPU"


def test_gpu_mem_refused_with_gpus_or_slices_or_out_of_range() -> None:
    for kwargs in ({"gpus": "2"}, {"slices": "1"}):
        with pytest.raises(OptionError, match="--gpu-mem asks for memory of one GPU"):
            build_request(gpu_mem="8G", **kwargs)
    with pytest.raises(OptionError, match="--gpu-mem"):
        build_request(gpu_mem="lots")
    with pytest.raises(OptionError, match="gpu_mem must be an integer"):
        Request.from_json({"gpu_mem": "8G"})
