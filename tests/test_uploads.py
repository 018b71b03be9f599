"""Uploads of a user's own checkpoint: accepted only when every file is one MergeLab reads without running
anything, and the weights fit their config; refused with one line naming the file or field (never a server
path), with nothing left behind. Then, in public mode, the upload is one of the visitor's models."""

from __future__ import annotations

import json
import math
import shutil
import struct
import warnings
from pathlib import Path

import pytest

import merging_core as ml
from merging_core.uploads import import_upload, notes

MB = 2**20


@pytest.fixture()
def upload(pico, tmp_path):
    """A copy of a pico SST-2 checkpoint's files in a folder of their own (to break one at a time)."""
    folder = tmp_path / "incoming"
    shutil.copytree(pico("sst2"), folder)
    return folder


@pytest.fixture()
def out(tmp_path) -> Path:
    return tmp_path / "home" / "uploads" / "mine"


def files(folder: Path) -> list[Path]:
    """What a user picks from a checkpoint folder: its visible files."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def refused(upload_files, out: Path, tmp_path: Path, *, max_bytes: int = 100 * MB) -> str:
    """The refusal's text, checked: one line, no server path, and nothing written."""
    with pytest.raises(ml.MergeLabError) as caught:
        import_upload(upload_files, out, max_bytes=max_bytes)
    error = caught.value
    text = str(error)
    assert error.param == "files"
    assert "\n" not in text
    assert str(tmp_path) not in text and tmp_path.parent.name not in text and "/tmp" not in text
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # no staging folder left either
    return text


# -- accepted ---------------------------------------------------------------------------------------------


