"""Progress output: plain log lines when stderr is not a terminal, a rich bar on one, nothing
when RANKWISE_PROGRESS turns it off. A fake clock drives the timing (no sleeps)."""

from __future__ import annotations

import io
import re

import pytest

from rankwise import progress
from rankwise.progress import Bar, stage, track


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def wanted(monkeypatch):
    """Progress on, as for a user who did not set RANKWISE_PROGRESS."""
    monkeypatch.delenv("RANKWISE_PROGRESS", raising=False)
    monkeypatch.delenv("TERM", raising=False)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


@pytest.mark.parametrize("value, expected", [(None, True), ("1", True), ("0", False), ("false", False), ("off", False), ("no", False)])
def test_enabled_means_wanted_not_a_terminal(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("RANKWISE_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("RANKWISE_PROGRESS", value)
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a TTY: still wanted
    assert progress.enabled() is expected


def test_log_lines_at_start_every_tenth_and_close(wanted):
    log, clock = io.StringIO(), FakeClock()
    bar = Bar(120, "calibrate", stream=log, clock=clock)
    assert lines(log) == ["[rankwise] calibrate 0/120 (0%) 0:00:00 elapsed"]
    for _ in range(30):
        clock.now += 1 / 3
        bar.update(1)
    # 12 items are 10%: lines at 12 and 24, none in between
    assert [re.search(r"\d+/120", ln).group() for ln in lines(log)] == ["0/120", "12/120", "24/120"]
    assert lines(log)[2] == "[rankwise] calibrate 24/120 (20%) 0:00:08 elapsed, ~0:00:32 left"
    for _ in range(90):
        bar.update(1)
    bar.close()
    assert len(lines(log)) == 11  # start, 10%..90%, and the final line (not a second 100%)
    assert lines(log)[-1] == "[rankwise] calibrate 120/120 (100%) 0:00:10 elapsed, done"
    bar.close()  # closing twice prints nothing more
    assert len(lines(log)) == 11


def test_log_line_every_10_seconds_when_slow(wanted):
    log, clock = io.StringIO(), FakeClock()
    with Bar(10_000, "train", stream=log, clock=clock) as bar:
        for _ in range(5):
            clock.now += 4
            bar.update(1)
    # 4 s per item, far below 10% each: a line once 10 s have passed (at 12 s), then the close
    counts = [int(re.search(r"(\d+)/10000", ln).group(1)) for ln in lines(log)]
    assert counts == [0, 3, 5]
    assert "0:00:12 elapsed, ~" in lines(log)[1] and lines(log)[-1].endswith("0:00:20 elapsed, stopped")


def test_log_lines_show_live_fields_and_unknown_total(wanted):
    log, clock = io.StringIO(), FakeClock()
    with Bar(None, "decode", stream=log, clock=clock) as bar:
        bar.set(loss=2.3456789, tok_s=850)
        clock.now += 11
        bar.update(7)
    assert lines(log)[1] == "[rankwise] decode 7 0:00:11 elapsed  loss=2.346  tok_s=850"
    assert lines(log)[-1] == "[rankwise] decode 7 0:00:11 elapsed, done  loss=2.346  tok_s=850"


def test_nothing_when_turned_off_or_not_shown(monkeypatch):
    log = io.StringIO()
    monkeypatch.setenv("RANKWISE_PROGRESS", "0")
    with Bar(5, "calibrate", stream=log) as bar:
        bar.update(5)
    with stage("load", stream=log):
        pass
    monkeypatch.setenv("RANKWISE_PROGRESS", "1")
    with Bar(5, "calibrate", show=False, stream=log) as bar:
        bar.update(5)
    assert log.getvalue() == ""


def test_rich_bar_on_a_terminal(wanted):
    term = FakeTerminal()
    with Bar(4, "decompose", stream=term) as bar:
        bar.update(4)
    out = term.getvalue()
    assert "decompose" in out and "4/4" in out
    assert "[rankwise]" not in out  # not the log format


def test_default_stream_is_stderr_read_at_creation(wanted, monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    assert list(track([1, 2], "items")) == [1, 2]
    assert lines(log)[0].startswith("[rankwise] items 0/2 (0%)")
    assert lines(log)[-1].startswith("[rankwise] items 2/2 (100%)")


def test_stage_lines_and_failure(wanted):
    log, clock = io.StringIO(), FakeClock()
    with stage("load smollm2", stream=log, clock=clock):
        clock.now += 75
    with pytest.raises(KeyError), stage("save", stream=log, clock=clock):
        raise KeyError("x")
    assert lines(log) == [
        "[rankwise] load smollm2 ...",
        "[rankwise] load smollm2 done in 0:01:15",
        "[rankwise] save ...",
        "[rankwise] save failed after 0:00:00",
    ]
