"""Dataset: listing and skip reasons, decoding, captions, buckets, alpha weights, latent cache, flips, sampler."""

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_images
from PIL import Image

from tinv_ui import dataset as ds
from tinv_ui.config import LatentSampling
from tinv_ui.dataset import (
    BucketBatchSampler,
    alpha_weight,
    build_latent_cache,
    caption_for,
    compile_filename_regex,
    load_dataset,
    pixels_to_tensor,
)
from tinv_ui.errors import ConfigError, DatasetError


def test_lists_images_and_reports_skipped_files_with_reasons(tmp_path):
    folder = tmp_path / "d"
    write_images(folder, 2, captions=True)
    (folder / "notes.txt").write_text("hello", encoding="utf-8")
    good = (folder / "000-a red thing number 0.png").read_bytes()
    (folder / "broken.png").write_bytes(good[: len(good) // 2])
    (folder / "sub").mkdir()
    (folder / ".DS_Store").write_bytes(b"\0\1")
    Image.new("RGB", (40, 30), "blue").save(folder / "photo.jpg")
    d = load_dataset(folder, (64, 64))
    assert [p.path.name for p in d.images] == ["000-a red thing number 0.png", "001-a red thing number 1.png", "photo.jpg"]
    reasons = dict(s.split(": ", 1) for s in d.skipped)
    assert set(reasons) == {"broken.png", "notes.txt", "sub"}  # sidecars and hidden files are not reported
    assert reasons["notes.txt"] == "not an image"
    assert reasons["broken.png"].startswith("cannot be decoded") and "truncated" in reasons["broken.png"]
    assert "folder" in reasons["sub"]
    assert all(i.size == (64, 64) for i in d.images)


def test_no_usable_image_is_a_dataset_error_listing_the_skipped(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"no usable image \(notes.txt: not an image\)"):
        load_dataset(folder, (64, 64))
    (folder / "notes.txt").unlink()
    with pytest.raises(DatasetError, match="folder is empty"):
        load_dataset(folder, (64, 64))
    with pytest.raises(DatasetError, match="is not a folder"):
        load_dataset(tmp_path / "missing", (64, 64))


def test_huge_png_is_skipped_and_huge_jpeg_is_decoded_smaller(tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "MAX_PIXELS", 200 * 200)
    Image.new("RGB", (800, 400), "red").save(tmp_path / "big.png")
    Image.new("RGB", (800, 400), "red").save(tmp_path / "big.jpg")
    d = load_dataset(tmp_path, None)  # keep_size, so the decoded size is visible
    assert [i.path.name for i in d.images] == ["big.jpg"]
    assert d.images[0].size == (200, 96)  # drafted to 1/4 (200x100), then rounded down to multiples of 8
    assert d.skipped == ("big.png: 800x400 is over the 200x200 pixel limit; downscale it first",)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (80, 64), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    d = load_dataset(tmp_path, None)
    assert d.images[0].size == (64, 80)


def test_palette_transparency_and_rgba_keep_alpha_only_when_asked(tmp_path):
    p = Image.new("P", (64, 64), 0)
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.paste(1, (0, 0, 32, 64))
    p.save(tmp_path / "pal.png", transparency=0)
    rgba = Image.new("RGBA", (64, 64), (10, 20, 30, 255))
    rgba.save(tmp_path / "rgba.png")
    d = load_dataset(tmp_path, (64, 64), keep_alpha=True)
    by = {i.path.name: i for i in d.images}
    assert by["pal.png"].image.mode == "RGB" and by["pal.png"].alpha is not None
    alpha = torch.tensor(list(by["pal.png"].alpha.getdata())).reshape(64, 64)
    assert alpha[:, :30].min() == 255 and alpha[:, 34:].max() == 0  # palette index 0 is transparent
    assert by["pal.png"].image.getpixel((10, 10)) == (0, 255, 0)  # RGB kept as is, not composited
    assert load_dataset(tmp_path, (64, 64)).images[0].alpha is None


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    arr = (torch.arange(64 * 64).reshape(64, 64) * 16).numpy().astype("uint16")
    Image.fromarray(arr).save(tmp_path / "g16.png")
    img = load_dataset(tmp_path, None).images[0].image
    assert img.mode == "RGB"
    assert 200 < img.getpixel((63, 63))[0] < 256 and img.getpixel((0, 0))[0] == 0


def test_keep_size_rounds_down_to_multiples_of_8_and_groups_buckets(tmp_path):
    for i, size in enumerate([(100, 70), (96, 64), (64, 64), (70, 66), (30, 200)]):
        Image.new("RGB", size, (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    d = load_dataset(tmp_path, None)
    assert [i.size for i in d.images] == [(96, 64), (96, 64), (64, 64), (64, 64)]
    assert d.buckets == {(96, 64): [0, 1], (64, 64): [2, 3]}
    assert d.skipped == ("4.png: 30x200 is too small to train at its own size (keep_size needs 64 px)",)
    resized = load_dataset(tmp_path, (64, 128))
    assert {i.size for i in resized.images} == {(64, 128)} and len(resized) == 5


@pytest.mark.parametrize(
    "encoded",
    [
        "tag a, tag ü\n".encode("utf-8"),
        b"\xef\xbb\xbf" + "tag a, tag ü".encode("utf-8"),
        "tag a, tag ü".encode("utf-16"),
        "tag a, tag ü".encode("latin-1"),
    ],
)
def test_sidecar_captions_in_any_encoding(tmp_path, encoded):
    Image.new("RGB", (8, 8)).save(tmp_path / "001-x.png")
    (tmp_path / "001-x.txt").write_bytes(encoded)
    assert caption_for(tmp_path / "001-x.png") == "tag a, tag ü"


def test_uppercase_sidecar_and_unreadable_caption(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "a.TXT").write_text("upper", encoding="utf-8")
    Image.new("RGB", (64, 64)).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("secret", encoding="utf-8")
    real = type(tmp_path).read_bytes

    def read_bytes(self):
        if self.name == "b.txt":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(type(tmp_path), "read_bytes", read_bytes)
    d = load_dataset(tmp_path, (64, 64))
    assert [(i.path.name, i.caption) for i in d.images] == [("a.png", "upper")]
    assert any(s.startswith("b.png: its caption b.txt cannot be read") for s in d.skipped)


def test_file_name_captions_strip_leading_numbers_then_apply_the_regex(tmp_path):
    p = tmp_path / "000001-1-a man in suit.png"
    assert caption_for(p) == "a man in suit"
    assert caption_for(p, compile_filename_regex(r"\w+"), ", ") == "a, man, in, suit"
    # groups do not change what is kept: whole matches are joined
    assert caption_for(p, compile_filename_regex(r"(m)\w+"), "+") == "man"
    assert caption_for(tmp_path / "12 cat.png") == "cat"
    with pytest.raises(ConfigError, match="filename_regex"):
        compile_filename_regex("(")


_CATASTROPHIC_REGEXES = r"""
import sys, time
from pathlib import Path
from tinv_ui.dataset import caption_for, compile_filename_regex
from tinv_ui.errors import ConfigError
long_name = Path(sys.argv[1]) / ("a" * 40 + " " + "ab " * 30 + "a" * 40 + "!.png")
for pattern in (r"(a+)+$", r"(\w+\s?)+$", r"(a|aa)+$"):
    t0 = time.monotonic()
    try:
        caption_for(long_name, compile_filename_regex(pattern))
        outcome = "matched"
    except ConfigError as e:
        outcome = str(e)
    print(f"{time.monotonic() - t0:.2f} {outcome}")
"""


def test_catastrophic_filename_regexes_are_bounded_and_named(tmp_path):
    """Backtracking patterns on a long file name end within a second, or fail naming filename_regex.

    Run in a child process: a backtracking `re` holds the GIL, so the test itself could not time it out.
    """
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _CATASTROPHIC_REGEXES, str(tmp_path)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        seconds, outcome = line.split(" ", 1)
        assert float(seconds) < 2.0, line
        assert outcome == "matched" or ("filename_regex" in outcome and "Simplify it" in outcome), line
    assert "filename_regex '(a|aa)+$' took over" in lines[2]


def test_captions_are_attached_to_images(tmp_path):
    write_images(tmp_path, 2, captions=True)
    write_images(tmp_path / "nocap", 1)
    assert [i.caption for i in load_dataset(tmp_path, (64, 64)).images] == ["caption 0, tag a, tag b", "caption 1, tag a, tag b"]
    assert load_dataset(tmp_path / "nocap", (64, 64)).images[0].caption == "a red thing number 0"


def test_alpha_weight_is_normalised_and_resized_width_first():
    alpha = Image.new("L", (160, 80), 0)
    alpha.paste(255, (0, 0, 80, 80))  # left half opaque
    w = alpha_weight(alpha, (20, 10))
    assert w.shape == (1, 10, 20)
    assert w.min() == 0 and torch.isclose(w.mean(), torch.tensor(1.0))
    assert torch.all(w[..., :10] == 2) and torch.all(w[..., 10:] == 0)
    assert torch.equal(alpha_weight(None, (4, 3)), torch.ones(1, 3, 4))
    assert torch.equal(alpha_weight(Image.new("L", (8, 8), 7), (2, 2)), torch.ones(1, 2, 2))  # constant alpha


def _one_image_dataset(tmp_path, alpha=False):
    img = Image.new("RGBA", (64, 64))
    img.putdata([(x * 4, y * 4, 128, 255 if x < 16 else 0) for y in range(64) for x in range(64)])
    img.save(tmp_path / "a.png")
    return load_dataset(tmp_path, (64, 64), keep_alpha=alpha)


def test_latent_cache_sampling_methods(studio, tmp_path):
    vae = studio.pipeline.vae
    d = _one_image_dataset(tmp_path)
    g = torch.Generator().manual_seed(0)
    det = build_latent_cache(vae, d, LatentSampling.DETERMINISTIC, False, False, g)
    once = build_latent_cache(vae, d, LatentSampling.ONCE, False, False, g)
    rnd = build_latent_cache(vae, d, LatentSampling.RANDOM, False, False, g)
    expected = vae.encode(pixels_to_tensor(d.images[0].image)[None]).latent_dist.mean * vae.config.scaling_factor
    a, _ = det.batch([0], [False])
    assert a.shape == (1, 4, 8, 8) and torch.allclose(a, expected.detach(), atol=1e-5)
    assert torch.equal(det.batch([0], [False])[0], a)  # deterministic: always the mean
    b1, b2 = once.batch([0], [False])[0], once.batch([0], [False])[0]
    assert torch.equal(b1, b2) and not torch.allclose(b1, a)  # once: one fixed sample
    r1, r2 = rnd.batch([0], [False], g)[0], rnd.batch([0], [False], g)[0]
    assert not torch.allclose(r1, r2) and rnd.std is not None  # random: fresh sample each use (mean + std kept)
    assert det.std is None and once.std is None


def test_flip_caches_the_encoded_mirror_image_and_flips_the_weights(studio, tmp_path):
    vae = studio.pipeline.vae
    d = _one_image_dataset(tmp_path, alpha=True)
    cache = build_latent_cache(vae, d, LatentSampling.DETERMINISTIC, True, True)
    mirror = pixels_to_tensor(d.images[0].image).flip(-1)[None]
    expected = vae.encode(mirror).latent_dist.mean * vae.config.scaling_factor
    lat, w = cache.batch([0, 0], [False, True])
    assert torch.allclose(lat[1], expected[0].detach(), atol=1e-5)
    assert not torch.allclose(lat[0], lat[1])
    assert w.shape == (2, 1, 8, 8)
    assert torch.all(w[0, :, :, :2] > 0) and torch.all(w[0, :, :, 2:] == 0)  # opaque on the left
    assert torch.equal(w[1], w[0].flip(-1))
    no_flip = build_latent_cache(vae, d, LatentSampling.DETERMINISTIC, False, False)
    assert torch.equal(no_flip.batch([0], [True])[0], no_flip.batch([0], [False])[0]) and no_flip.weight is None


def _mixed_size_dataset(tmp_path):
    """Five RGBA images in two size buckets (keep_size), interleaved so the buckets are not in file order."""
    rng = np.random.default_rng(0)
    for i, size in enumerate([(96, 64), (64, 64), (96, 64), (64, 64), (64, 64)]):
        rgba = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
        Image.fromarray(rgba, "RGBA").save(tmp_path / f"{i}.png")
    return load_dataset(tmp_path, None, keep_alpha=True)


def _per_image_reference(vae, d, flips):
    """One image (and its mirror) per VAE call: what the cache held before encodes were batched."""
    out = []
    for item in d.images:
        x = pixels_to_tensor(item.image)[None]
        x = torch.cat([x, x.flip(-1)]) if flips else x
        dist = vae.encode(x).latent_dist
        out.append((dist.mean * vae.config.scaling_factor, dist.std * vae.config.scaling_factor))
    return out


@pytest.mark.parametrize("flips", [False, True])
def test_latent_cache_batches_same_size_images_and_matches_one_image_per_call(studio, tmp_path, monkeypatch, flips):
    vae = studio.pipeline.vae
    d = _mixed_size_dataset(tmp_path)
    with torch.no_grad():
        reference = _per_image_reference(vae, d, flips)
    monkeypatch.setattr(ds, "ENCODE_BATCH_IMAGES_CPU", ds.ENCODE_BATCH_IMAGES)  # batch on the CPU too, as on CUDA
    calls = []
    encode = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x, *a, **k: calls.append(tuple(x.shape)) or encode(x, *a, **k))
    cache = build_latent_cache(vae, d, LatentSampling.RANDOM, flips, True)
    per_image = 2 if flips else 1
    assert sorted(calls) == sorted([(2 * per_image, 3, 64, 96), (3 * per_image, 3, 64, 64)])  # one call per size
    for i, (mean, std) in enumerate(reference):  # every image keeps its own latents, in dataset order
        assert cache.mean[i].shape == mean.shape and cache.std[i].shape == std.shape
        torch.testing.assert_close(cache.mean[i], mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.std[i], std, rtol=1e-5, atol=1e-5)
        assert cache.weight[i].shape == (per_image, 1, d.images[i].size[1] // 8, d.images[i].size[0] // 8)


def test_latent_cache_once_draws_the_same_samples_however_the_encode_is_batched(studio, tmp_path, monkeypatch):
    vae = studio.pipeline.vae
    d = _mixed_size_dataset(tmp_path)
    monkeypatch.setattr(ds, "ENCODE_BATCH_IMAGES_CPU", ds.ENCODE_BATCH_IMAGES)
    batched = build_latent_cache(vae, d, LatentSampling.ONCE, False, False, torch.Generator().manual_seed(3))
    monkeypatch.setattr(ds, "ENCODE_BATCH_PIXELS", 1)  # one image per call
    calls = []
    encode = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x, *a, **k: calls.append(x.shape[0]) or encode(x, *a, **k))
    single = build_latent_cache(vae, d, LatentSampling.ONCE, False, False, torch.Generator().manual_seed(3))
    assert calls == [1] * len(d)
    for a, b in zip(batched.mean, single.mean):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling", [LatentSampling.ONCE, LatentSampling.RANDOM])
def test_lazy_latent_cache_encodes_a_group_on_first_use_and_equals_the_eager_one(studio, tmp_path, monkeypatch,
                                                                                 sampling):
    vae = studio.pipeline.vae
    d = _mixed_size_dataset(tmp_path)  # buckets: 96x64 [0, 2], 64x64 [1, 3, 4]
    monkeypatch.setattr(ds, "ENCODE_BATCH_IMAGES_CPU", 2)  # groups [0, 2], [1, 3], [4]
    eager = build_latent_cache(vae, d, sampling, True, True, torch.Generator().manual_seed(5))
    calls = []
    encode = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x, *a, **k: calls.append(x.shape[0]) or encode(x, *a, **k))
    lazy = build_latent_cache(vae, d, sampling, True, True, torch.Generator().manual_seed(5), lazy=True)
    assert calls == [] and lazy.pending is not None  # nothing encoded before the first batch
    g_eager, g_lazy = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for indices in ([3], [4, 1], [2], [0, 2]):
        got, w = lazy.batch(indices, [True] * len(indices), g_lazy)
        want, w_want = eager.batch(indices, [True] * len(indices), g_eager)
        assert torch.equal(got, want) and torch.equal(w, w_want)  # same groups, same draws: bit for bit
    assert calls == [4, 2, 4]  # group [1, 3] (with mirrors), then [4], then [0, 2]; each once
    assert lazy.pending is None  # all encoded: the VAE reference is dropped
    for a, b in zip(lazy.mean, eager.mean):
        assert torch.equal(a, b)


def test_batch_sampler_keeps_buckets_apart_and_covers_the_epoch():
    buckets = {(64, 64): [0, 1, 2, 3, 4], (96, 64): [5, 6, 7]}
    s = BucketBatchSampler(buckets, 2, random.Random(0))
    assert s.batches_per_epoch == 4
    seen = Counter()
    for _ in range(50):
        epoch = s.epoch()
        assert len(epoch) == 4
        for batch in epoch:
            assert len(batch) == 2
            assert set(batch) <= set(buckets[(64, 64)]) or set(batch) <= set(buckets[(96, 64)])
            seen.update(batch)
    assert set(seen) == set(range(8))  # every image is used over epochs
    capped = BucketBatchSampler({(8, 8): [0, 1]}, 16, random.Random(0))
    assert capped.batch_size == 2 and next(iter(capped)) in ([0, 1], [1, 0])