def test_a_valid_upload_is_accepted_and_usable(upload, out):
    path = import_upload(files(upload), out, max_bytes=100 * MB)
    assert path == out
    assert {p.name for p in path.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert notes(path) == []
    assert [p.name for p in path.parent.iterdir()] == ["mine"]  # no staging folder left
    result = ml.evaluate(str(path), "sst2", limit=4)
    assert result["n"] == 4 and math.isfinite(result["loss"])


@pytest.mark.parametrize("task", [None, "wikitext2", "conll2003"])
def test_every_head_kind_is_accepted(task, pico, out):
    """A bare encoder (no pooler needed), an MLM model (its decoder tied to the embeddings, so absent from the
    file) and a token tagger."""
    path = import_upload(files(pico(task)), out, max_bytes=100 * MB)
    assert (path / "model.safetensors").is_file()


def test_without_tokenizer_files_minilm_s_tokenizer_is_added(upload, out):
    path = import_upload([upload / "model.safetensors", upload / "config.json"], out, max_bytes=100 * MB)
    assert (path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file()
    assert any("MiniLM" in n for n in notes(path))
    assert ml.evaluate(str(path), "sst2", limit=4)["n"] == 4


def test_without_tokenizer_files_another_vocabulary_is_refused(tmp_path, out):
    from .conftest import make_pico

    folder = make_pico(tmp_path / "small-vocab", "sst2", vocab_size=1000)
    text = refused([folder / "model.safetensors", folder / "config.json"], out, tmp_path)
    assert "no tokenizer files" in text and "vocab_size" in text


# -- refused: the weights file ------------------------------------------------------------------------------


def test_a_truncated_safetensors_file_is_refused(upload, out, tmp_path):
    data = (upload / "model.safetensors").read_bytes()
    (upload / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "model.safetensors is not a valid safetensors file" in refused(files(upload), out, tmp_path)


def test_a_garbage_header_is_refused(upload, out, tmp_path):
    data = (upload / "model.safetensors").read_bytes()
    (upload / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + data[8:])
    assert "model.safetensors is not a valid safetensors file" in refused(files(upload), out, tmp_path)


def test_a_nan_weight_is_refused(upload, out, tmp_path):
    def poison(state):
        state["bert.encoder.layer.1.output.dense.weight"][3, 5] = float("nan")

    edit_weights(upload, poison)
    text = refused(files(upload), out, tmp_path)
    assert "model.safetensors" in text and "bert.encoder.layer.1.output.dense.weight" in text and "NaN" in text


def test_an_infinite_weight_is_refused(upload, out, tmp_path):
    def poison(state):
        state["classifier.bias"][0] = float("inf")

    edit_weights(upload, poison)
    text = refused(files(upload), out, tmp_path)
    assert "'classifier.bias'" in text and "infinite" in text


def test_shapes_that_disagree_with_the_config_are_refused(upload, out, tmp_path):
    edit_config(upload, hidden_size=64)
    text = refused(files(upload), out, tmp_path)
    assert "shapes disagree with config.json" in text and "[32]" in text


def test_a_missing_layer_is_refused(upload, out, tmp_path):
    edit_weights(upload, lambda state: [state.pop(k) for k in list(state) if ".layer.1." in k])
    text = refused(files(upload), out, tmp_path)
    assert "model.safetensors lacks the tensors of layer 1" in text and "num_hidden_layers" in text


def test_a_missing_tensor_is_refused(upload, out, tmp_path):
    edit_weights(upload, lambda state: state.pop("bert.encoder.layer.0.attention.self.key.bias"))
    assert "encoder.layer.0.attention.self.key.bias" in refused(files(upload), out, tmp_path)


def test_an_unknown_tensor_is_refused(upload, out, tmp_path):
    import torch

    edit_weights(upload, lambda state: state.update({"bert.encoder.layer.0.backdoor.weight": torch.zeros(4)}))
    text = refused(files(upload), out, tmp_path)
    assert "no place for" in text and "bert.encoder.layer.0.backdoor.weight" in text


def test_a_tensor_name_cannot_break_the_message_into_lines(upload, out, tmp_path):
    import torch

    edit_weights(upload, lambda state: state.update({"evil\nname" + "x" * 500: torch.zeros(4)}))
    assert "evil\\nname" in refused(files(upload), out, tmp_path)


def test_a_bool_tensor_is_refused(upload, out, tmp_path):
    import torch

    edit_weights(upload, lambda state: state.update({"flags": torch.zeros(4, dtype=torch.bool)}))
    text = refused(files(upload), out, tmp_path)
    assert "'flags'" in text and "BOOL" in text


# -- refused: the config -----------------------------------------------------------------------------------


def test_a_config_with_auto_map_is_refused(upload, out, tmp_path):
    edit_config(upload, auto_map={"AutoModel": "modeling_evil.EvilModel"})
    text = refused(files(upload), out, tmp_path)
    assert "config.json" in text and "auto_map" in text


def test_an_unsupported_model_type_is_refused(upload, out, tmp_path):
    edit_config(upload, model_type="gpt2")
    text = refused(files(upload), out, tmp_path)
    assert "config.json" in text and "'gpt2' is not supported" in text


def test_a_config_that_is_not_json_is_refused(upload, out, tmp_path):
    (upload / "config.json").write_text("model_type: bert\n")
    assert "config.json is not valid JSON" in refused(files(upload), out, tmp_path)


def test_a_config_that_is_not_an_object_is_refused(upload, out, tmp_path):
    (upload / "config.json").write_text("[1, 2]")
    assert "config.json must hold a JSON object" in refused(files(upload), out, tmp_path)


def test_a_config_with_absurdly_many_layers_is_refused_before_building(upload, out, tmp_path):
    edit_config(upload, num_hidden_layers=10**6)
    assert "num_hidden_layers" in refused(files(upload), out, tmp_path)


def test_a_tokenizer_config_with_auto_map_is_refused(upload, out, tmp_path):
    (upload / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))
    text = refused(files(upload), out, tmp_path)
    assert "tokenizer_config.json" in text and "auto_map" in text


# -- refused: which files ----------------------------------------------------------------------------------


def test_pickle_weights_are_refused(upload, out, tmp_path):
    import torch

    torch.save({"x": torch.zeros(2)}, upload / "pytorch_model.bin")
    text = refused(files(upload), out, tmp_path)
    assert "'pytorch_model.bin' is not accepted" in text and "pickle" in text


def test_a_python_file_is_refused(upload, out, tmp_path):
    (upload / "modeling_evil.py").write_text("import os\nos.system('echo owned')\n")
    text = refused(files(upload), out, tmp_path)
    assert "'modeling_evil.py' is not accepted" in text and "code" in text


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json", "mergelab.json", "weights.pkl",
                                  "README.md"])
