"""Public mode (a Hugging Face Space): the app driven through gradio_client as an anonymous visitor.
Models are names, outputs are names inside the visitor's session folder under a quota, requests are
bounded, the zoo build needs the admin token, and nothing a visitor sees holds a server path."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from .conftest import app_client, copy_model, running_app

gradio_client = pytest.importorskip("gradio_client")
AppError = gradio_client.exceptions.AppError


@pytest.fixture()
def visitor(public_home):
    with running_app() as url:
        yield app_client(url)


def merge(client, models=("pico-sst2", "pico-cola"), out="", **kwargs):
    from merging_core.arch import GROUPS

    args = {"models": list(models), "base": "", "method": "average", "params": {}, "components": list(GROUPS),
            "fallback": "average", "heads": "auto", "limit": 8, "compare": False, "multitask": "", "out": out,
            **kwargs}
    return client.predict(**args, api_name="/merge")


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def session_folders(home: Path) -> list[Path]:
    return sorted(p for p in (home / "sessions").glob("*") if p.is_dir())


def test_outputs_are_names_inside_the_session(visitor, public_home):
    table, status, files = merge(visitor, out="avg")
    [folder] = session_folders(public_home)
    assert (folder / "merges" / "avg" / "model.safetensors").is_file()
    assert "merges/avg" in status and str(public_home) not in status
    names = sorted(Path(f).name for f in files)
    assert names == ["avg.zip", "merge_config.json"]
    zipped = next(f for f in files if f.endswith(".zip"))
    assert "model.safetensors" in zipfile.ZipFile(zipped).namelist()
    config = Path(next(f for f in files if f.endswith(".json"))).read_text()
    assert str(public_home) not in config  # no server path in what the visitor downloads
    # the session's result is a model the visitor can pick by name
    scores = visitor.predict("merges/avg", ["sst2"], "dev", 4, api_name="/evaluate")
    assert scores["data"][0][2] == 4


@pytest.mark.parametrize("out", ["/tmp/evil", "../zoo/planted", "~/x", "a/b", "..", ".hidden", "x" * 65, "a b"])
def test_an_output_path_is_refused_and_nothing_is_written(out, visitor, public_home):
    before = files_under(public_home / "zoo")
    with pytest.raises(AppError, match="^Output folder: output name .* must be a plain name") as caught:
        merge(visitor, out=out)
    assert str(public_home) not in str(caught.value)
    assert files_under(public_home / "zoo") == before
    assert not Path("/tmp/evil").exists()


@pytest.mark.parametrize("model", ["/etc", "../zoo/pico-sst2", "~", "./pico-sst2", "sentence-transformers/x",
                                   "/tmp", "zoo/pico-sst2", "merges/nothing"])
def test_a_server_path_or_unknown_name_is_refused_alike(model, visitor, public_home):
    with pytest.raises(AppError, match="is not available here") as caught:
        visitor.predict(model, ["sst2"], "dev", 4, api_name="/evaluate")
    text = str(caught.value)
    assert str(public_home) not in text and "/tmp" not in text.replace("'tmp'", "") and "\n" not in text


def test_the_zoo_build_needs_the_admin_token(visitor, public_home, monkeypatch):
    with pytest.raises(AppError, match="^Admin token: building the zoo is off"):
        visitor.predict("tiny", "", api_name="/zoo_build")
    assert not (public_home / "zoo" / "stsb-tiny").exists()


def test_the_admin_may_build(public_home, pico, monkeypatch):
    import merging_core as ml

    copy_model(pico(None), public_home / "zoo" / "pico-bare")  # public mode: the base is a zoo name too
    (ml.zoo.RECIPES / "tiny.yaml").write_text("defaults: {base: pico-bare, steps: 2, batch_size: 4, eval_limit: 8}\n"
                                             "models:\n  stsb-tiny: {task: stsb}\n")
    monkeypatch.setenv("MERGELAB_ADMIN_TOKEN", "s3cret")
    with running_app() as url:
        client = app_client(url)
        with pytest.raises(AppError, match="needs the admin token"):
            client.predict("tiny", "guess", api_name="/zoo_build")
        table, note = client.predict("tiny", "s3cret", api_name="/zoo_build")
        assert "Built 1 model(s)" in note


def test_requests_are_bounded(visitor, public_home):
    with pytest.raises(AppError, match=r"^Limit: 100000 is more than this app allows \(500\)"):
        visitor.predict("pico-sst2", ["sst2"], "dev", 100_000, api_name="/evaluate")
    with pytest.raises(AppError, match=r"more than this app allows \(6\)"):
        merge(visitor, models=["pico-sst2"] * 7)


def test_the_quota_bounds_a_session(visitor, public_home, monkeypatch):
    monkeypatch.setenv("MERGELAB_MAX_SESSION_MB", "1")  # a pico merge is ~4 MB
    merge(visitor, out="first")
    with pytest.raises(AppError, match="MB a session may keep"):
        merge(visitor, out="second")
    [folder] = session_folders(public_home)
    assert not (folder / "merges" / "second").exists()


def test_model_picker_labels_hold_names_only(public_home, pico):
    """Each choice's label says family, size and task; a session's own result is labelled by its name, never by
    where it is kept."""
    import json
    from types import SimpleNamespace

    from views.common import model_choices
    from views.session import session

    request = SimpleNamespace(session_hash="one-visitor")
    result = copy_model(pico("sst2", seed=3), session(request).folder / "merges" / "mine")
    (result / "mergelab.json").write_text(json.dumps({"task": "sst2", "kind": "merge"}))
    labels = {name: label for label, name in model_choices(request)}
    assert list(labels) == ["pico-cola", "pico-sst2", "minilm", "merges/mine"]
    assert labels["merges/mine"].startswith("merges/mine · bert · ") and labels["merges/mine"].endswith(" · SST-2")
    assert labels["pico-cola"].endswith(" · CoLA")
    assert not any(str(public_home) in label or "/" in label.replace("merges/mine", "") for label in labels.values())


def test_sessions_are_separate(public_home):
    with running_app() as url:
        one, two = app_client(url), app_client(url)
        merge(one, out="mine")
        with pytest.raises(AppError, match="is not available here"):
            two.predict("merges/mine", ["sst2"], "dev", 4, api_name="/evaluate")
        assert len(session_folders(public_home)) >= 1


def test_no_hub_request_for_an_unlisted_id(visitor, monkeypatch):
    """An unknown id is refused before any download (the hub is unreachable here, so a request would
    stall or fail with a connection error instead of this message)."""
    for model in ("bert-base-uncased", "org/model"):
        with pytest.raises(AppError, match="is not available here"):
            visitor.predict(model, ["sst2"], "dev", 4, api_name="/evaluate")


def test_the_engine_refuses_paths_in_public_mode(public_home, monkeypatch, tmp_path):
    import merging_core as ml

    for spec in (str(public_home / "zoo" / "pico-sst2"), "/etc", str(tmp_path)):
        with pytest.raises(ml.MergeLabError, match="is not available here"):
            ml.resolve(spec)
    assert ml.resolve("pico-sst2").kind == "zoo"
    monkeypatch.setenv("MERGELAB_HUB_ALLOW", "org/allowed")
    assert ml.resolve("org/allowed").kind == "hub"
    assert not ml.settings.hub_allowed()  # no data from the hub either
    monkeypatch.setenv("MERGELAB_PUBLIC", "0")
    assert ml.resolve(str(public_home / "zoo" / "pico-sst2")).kind == "local"
    assert os.environ.get("SPACE_ID") is None or ml.settings.public_mode() is False

