"""The model the page shows is the model loaded: after a Load and a reload (or in a new tab), and when the app
started without the model it was asked for (a broken `--model` file).

Each test starts its own `python app.py` (the loaded model is app-wide state).
"""

from __future__ import annotations

from browser_app import browser_marks, chromium, field, open_page, pick_option, running_app

pytestmark = browser_marks


def _write_other_model(folder, cache_dir) -> int:
    """A diffusers folder of the tiny model with another native size and v-prediction; returns its size in px."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from tinv_ui.tiny_model import tiny_model_dir

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir(cache_dir), local_files_only=True, safety_checker=None)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "sample_size": 12})
    unet.load_state_dict(pipe.unet.state_dict())
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="v_prediction")
    StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return 12 * pipe.vae_scale_factor


def _expect_model_shown(page, label: str, status: str, size: int) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#tinv-model-status")).to_contain_text(status)
    expect(page.locator("#tinv-model-picker input")).to_have_value(label)
    for tab in ("Train", "Generate"):  # Gradio renders a tab's widgets when it is shown
        page.get_by_role("tab", name=tab).click()
        for side in ("width", "height"):
            expect(field(page, f"tinv-{tab.lower()}-{side}")).to_have_value(str(size))


def test_a_reloaded_page_and_a_new_tab_show_the_loaded_model_and_its_size(tmp_path, cache_dir):
    from playwright.sync_api import expect

    (tmp_path / "models").mkdir()
    size = _write_other_model(tmp_path / "models" / "other-v", cache_dir)
    assert size != 64  # the tiny model's native size, which the page was built with
    with running_app(tmp_path, cache_dir) as app, chromium() as browser:
        page = open_page(browser, app.url)
        _expect_model_shown(page, "tiny test model (random weights)", "Loaded tiny test model (random weights)", 64)
        pick_option(page, "tinv-model-picker", "other-v")
        page.get_by_role("button", name="Load", exact=True).click()
        status = f"Loaded other-v (custom, 32-wide text, v-prediction) on cpu · float32 · native {size}px"
        expect(page.locator("#tinv-model-status")).to_contain_text(status, timeout=60_000)
        page.reload(wait_until="load")
        _expect_model_shown(page, "other-v", status, size)
        _expect_model_shown(open_page(browser, app.url), "other-v", status, size)


def test_a_broken_model_file_at_start_serves_the_page_on_tiny_and_says_why(tmp_path, cache_dir):
    from playwright.sync_api import expect

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "broken.safetensors").write_bytes(b"\x00" * 100)
    with running_app(tmp_path, cache_dir, "--model", "models/broken.safetensors") as app, chromium() as browser:
        page = open_page(browser, app.url)
        status = page.locator("#tinv-model-status")
        expect(status).to_contain_text("Loaded tiny test model (random weights)")
        expect(status).to_contain_text("Not loaded: broken.safetensors is not a readable .safetensors file")
        log = app.log_text()
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if "broken.safetensors" in line]
    assert len(lines) == 1, lines
    assert "ERROR" in lines[0] and "started with tiny test model (random weights) instead" in lines[0]