def test_other_files_are_refused(name, upload, out, tmp_path):
    (upload / name).write_text("{}")
    assert f"{name!r} is not accepted" in refused(files(upload), out, tmp_path)


def test_an_oversized_upload_is_refused(upload, out, tmp_path):
    text = refused(files(upload), out, tmp_path, max_bytes=1000)
    assert "the upload is" in text and "more than the 1000 bytes allowed" in text


def test_a_missing_config_is_refused(upload, out, tmp_path):
    text = refused([f for f in files(upload) if f.name != "config.json"], out, tmp_path)
    assert "config.json is missing" in text


def test_missing_weights_are_refused(upload, out, tmp_path):
    assert "model.safetensors is missing" in refused([upload / "config.json"], out, tmp_path)


def test_two_weights_files_are_refused(upload, pico, out, tmp_path):
    text = refused(files(upload) + [pico("sst2", seed=1) / "model.safetensors"], out, tmp_path)
    assert "model.safetensors was uploaded twice" in text


def test_sharded_weights_are_refused(upload, out, tmp_path):
    shutil.copy(upload / "model.safetensors", upload / "model-00002-of-00002.safetensors")
    text = refused(files(upload), out, tmp_path)
    assert "'model-00002-of-00002.safetensors' is not accepted" in text and "one file" in text


def test_nothing_uploaded_is_refused(out, tmp_path):
    assert "no files uploaded" in refused([], out, tmp_path)


# -- public mode, through the app -----------------------------------------------------------------------------


@pytest.fixture()
def visitor(app_home, monkeypatch):
    gradio_client = pytest.importorskip("gradio_client")
    from views import build_app

    monkeypatch.setenv("MERGELAB_PUBLIC", "1")
    monkeypatch.delenv("MERGELAB_ADMIN_TOKEN", raising=False)
    demo = build_app()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield gradio_client.Client(url, verbose=False, analytics_enabled=False)
    finally:
        demo.close()


def test_a_public_upload_is_one_of_the_visitor_s_models(visitor, app_home, upload, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    status = visitor.predict([handle_file(str(p)) for p in files(upload)], "mine", api_name="/upload")
    assert "uploads/mine" in status and str(app_home) not in status and "/tmp" not in status
    [folder] = [p for p in (app_home / "sessions").iterdir() if p.is_dir()]
    assert (folder / "uploads" / "mine" / "model.safetensors").is_file()
    scores = visitor.predict("uploads/mine", ["sst2"], "dev", 4, api_name="/evaluate")
    assert scores["data"][0][2] == 4

    evil = tmp_path / "modeling_evil.py"
    evil.write_text("print('owned')\n")
    with pytest.raises(AppError, match="Invalid file type"):  # Gradio refuses other extensions itself
        visitor.predict([handle_file(str(p)) for p in files(upload) + [evil]], "evil", api_name="/upload")
    adapter = tmp_path / "adapter_config.json"
    adapter.write_text("{}")
    with pytest.raises(AppError, match=r"^Checkpoint files: file 'adapter_config.json' is not accepted") as caught:
        visitor.predict([handle_file(str(p)) for p in files(upload) + [adapter]], "evil", api_name="/upload")
    assert str(tmp_path) not in str(caught.value) and "/tmp" not in str(caught.value)
    with pytest.raises(AppError, match=r"^Name: output name .* must be a plain name"):
        visitor.predict([handle_file(str(p)) for p in files(upload)], "../zoo/planted", api_name="/upload")
    with pytest.raises(AppError, match="already exists"):
        visitor.predict([handle_file(str(p)) for p in files(upload)], "mine", api_name="/upload")
    assert sorted(p.name for p in (folder / "uploads").iterdir()) == ["mine"]
    assert not (app_home / "zoo" / "planted").exists()


def test_the_upload_handler_in_local_mode(isolated_home, upload, monkeypatch):
    from views.uploads_tab import upload_model

    monkeypatch.setenv("MERGELAB_PUBLIC", "0")
    status = upload_model([str(p) for p in files(upload)], "mine")
    assert (isolated_home / "uploads" / "mine" / "model.safetensors").is_file()
    assert str(isolated_home / "uploads" / "mine") in status
