"""The run history over HTTP (what any client can send): a run is one of the listed ones, a step one of its
copies, the name a valid one that is not being trained."""

from __future__ import annotations

import time

import pytest
from browser_app import running_app
from conftest import write_images
from gradio_client import Client

from gradio_client.exceptions import AppError

from test_server import timed_poll, train_kwargs


def refused(client: Client, api_name: str, *args) -> str:
    with pytest.raises(AppError) as info:
        client.predict(*args, api_name=api_name)
    return str(info.value)


@pytest.fixture
def trained(studio, tmp_path, cache_dir):
    """`tmp/app` with embedding 'hist' trained 4 steps (copies at 2 and 4) before the app starts."""
    from tinv_ui import runs
    from tinv_ui.config import CreateConfig, Paths, TrainConfig
    from tinv_ui.create import create_embedding
    from tinv_ui.library import EmbeddingLibrary
    from tinv_ui.training import train

    paths = Paths(tmp_path / "app" / "embeddings", tmp_path / "app" / "outputs", tmp_path / "app" / "models", cache_dir)
    write_images(tmp_path / "data", 2)
    create_embedding(studio, CreateConfig(name="hist", initializer="painting"), paths.embeddings_dir)
    cfg = TrainConfig(embedding="hist", dataset_dir=str(tmp_path / "data"), template="subject_filewords", max_steps=4,
                      width=64, height=64, save_every=2, preview_every=0, batch_size=1)
    list(train(studio, cfg, EmbeddingLibrary(paths.embeddings_dir), paths))
    [run] = runs.list_runs(runs.log_root(paths.outputs_dir))
    return paths, run


def test_runs_steps_and_names_from_a_client_are_checked_and_the_trained_embedding_is_kept(trained, tmp_path, cache_dir):
    from tinv_ui import formats, runs

    paths, run = trained
    with running_app(tmp_path / "app", cache_dir) as app:
        client = Client(app.url, verbose=False)
        try:
            client.predict(None, api_name="/list_runs")
            for key in ("../../etc", str(run.folder), f"{runs.run_key(run)}/..", "2020-01-01/hist"):
                assert "not in the list" in refused(client, "/open_run", key)  # Gradio's choices check
            assert "not in the list" in refused(client, "/use_run_step", 2, "fresh", False)  # no run opened
            client.predict(runs.run_key(run), api_name="/open_run")
            assert "not in the list" in refused(client, "/use_run_step", 3, "fresh", False)
            assert "contains '/'" in refused(client, "/use_run_step", 2, "../fresh", True)
            # What changed on disk since the run was opened is checked again: the run and its copies are re-read.
            formats.optim_path(run.copies[4]).unlink()
            run.copies[4].unlink()
            assert "step: run 'hist' has no copy at step 4; its copies are at steps 2." in refused(
                client, "/use_run_step", 4, "fresh", False)

            started = client.predict(**train_kwargs(client, embedding="hist", dataset_dir=str(tmp_path / "data"),
                                                    max_steps=100_000), api_name="/start_training")
            assert started == "Training hist started."
            try:
                message = refused(client, "/use_run_step", 2, "HIST", True)
                assert "'hist' is being trained (the run at step " in message and "interrupt that run" in message
                used = client.predict(2, "fresh", False, api_name="/use_run_step")
                assert used == "Step 2 of hist is now embeddings/fresh.pt."
            finally:
                client.predict(api_name="/interrupt_training")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and "interrupted" not in timed_poll(app)[1]:
                time.sleep(0.3)
            run.folder.rename(run.folder.with_name("moved"))
            assert "run: that run is not in the list" in refused(client, "/use_run_step", 2, "other", False)
        finally:
            client.close()
    assert [p for p in tmp_path.rglob("*fresh*") if p.parent != paths.embeddings_dir] == []
    assert sorted(p.name for p in paths.embeddings_dir.iterdir() if "fresh" in p.name) == ["fresh.pt", "fresh.pt.optim"]
