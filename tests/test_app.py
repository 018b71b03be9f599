"""The Gradio app built in-process and driven through gradio_client, as a remote user would."""

from __future__ import annotations

import json
import warnings

import pytest

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture()
def client(app_home):
    from views import build_app

    demo = build_app()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield gradio_client.Client(url, verbose=False)
    demo.close()


def _rows(table: dict) -> list[dict]:
    return [dict(zip(table["headers"], row)) for row in table["data"]]


def test_endpoints_are_named(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/evaluate", "/zoo_list", "/zoo_build"} <= names


def test_zoo_list_and_evaluate(client):
    zoo = _rows(client.predict(api_name="/zoo_list"))
    assert [r["name"] for r in zoo] == ["pico-sst2"] and zoo[0]["score"] == 0.5
    rows = _rows(client.predict("pico-sst2", ["sst2", "emotion"], "dev", 16, api_name="/evaluate"))
    assert rows[0]["task"] == "sst2" and rows[0]["n"] == 16 and rows[0]["metric"] == "accuracy"
    assert 0.0 <= rows[0]["score"] <= 1.0
    assert "6" in rows[1]["note"]  # the emotion row explains why it was skipped


def test_bad_model_is_an_app_error(client):
    with pytest.raises(Exception, match="does not exist"):
        client.predict("./not-a-model", ["sst2"], "dev", 4, api_name="/evaluate")


def test_zoo_build_from_the_app(client):
    table, note = client.predict("tiny", api_name="/zoo_build")
    assert "Built 1 model(s)" in note
    assert {r["name"] for r in _rows(table)} == {"pico-sst2", "stsb-tiny"}
