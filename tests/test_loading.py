"""Loading real checkpoints: hub ids from the HF cache, revisions, pad tokens, placement, 4-bit."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import random_image
from run_fixtures import write_task_file
from tiny_models import build_tiny, build_tokenizer, build_vipllava

from taskvec.engine import record_residuals, sweep_layers
from taskvec.models import ModelHandle, load_model
from taskvec.models.convention import ConventionArchitectureWarning
from taskvec.models.handle import prepare_tokenizer
from taskvec.models.load_options import LoadOptions, parse_processor_kwargs
from taskvec.models.loading import from_pretrained_kwargs, is_placed_by_loader, resolved

TESTS = Path(__file__).resolve().parent


def save_tiny(family: str, directory: Path, *, drop_pad_token: bool = False) -> Path:
    tiny = build_tiny(family)
    tiny.model.save_pretrained(directory)
    tokenizer = tiny.tokenizer
    if drop_pad_token:
        tokenizer = type(tokenizer).from_pretrained(_saved(tokenizer, directory / "tokenizer-copy"))
        tokenizer.pad_token = None
        tokenizer.save_pretrained(directory)
    else:
        tiny.processor.save_pretrained(directory)
    return directory


def save_wide_llama(directory: Path) -> Path:
    """A tiny Llama 64 wide: bitsandbytes' CPU kernels quantize in blocks of 64 input features."""
    tokenizer = build_tokenizer(add_bos=True)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _saved(tokenizer: Any, directory: Path) -> Path:
    tokenizer.save_pretrained(directory)
    return directory


