"""Bad task vector files, and vectors that do not fit the model, fail with one line naming the file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_handle
from safetensors.torch import save_file
from tiny_models import save_tiny_checkpoint

from taskvec.cli import main
from taskvec.vectors import TaskVector, load_task_vector, save_task_vector
from taskvec.vectors.task_vector import (
    MissingVectorFileError,
    VectorFileError,
    check_layers,
    check_vector_fits,
)

# The tiny LLaVA's language model: 3 decoder layers of width 32.
LAYERS, HIDDEN = 3, 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint("llava", tmp_path_factory.mktemp("models") / "tiny-llava")


def write_vector(path: Path, layers: int = LAYERS, hidden: int = HIDDEN, model: str = "tiny-llava") -> Path:
    return save_task_vector(TaskVector(torch.randn(layers, hidden), {"model": model}), path)


def test_a_saved_vector_fits_its_model(tmp_path: Path) -> None:
    vector = load_task_vector(write_vector(tmp_path / "v.safetensors"))
    handle = tiny_handle("llava")
    assert (handle.num_layers, handle.hidden_size) == (LAYERS, HIDDEN)
    check_vector_fits(vector, handle, tmp_path / "v.safetensors", layers=[0, LAYERS - 1, -LAYERS])


def corrupt(path: Path) -> None:
    path.write_bytes(b"this is not a safetensors file at all")


def truncated(path: Path) -> None:
    write_vector(path)
    path.write_bytes(path.read_bytes()[:-40])


def without_vectors(path: Path) -> None:
    save_file({"residuals": torch.zeros(LAYERS, HIDDEN)}, str(path), metadata={"taskvec": "{}"})


def without_metadata(path: Path) -> None:
    save_file({"vectors": torch.zeros(LAYERS, HIDDEN)}, str(path))


def malformed_metadata(path: Path) -> None:
    save_file({"vectors": torch.zeros(LAYERS, HIDDEN)}, str(path), metadata={"taskvec": "{model: x"})


def metadata_not_an_object(path: Path) -> None:
    save_file({"vectors": torch.zeros(LAYERS, HIDDEN)}, str(path), metadata={"taskvec": "[1, 2]"})


def three_dimensional(path: Path) -> None:
    save_file({"vectors": torch.zeros(LAYERS, HIDDEN, 2)}, str(path), metadata={"taskvec": "{}"})


def integer_vectors(path: Path) -> None:
    save_file(
        {"vectors": torch.zeros(LAYERS, HIDDEN, dtype=torch.int64)}, str(path), metadata={"taskvec": "{}"}
    )


def not_finite(path: Path) -> None:
    vectors = torch.zeros(LAYERS, HIDDEN)
    vectors[1, 3] = float("nan")
    save_file({"vectors": vectors}, str(path), metadata={"taskvec": "{}"})


BAD_FILES = [
    (corrupt, "not a readable safetensors file"),
    (truncated, "not a readable safetensors file"),
    (without_vectors, r"no 'vectors' tensor \(tensors: residuals\): not a taskvec task vector"),
    (without_metadata, "no 'taskvec' metadata in the safetensors header"),
    (malformed_metadata, "malformed 'taskvec' metadata"),
    (metadata_not_an_object, "'taskvec' metadata must be a JSON object, got list"),
    (three_dimensional, "vectors of shape 3 x 32 x 2, expected layers x hidden"),
    (integer_vectors, "vectors of dtype torch.int64, expected floating point"),
    (not_finite, "vectors hold NaN or infinite values"),
]


@pytest.mark.parametrize(("make", "message"), BAD_FILES, ids=[make.__name__ for make, _ in BAD_FILES])
def test_bad_vector_files_name_the_file_and_the_problem(tmp_path: Path, make: object, message: str) -> None:
    path = tmp_path / "vec.safetensors"
    make(path)  # type: ignore[operator]
    with pytest.raises(VectorFileError, match=re.escape(f"{path}: ") + message):
        load_task_vector(path)


def test_a_missing_vector_file_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(
        MissingVectorFileError, match=f"no task vector file at {re.escape(str(tmp_path))}"
    ) as raised:
        load_task_vector(tmp_path / "absent.safetensors")
    assert isinstance(raised.value, FileNotFoundError) and isinstance(raised.value, ValueError)


def test_a_vector_of_another_model_names_both_shapes_and_the_model(tmp_path: Path) -> None:
    path = write_vector(tmp_path / "vec.safetensors", layers=18, hidden=640, model="gemma-3-270m")
    expected = f"{path} holds 18 layers x 640 (extracted from gemma-3-270m) but tiny-llava has 3 layers x 32"
    with pytest.raises(VectorFileError, match=re.escape(expected)):
        check_vector_fits(load_task_vector(path), tiny_handle("llava"), path)
    same_depth = write_vector(tmp_path / "wide.safetensors", hidden=64)
    with pytest.raises(
        VectorFileError, match=re.escape("holds 3 layers x 64 (extracted from tiny-llava) but")
    ):
        check_vector_fits(load_task_vector(same_depth), tiny_handle("llava"), same_depth)


@pytest.mark.parametrize("layer", [LAYERS, -LAYERS - 1, 99])
def test_a_layer_out_of_range_names_the_layers_there_are(tmp_path: Path, layer: int) -> None:
    path = write_vector(tmp_path / "vec.safetensors")
    vector = load_task_vector(path)
    expected = f"layer {layer} out of range: {path} holds 3 layers x 32 (layers 0-2, or -3 to -1)"
    with pytest.raises(VectorFileError, match=re.escape(expected)):
        check_layers(vector, [layer], path)
    with pytest.raises(VectorFileError, match=re.escape(expected)):
        check_vector_fits(vector, tiny_handle("llava"), path, layers=[layer])


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one `taskvec: error:` line the command wrote to stderr (the model loading may log before it)."""
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("taskvec: error: ")]
    assert len(errors) == 1 and "Traceback" not in captured.err, captured.err
    assert captured.out == ""
    return errors[0]


