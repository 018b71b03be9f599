"""Many visitors at once, and Stop: 20 public sessions merging, scoring and walking curves concurrently
get exactly what the same requests get one by one (no loss, no cross-talk); a stopped job stops using
the CPU within 2 s and the queue moves on."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import app_client, running_app
from .test_public import merge

pytestmark = pytest.mark.integration  # end to end and slow: deselect with -m 'not integration'

gradio_client = pytest.importorskip("gradio_client")
psutil = pytest.importorskip("psutil")

SESSIONS = 20


@pytest.fixture()
def app_url(public_home):
    with running_app() as url:
        yield url


def visit(url: str, i: int) -> dict:
    """One visitor: a weighted merge of its own, scored, and a curve between the two zoo models."""
    me = app_client(url)
    weights = f"{i + 1},{SESSIONS - i}"  # each visitor's merge differs
    merge(me, out=f"m{i}", params={"weights": weights})
    scores = me.predict(f"merges/m{i}", ["sst2"], "dev", 16, api_name="/evaluate")
    _, summary, _, _ = me.predict("pico-sst2", "pico-cola", ["sst2"], 3, "line", 16, "", "", [], 10,
                                  api_name="/curve")
    row = dict(zip(scores["headers"], scores["data"][0]))
    return {"weights": weights, "score": row["score"], "loss": row["loss"], "curve": summary}


def test_twenty_sessions_at_once_match_the_same_requests_one_by_one(app_url, public_home):
    with ThreadPoolExecutor(SESSIONS) as pool:
        together = list(pool.map(lambda i: visit(app_url, i), range(SESSIONS)))
    alone = [visit(app_url, i) for i in (0, 7, SESSIONS - 1)]  # new sessions, one at a time
    for i, expected in zip((0, 7, SESSIONS - 1), alone):
        assert together[i] == expected
    folders = sorted(p for p in (public_home / "sessions").glob("*") if p.is_dir())
    results = sorted(m.name for f in folders for m in (f / "merges").glob("m*"))
    assert len(results) == SESSIONS + 3 and len(set(results)) == SESSIONS  # every merge kept, in its own session
    assert all(len(list((f / "merges").glob("m*"))) == 1 for f in folders if (f / "merges").exists())


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def test_stop_ends_the_work_and_the_queue_moves_on(app_url, public_home, monkeypatch):
    monkeypatch.setenv("MERGELAB_MAX_POINTS", "51")  # limits are read per request: allow a long curve
    monkeypatch.setenv("MERGELAB_MAX_EXAMPLES", "100000")
    me, other = app_client(app_url), app_client(app_url)
    process = psutil.Process()
    spent = _cpu_seconds(process)
    # a long curve: 51 points (the slider's most) over the whole SST-2 dev set
    long_job = me.submit("pico-sst2", "pico-cola", ["sst2"], 51, "line", 100000, "", "", [], 10, api_name="/curve")
    deadline = time.monotonic() + 120
    while _cpu_seconds(process) - spent < 3 and time.monotonic() < deadline:  # set up and walking its points
        time.sleep(0.1)
    waiting = other.submit("pico-sst2", ["sst2"], "dev", 8, api_name="/evaluate")  # queued behind it (one slot)
    time.sleep(1.0)
    assert not long_job.done() and not waiting.done()
    assert me.predict(api_name="/stop") == "Stopped."
    stopped_at = time.monotonic()
    while not long_job.done() and time.monotonic() - stopped_at < 10:
        time.sleep(0.01)
    ended = time.monotonic() - stopped_at
    assert ended < 2, f"the stopped curve ran on for {ended:.2f} s"
    with pytest.raises(Exception, match="stopped before it finished"):
        long_job.result(timeout=1)
    waiting.result(timeout=30)  # the queued request ran
    queue_moved = time.monotonic() - stopped_at
    before = _cpu_seconds(process)
    time.sleep(1.0)
    idle = _cpu_seconds(process) - before
    assert queue_moved < 10, queue_moved
    assert idle < 0.3, f"{idle:.2f} s of CPU in the second after the queue emptied"  # nothing runs on


def test_stop_touches_only_the_callers_jobs(app_url, public_home):
    me, other = app_client(app_url), app_client(app_url)
    job = other.submit("pico-sst2", "pico-cola", ["sst2"], 5, "line", 16, "", "", [], 10, api_name="/curve")
    me.predict(api_name="/stop")
    _, summary, status, _ = job.result(timeout=60)
    assert status.startswith("Done")
    assert threading.active_count() < 200