def save_in_hub_cache(family: str, hf_home: Path, repo_id: str, commit: str, refs: tuple[str, ...]) -> Path:
    """A snapshot as huggingface_hub lays it out: hub/models--org--name/{snapshots/<commit>, refs/<ref>}."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    save_tiny(family, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return repo


def test_a_hub_id_loads_offline_from_the_cache_with_its_revision_through_taskvec_run(tmp_path: Path) -> None:
    hf_home = tmp_path / "hf"
    main_commit, tagged_commit = "a" * 40, "b" * 40
    save_in_hub_cache("llava", hf_home, "org/tiny-llava", main_commit, ("main",))
    save_in_hub_cache("llava", hf_home, "org/tiny-llava", tagged_commit, ("v2",))
    task_file = write_task_file(tmp_path / "task")
    out = tmp_path / "run"
    # huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when imported, so the check runs in a fresh
    # interpreter exactly as a user's command would.
    script = textwrap.dedent(
        f"""
        import json, sys
        from taskvec.models import load_model
        from taskvec.cli import main
        checks = {{}}
        handle = load_model("org/tiny-llava", revision="v2")
        checks["tagged"] = [handle.name, handle.metadata["source"]]
        try:
            load_model("org/tiny-llava", revision="v3")
        except FileNotFoundError as error:
            checks["missing_revision"] = str(error)
        argv = ["run", "--model", "org/tiny-llava", "--llm", "none", "--tasks", {str(task_file)!r}, "--quick"]
        argv += ["--shots", "2", "--ensemble-examples", "0", "2", "--no-analyses", "--quiet"]
        argv += ["--out", {str(out)!r}]
        checks["run_exit"] = main(argv)
        print(json.dumps(checks))
        """
    )
    environment = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(TESTS)}
    environment.pop("HF_HUB_CACHE", None)
    done = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    checks = json.loads(done.stdout.strip().splitlines()[-1])
    assert checks["tagged"] == [
        "org/tiny-llava@v2",
        {"repo_id": "org/tiny-llava", "revision": "v2", "commit": tagged_commit},
    ]
    assert "'org/tiny-llava@v3' is not in the Hugging Face cache" in checks["missing_revision"]
    assert "HF_HUB_OFFLINE=1" in checks["missing_revision"]
    assert checks["run_exit"] == 0
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["model"] == "org/tiny-llava"
    settings = meta["model_settings"]
    assert settings["source"] == {"repo_id": "org/tiny-llava", "revision": "main", "commit": main_commit}
    assert settings["loading"]["device"] == "cpu" and settings["loading"]["dtype"] == "fp32"
    assert settings["images"]["width"] == 224 and settings["family"] == "llava"


def test_a_tokenizer_without_a_pad_token_pads_with_eos_and_says_so(tmp_path: Path) -> None:
    directory = save_tiny("llama", tmp_path / "llama", drop_pad_token=True)
    handle = load_model(directory)
    assert handle.metadata["tokenizer"] == {
        "pad_token": handle.tokenizer.eos_token,
        "pad_token_from": "eos_token",
    }
    prompts = ["Q:France\nA:Paris\n\nQ:Spain\nA:", "Q:Egypt\nA:"]
    batch = handle.build_inputs(prompts)
    assert batch["attention_mask"][1, 0] == 0  # left padded
    # Padding must not change an answer: each row equals the prompt run alone.
    batched = record_residuals(handle, batch)
    for row, prompt in enumerate(prompts):
        alone = record_residuals(handle, handle.build_inputs([prompt]))
        torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=1e-4)


def test_wrap_prepares_a_users_own_model_like_load_model() -> None:
    tiny = build_tiny("llama")
    # A copy: the tiny models are cached and shared by every test.
    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.padding_side, tokenizer.pad_token = "right", None
    handle = ModelHandle.wrap(tiny.model, tokenizer)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == tokenizer.eos_token
    assert handle.metadata["tokenizer"]["pad_token_from"] == "eos_token"
    tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token = None, None, None
    with pytest.raises(ValueError, match="no pad, eos or unk token"):
        prepare_tokenizer(tokenizer)


def test_auto_device_and_dtype_are_cpu_fp32_without_a_gpu() -> None:
    options = resolved(LoadOptions())
    if torch.cuda.is_available():
        assert (options.device, options.dtype) == ("cuda", "bf16")
    else:
        assert (options.device, options.dtype) == ("cpu", "fp32")
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolved(LoadOptions(device="cuda"))
    with pytest.raises(ValueError, match="unknown device 'tpu7'"):
        resolved(LoadOptions(device="tpu7"))


def test_quantized_loading_builds_nf4_config_and_places_with_a_device_map() -> None:
    pytest.importorskip("bitsandbytes")
    kwargs = from_pretrained_kwargs(
        resolved(LoadOptions(device="cpu", dtype="bf16", quantization="4bit")), "abc"
    )
    config = kwargs["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert kwargs["device_map"] == {"": "cpu"} and kwargs["revision"] == "abc"
    spread = from_pretrained_kwargs(
        resolved(LoadOptions(device="cpu", device_map="auto", attn_implementation="eager")), None
    )
    assert spread["device_map"] == "auto" and spread["attn_implementation"] == "eager"
    assert "quantization_config" not in spread and "revision" not in spread


def test_a_4bit_model_loads_unmoved_and_the_engine_runs_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("bitsandbytes")
    directory = save_wide_llama(tmp_path / "llama")
    reference = load_model(directory)
    with monkeypatch.context() as patched:
        patched.setattr(torch.nn.Module, "to", refuse_to_move)
        quantized = load_model(directory, device="cpu", dtype="bf16", quantization="4bit")
    assert quantized.model.is_quantized and is_placed_by_loader(quantized.model)
    linear = quantized.layers[0].self_attn.q_proj
    assert type(linear).__name__ == "Linear4bit"
    assert quantized.device == torch.device("cpu") and quantized.dtype == torch.bfloat16
    assert quantized.metadata["loading"]["quantization"] == "4bit"
    inputs = quantized.build_inputs(["Q:France\nA:Paris\n\nQ:Spain\nA:"])
    vectors = record_residuals(quantized, inputs)[0, :, 0]
    one_pass = sweep_layers(quantized, inputs, vectors, method="one_pass")
    naive = sweep_layers(quantized, inputs, vectors, method="naive")
    torch.testing.assert_close(one_pass, naive, atol=0.05, rtol=0.05)
    # 4-bit weights stay near the full-precision model: the same residual stream, roughly.
    full = record_residuals(reference, reference.build_inputs(["Q:France\nA:Paris\n\nQ:Spain\nA:"]))
    quantized_residuals = record_residuals(quantized, inputs)
    cosine = torch.nn.functional.cosine_similarity(full.flatten(), quantized_residuals.flatten(), dim=0)
    assert cosine > 0.9


def test_function_vectors_of_a_4bit_model_project_through_its_quantized_heads(tmp_path: Path) -> None:
    """The run's function-vector step on a 4-bit model: heads are read at the quantized output
    projection's input and projected by it, close to the full-precision model's."""
    pytest.importorskip("bitsandbytes")
    from taskvec.function_vectors import FunctionVectorSettings, find_function_vector, function_vector
    from taskvec.tasks import load_task

    small = FunctionVectorSettings(shots=2, mean_prompts=4, effect_prompts=2, heads=4)

    directory = save_wide_llama(tmp_path / "llama")
    task = load_task(str(write_task_file(tmp_path / "task")))
    reference = load_model(directory)
    quantized = load_model(directory, device="cpu", dtype="bf16", quantization="4bit")
    found = find_function_vector(quantized, task, settings=small)
    assert found.vector.shape == (64,) and torch.isfinite(found.vector).all()
    assert found.effects.shape == (quantized.num_layers, quantized.text_config.num_attention_heads)
    full = find_function_vector(reference, task, settings=small)
    means = [
        torch.ones(quantized.text_config.num_attention_heads, 64 // 4) for _ in range(quantized.num_layers)
    ]
    heads = full.heads
    cosine = torch.nn.functional.cosine_similarity(
        function_vector(quantized, means, heads), function_vector(reference, means, heads), dim=0
    )
    assert cosine > 0.9


def refuse_to_move(*_args: Any, **_kwargs: Any) -> Any:
    raise AssertionError("a model placed by its loader must not be .to()-moved")


def test_a_device_mapped_model_is_not_moved_and_gives_the_same_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = save_tiny("llava", tmp_path / "llava")
    plain = load_model(directory, image_width=0)
    with monkeypatch.context() as patched:
        patched.setattr(torch.nn.Module, "to", refuse_to_move)
        mapped = load_model(directory, image_width=0, device_map="auto")
    assert mapped.metadata["loading"]["device_map"] == "auto"
    prompt, images = ["Q:<image>\nA:"], [[random_image(0)]]
    torch.testing.assert_close(
        record_residuals(mapped, mapped.build_inputs(prompt, images)),
        record_residuals(plain, plain.build_inputs(prompt, images)),
    )


def test_images_are_resized_to_width_224_unless_asked_otherwise(tmp_path: Path) -> None:
    directory = save_tiny("llava", tmp_path / "llava")
    handle = load_model(directory)
    image = random_image(0, size=24).resize((48, 24))
    assert handle.image_settings.prepare(image).size == (224, 112)
    assert load_model(directory, image_width=64).image_settings.prepare(image).size == (64, 32)
    assert load_model(directory, image_width=0).image_settings.prepare(image).size == (48, 24)
    for malformed in ("[1]", "{max_pixels: 1}"):
        with pytest.raises(ValueError, match="must be a JSON object"):
            parse_processor_kwargs(malformed)


def test_fp16_is_refused_for_families_that_overflow_in_it(tmp_path: Path) -> None:
    directory = save_tiny("gemma3_text", tmp_path / "gemma")
    with pytest.raises(ValueError, match=r"gemma3_text overflows in fp16 .* use --dtype bf16"):
        load_model(directory, dtype="fp16")
    assert load_model(directory, dtype="bf16").dtype == torch.bfloat16


def image_tokens(handle: ModelHandle) -> int:
    inputs = handle.build_inputs(["Q:<image>\nA:"], [[random_image(0, size=64)]])
    image_token_id = handle.tokenizer.convert_tokens_to_ids("<image>")
    return int((inputs["input_ids"] == image_token_id).sum())


def test_idefics2_loads_without_image_splitting_unless_the_user_asks(tmp_path: Path) -> None:
    directory = save_tiny("idefics2", tmp_path / "idefics2")
    default = load_model(directory)
    assert default.image_settings.as_record()["image_processor"] == {"do_image_splitting": False}
    split = load_model(directory, processor_kwargs='{"do_image_splitting": true}')
    # The checkpoint's processor splits each image into 4 tiles plus the whole image.
    assert image_tokens(split) == 5 * image_tokens(default)
    assert default.settings_record()["images"]["image_processor"] == {"do_image_splitting": False}
    # Each handle's own setting holds on every call, whichever loaded last.
    assert image_tokens(default) * 5 == image_tokens(split)


def test_a_model_outside_the_table_loads_by_convention_with_a_warning(tmp_path: Path) -> None:
    tiny = build_vipllava()
    tiny.model.save_pretrained(tmp_path / "vipllava")
    tiny.processor.save_pretrained(tmp_path / "vipllava")
    with pytest.warns(ConventionArchitectureWarning, match="by convention, not in the table"):
        handle = load_model(tmp_path / "vipllava", image_width=0)
    assert handle.architecture.family == "vipllava"
    inputs = handle.build_inputs(["Q:<image>\nA:"], [[random_image(0)]])
    with torch.no_grad():
        reference = tiny.model(**inputs, output_hidden_states=True).hidden_states
    torch.testing.assert_close(
        record_residuals(handle, inputs)[:, 0], reference[1][:, -1:], atol=1e-5, rtol=1e-4
    )


def test_a_checkpoint_whose_processor_does_not_load_gets_one_line(tmp_path: Path) -> None:
    tiny = build_tiny("llava")
    tiny.model.save_pretrained(tmp_path / "weights-only")
    with pytest.raises(ValueError, match=r"weights-only: its processor does not load \(") as raised:
        load_model(tmp_path / "weights-only")
    assert "\n" not in str(raised.value)