def patch_argv(model_dir: Path, vector: Path, layer: int = 1) -> list[str]:
    return [
        "patch",
        "--model",
        str(model_dir),
        "--vector",
        str(vector),
        "--layer",
        str(layer),
        "--text",
        "France",
    ]


def test_patch_with_a_corrupt_file_fails_in_one_line_before_loading_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "vec.safetensors"
    corrupt(path)
    # No model directory is needed: the vector is read first.
    assert main(patch_argv(tmp_path / "no-model", path)) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"taskvec: error: {path}: not a readable safetensors file")
    assert captured.err.count("\n") == 1 and captured.out == ""
    assert main(patch_argv(tmp_path / "no-model", tmp_path / "absent.safetensors", layer=0)) == 2
    assert (
        capsys.readouterr().err
        == f"taskvec: error: no task vector file at {tmp_path / 'absent.safetensors'}\n"
    )


def test_patch_and_sweep_refuse_a_vector_of_another_shape(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_vector(tmp_path / "vec.safetensors", layers=18, hidden=640, model="gemma-3-270m")
    expected = f"{path} holds 18 layers x 640 (extracted from gemma-3-270m) but tiny-llava has 3 layers x 32"
    assert main(patch_argv(model_dir, path)) == 2
    assert one_line_error(capsys) == f"taskvec: error: {expected}"
    task = tmp_path / "capitals.json"
    task.write_text(json.dumps([{"input": c, "output": c} for c in ("France", "Japan", "Peru", "Chile")]))
    sweep = [
        "sweep",
        "--model",
        str(model_dir),
        "--vector",
        str(path),
        "--task",
        str(task),
        "--split",
        "test",
    ]
    assert main(sweep) == 2
    assert one_line_error(capsys) == f"taskvec: error: {expected}"


def test_patch_refuses_a_layer_out_of_range(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_vector(tmp_path / "vec.safetensors")
    assert main(patch_argv(model_dir, path, layer=7)) == 2
    expected = f"layer 7 out of range: {path} holds 3 layers x 32 (layers 0-2, or -3 to -1)"
    assert one_line_error(capsys) == f"taskvec: error: {expected}"
    assert main([*patch_argv(model_dir, path, layer=-1), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) >= {"patched", "unpatched"}


def test_a_patch_of_the_wrong_width_names_both_widths_in_the_library_too() -> None:
    from taskvec.engine import Patch, generate_greedy
    from taskvec.engine.patching import PatchShapeError

    handle = tiny_handle("llama")
    inputs = handle.build_inputs(["Q:France\nA:"])
    wrong = torch.zeros(handle.hidden_size + 8)
    with pytest.raises(
        PatchShapeError, match=f"{handle.hidden_size + 8} values .* {handle.hidden_size} wide"
    ):
        generate_greedy(handle, inputs, [Patch(1, wrong)])
