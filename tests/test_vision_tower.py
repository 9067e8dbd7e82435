"""The frozen v2 vision tower (EfficientNet-Lite0 grid + the picture's colours): its tokens, its token
cache, and its registration with transformers' Auto classes so a LLaVA builds and reloads it.
Random lite0 weights on 64-pixel pictures: fast, and the same arithmetic as the ImageNet weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from taskvec.vlm.cached_features import TowerTokens, cached_tower_tokens, tower_tokens
from taskvec.vlm.data import EntityImage, entity_images, load_picture, split_by_style
from taskvec.vlm.imagenet_encoder import preprocess
from taskvec.vlm.vision_tower import MODEL_TYPE, ImagenetColourConfig, ImagenetColourTower, picture_colours

CONFIG = ImagenetColourConfig(grid=2, colour_side=2, colour_scale=4.0, image_size=64)


def tiny_tower(seed: int = 0) -> ImagenetColourTower:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ImagenetColourTower(CONFIG).eval()


@pytest.fixture(scope="module")
def pool() -> list[EntityImage]:
    known = {"countries/France", "countries/Japan", "animals/cat"}
    train, _ = split_by_style([image for image in entity_images() if image.entity in known])
    return train


def test_each_token_is_its_cells_lite0_features_beside_the_whole_pictures_colours() -> None:
    tower = tiny_tower()
    picture = np.full((64, 64, 3), 255, dtype=np.uint8)
    picture[:32, :32] = (255, 0, 0)  # top-left quarter red, the rest white
    pixels = preprocess([Image.fromarray(picture)], side=64)
    with torch.no_grad():
        tokens = tower(pixels).last_hidden_state
        maps = tower.encoder.extract_features(pixels)
    assert tokens.shape == (1, 4, 1280 + 3 * 2 * 2) == (1, CONFIG.tokens_per_image, CONFIG.hidden_size)
    # Token k's first 1280 values: lite0's feature map (2 x 2 at 64 px) averaged over grid cell k.
    torch.testing.assert_close(tokens[0, 0, :1280], maps[0, :, 0, 0])
    torch.testing.assert_close(tokens[0, 3, :1280], maps[0, :, 1, 1])
    # The rest: the whole picture at 2 x 2, channel-major, times the scale, the same on every token.
    red, white = torch.tensor([1.0, -1.0, -1.0]), torch.ones(3)
    expected = torch.stack([red, white, white, white], dim=1).reshape(12) * CONFIG.colour_scale
    for token in range(4):
        torch.testing.assert_close(tokens[0, token, 1280:], expected, atol=0.1, rtol=0)
    torch.testing.assert_close(tokens[0, :, 1280:] / CONFIG.colour_scale, picture_colours(pixels, CONFIG)[0])


def test_pictures_seen_before_take_their_remembered_tokens_which_equal_a_fresh_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tower = tiny_tower()
    torch.manual_seed(1)
    pictures = torch.rand(3, 3, 64, 64) * 2 - 1
    batch = pictures[[0, 1, 0, 2, 1]]  # repeats, as a batch of patched copies of one prompt has
    with torch.enable_grad():
        fresh = tower(batch).last_hidden_state.detach()  # with gradients: never remembered
    passes: list[int] = []
    computed = ImagenetColourTower._tokens
    monkeypatch.setattr(
        ImagenetColourTower,
        "_tokens",
        lambda self, pixels: passes.append(len(pixels)) or computed(self, pixels),
    )
    with torch.no_grad():
        first = tower(batch).last_hidden_state
        again = tower(pictures[[2, 1]]).last_hidden_state
        changed = pictures[2].clone()
        changed[0, 0, 0] += 0.5
        other = tower(changed[None]).last_hidden_state
    torch.testing.assert_close(first, fresh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, fresh[[3, 1]], rtol=1e-5, atol=1e-5)
    # Three distinct pictures went through lite0 once; the repeats and the second call none; a
    # picture differing in one value is a new one.
    assert passes == [3, 1]
    assert not torch.allclose(other, fresh[3])
    with torch.no_grad():
        tower.train()
        tower(pictures[:1])
    assert passes == [3, 1, 1]  # in training mode (dropout) nothing is remembered


def test_cached_tokens_equal_the_towers_and_are_reused(pool: list[EntityImage], tmp_path: Path) -> None:
    tower = tiny_tower()
    cache = tmp_path / "tokens.safetensors"
    cached: TowerTokens = cached_tower_tokens(tower, pool[:3], cache, copies=1, seed=0)
    assert cached.views == 2 and cached.tokens.shape == (3, 2, 4, CONFIG.hidden_size)
    live = tower_tokens(tower, [load_picture(image.path) for image in pool[:3]])
    torch.testing.assert_close(torch.stack([cached.of(image) for image in pool[:3]]), live)
    assert not torch.equal(cached.of(pool[0], 1), cached.of(pool[0], 0))  # the augmented copy
    again = cached_tower_tokens(tower, pool[:3], cache, copies=1, seed=0)
    assert torch.equal(again.tokens, cached.tokens)
    other_weights = cached_tower_tokens(tiny_tower(seed=1), pool[:3], cache, copies=1, seed=0)
    assert not torch.equal(other_weights.tokens, cached.tokens)  # other weights recompute
    regridded = ImagenetColourTower(ImagenetColourConfig(grid=1, colour_side=2, image_size=64)).eval()
    changed = cached_tower_tokens(regridded, pool[:3], cache, copies=1, seed=0)
    assert changed.tokens.shape == (3, 2, 1, CONFIG.hidden_size)  # a changed tower recomputes


def test_a_llava_builds_the_registered_tower_and_reloads_it(tmp_path: Path) -> None:
    text = transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, layer_types=["sliding_attention", "full_attention"],
        sliding_window=8, max_position_embeddings=128,
    )  # fmt: skip
    config = transformers.LlavaConfig(
        text_config=text.to_dict(),
        vision_config=CONFIG.to_dict(),
        image_token_index=63,
        image_seq_length=CONFIG.tokens_per_image,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    assert config.vision_config.model_type == MODEL_TYPE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlavaForConditionalGeneration(config).eval()
    assert isinstance(model.model.vision_tower, ImagenetColourTower)
    pixels = preprocess([Image.new("RGB", (50, 30), (0, 90, 200))], side=64)
    input_ids = torch.tensor([[1, 63, 63, 63, 63, 5, 6]])
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        expected = model.model.multi_modal_projector(model.model.vision_tower(pixels).last_hidden_state)[0]
        torch.testing.assert_close(features, expected)
        logits = model(input_ids=input_ids, pixel_values=pixels).logits
    model.save_pretrained(tmp_path)
    loaded = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids, pixel_values=pixels).logits, logits)


def test_taskvecs_loader_registers_the_tower_for_a_checkpoint_that_names_it() -> None:
    import subprocess
    import sys

    # A fresh interpreter: the tower is unknown to transformers until the loader sees a config naming it.
    script = (
        "import transformers; from taskvec.models.loading import _register_taskvec_tower as register\n"
        f"known = lambda: {MODEL_TYPE!r} in transformers.models.auto.configuration_auto.CONFIG_MAPPING\n"
        "before = known(); register({'vision_config': {'model_type': 'clip_vision_model'}})\n"
        "middle = known()\n"
        f"register({{'vision_config': {{'model_type': {MODEL_TYPE!r}}}}}); print(before, middle, known())"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False", "True"]
