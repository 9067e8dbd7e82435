"""template="chat": the QA text as one user turn of the model's own chat template.

What a user relies on: qa prompts are unchanged; a chat prompt carries the template's tokens after
the query's `A:` and one bos; vectors are read at the last demonstration's marker (and at the
instruction's last token), patches land on the query's marker, never on the template's last token;
a model without a chat template is refused in one line. Tiny tokenizers carry no chat template, so
the tests give one (Gemma-style for text LMs, a LLaVA-style one that renders typed content parts).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_handle
from run_fixtures import tiny_config, write_task_file
from tiny_models import build_tiny, save_tiny_checkpoint
from tiny_tasks import make_tiny_tasks

from taskvec.caching import StepCache
from taskvec.engine import Patch, find_marker_positions, patch_at
from taskvec.experiments import RunConfig, run_experiments
from taskvec.experiments.execution.vector_store import VectorStore, run_models
from taskvec.experiments.protocol.recipes import INSTRUCTION, TEXT_ICL
from taskvec.models import ModelHandle
from taskvec.prompts import (
    DEFAULT_TEMPLATE,
    MissingChatTemplateError,
    Prompt,
    build_icl_prompt,
    build_query_prompt,
    encode_prompts,
    model_texts,
    query_marker_columns,
    text_end_columns,
)
from taskvec.prompts.settings import PromptSettings
from taskvec.tasks import Item, Task
from taskvec.vectors import extract_vector, icl_prompts, load_task_vector, residuals_at_marker

GEMMA_STYLE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Takes only a list of typed parts, as most VLM processors' templates do; images as the model's token.
LLAVA_STYLE = (
    "{% for message in messages %}USER\n{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}ASSISTANT\n{% endif %}"
)
TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]
ROLE_WORDS = ["user", "model", "USER", "ASSISTANT"]

DEMOS = [Item("France", "Paris"), Item("Italy", "Rome")]
QUERY = Item("Japan", "Tokyo")


def _with_chat_template(model: torch.nn.Module, processor: Any, template: str) -> tuple[torch.nn.Module, Any]:
    """Copies (the tiny builders share theirs) with the template's tokens in the vocabulary."""
    processor, model = copy.deepcopy(processor), copy.deepcopy(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": TURN_TOKENS}, replace_extra_special_tokens=False
    )
    tokenizer.add_tokens(ROLE_WORDS)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    processor.chat_template = template
    return model, processor


def chat_handle(family: str, template: str = GEMMA_STYLE) -> ModelHandle:
    tiny = build_tiny(family)
    model, processor = _with_chat_template(tiny.model, tiny.processor, template)
    return ModelHandle.wrap(model, processor, name=f"tiny-{family}-chat")


@pytest.fixture(scope="module")
def llama_chat() -> ModelHandle:
    return chat_handle("llama")


@pytest.fixture(scope="module")
def llava_chat() -> ModelHandle:
    return chat_handle("llava", LLAVA_STYLE)


def _pieces(handle: ModelHandle, ids: torch.Tensor) -> list[str]:
    return list(handle.tokenizer.convert_ids_to_tokens(ids.tolist()))


def _hidden_states(handle: ModelHandle, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[layers, batch, tokens, hidden] from transformers' own outputs; the last layer's carries the
    final norm there, so it is left out."""
    with torch.no_grad():
        outputs = handle.model(**inputs, output_hidden_states=True)
    return torch.stack(outputs.hidden_states[1:-1])


def test_qa_prompts_are_the_papers_text_byte_for_byte(llama_chat: ModelHandle) -> None:
    prompt = build_icl_prompt(DEMOS, QUERY)
    assert (
        prompt
        == build_icl_prompt(DEMOS, QUERY, template="qa")
        == Prompt("Q:France\nA:Paris\n\nQ:Italy\nA:Rome\n\nQ:Japan\nA:")
    )
    assert build_query_prompt(QUERY, template=DEFAULT_TEMPLATE).text == "Q:Japan\nA:"
    # A model with a chat template still gets the plain text under qa.
    assert model_texts(llama_chat, [prompt]) == [prompt.text]
    plain = llama_chat.build_inputs([prompt.text])
    assert torch.equal(encode_prompts(llama_chat, [prompt])["input_ids"], plain["input_ids"])
    assert query_marker_columns(llama_chat, plain) == [plain["input_ids"].shape[1] - 1]


def test_chat_prompt_is_one_user_turn_with_the_templates_tokens_after_the_query_marker(
    llama_chat: ModelHandle,
) -> None:
    prompt = build_icl_prompt(DEMOS, QUERY, template="chat")
    assert prompt.chat and prompt.text == build_icl_prompt(DEMOS, QUERY).text
    # The template's bos is dropped from the text: the tokenizer adds its own.
    expected = f"<start_of_turn>user\n{prompt.text}<end_of_turn>\n<start_of_turn>model\n"
    assert model_texts(llama_chat, [prompt]) == [expected]
    inputs = encode_prompts(llama_chat, [prompt, build_query_prompt(QUERY, template="chat")])
    ids = inputs["input_ids"]
    bos = llama_chat.tokenizer.bos_token_id
    assert [int((row == bos).sum()) for row in ids] == [1, 1]
    columns = query_marker_columns(llama_chat, inputs)
    for row, column in enumerate(columns):
        assert _pieces(llama_chat, ids[row, column - 1 : column + 1]) == ["A", ":"]
        assert _pieces(llama_chat, ids[row, column + 1 :]) == [
            "<end_of_turn>",
            "\n",
            "<start_of_turn>",
            "model",
            "\n",
        ]


def test_a_template_that_renders_its_own_bos_keeps_it_when_the_tokenizer_adds_none() -> None:
    handle = chat_handle("qwen2")  # its tiny tokenizer adds no bos
    assert model_texts(handle, [build_query_prompt(QUERY, template="chat")])[0].startswith(
        "<s><start_of_turn>"
    )
    ids = encode_prompts(handle, [build_query_prompt(QUERY, template="chat")])["input_ids"][0]
    assert int((ids == handle.tokenizer.bos_token_id).sum()) == 1


def test_a_model_without_a_chat_template_is_refused_in_one_line() -> None:
    handle = tiny_handle("llama")
    with pytest.raises(
        MissingChatTemplateError, match=r"^tiny-llama has no chat template; use template='qa'$"
    ):
        encode_prompts(handle, [build_query_prompt(QUERY, template="chat")])
    # qa needs no template.
    assert encode_prompts(handle, [build_query_prompt(QUERY)])["input_ids"].shape[0] == 1


def _tiny_capital(tmp_path: Path) -> Task:
    return make_tiny_tasks(tmp_path)[0]


def test_exemplar_vector_is_read_at_the_last_demonstrations_marker_under_chat(
    llama_chat: ModelHandle, tmp_path: Path
) -> None:
    task = _tiny_capital(tmp_path)
    extraction = extract_vector(
        llama_chat, task, "text-icl", settings=PromptSettings(shots=2, template="chat", batch_size=2), limit=3
    )
    assert extraction.vector.metadata["template"]["format"] == "chat"
    prompts = icl_prompts(task.split("val"), task.split("val")[:3], PromptSettings(shots=2, template="chat"))
    inputs = encode_prompts(llama_chat, prompts)
    hidden = _hidden_states(llama_chat, inputs)
    for row, ids in enumerate(inputs["input_ids"]):
        markers = find_marker_positions(llama_chat.tokenizer, ids, "A:")
        assert len(markers) == 3  # two demonstrations, then the query
        column = markers[-2]
        assert _pieces(llama_chat, ids[column + 1 : column + 2]) != ["<end_of_turn>"]  # not the query's
        expected = hidden[:, row, column]
        assert torch.allclose(extraction.per_prompt[row, :-1], expected, atol=1e-5)
        assert not torch.allclose(extraction.per_prompt[row, :-1], hidden[:, row, -1], atol=1e-3)


def test_instruction_vector_is_read_at_the_instructions_last_token_in_its_user_turn(
    llama_chat: ModelHandle, tmp_path: Path
) -> None:
    task = _tiny_capital(tmp_path)
    vector = extract_vector(llama_chat, task, "instruction", settings=PromptSettings(template="chat")).vector
    inputs = encode_prompts(llama_chat, [Prompt(task.instruction, chat=True)])
    [column] = text_end_columns(llama_chat, inputs, [task.instruction])
    ids = inputs["input_ids"][0]
    assert _pieces(llama_chat, ids[column - 1 : column + 2]) == ["country", ":", "<end_of_turn>"]
    assert torch.allclose(vector.vectors[:-1], _hidden_states(llama_chat, inputs)[:, 0, column], atol=1e-5)
    assert "user turn" in vector.metadata["position"]
    qa = extract_vector(llama_chat, task, "instruction").vector
    assert qa.metadata["position"] == "last token of the instruction" and "template" not in qa.metadata


def test_image_prompts_keep_their_images_in_place_inside_a_template_of_typed_parts(
    llava_chat: ModelHandle, tmp_path: Path
) -> None:
    task = _tiny_capital(tmp_path)
    prompts = icl_prompts(
        task.split("val"), task.split("val")[:2], PromptSettings(shots=2, template="chat"), modality="image"
    )
    assert prompts[0].text.startswith("Q:<image>\nA:") and prompts[0].text.count("<image>") == 3
    # The whole text, placeholders in place, is the one text part; the handle expands the images.
    assert model_texts(llava_chat, prompts)[0] == f"USER\n{prompts[0].text}<end_of_turn>\nASSISTANT\n"
    inputs = encode_prompts(llava_chat, prompts)
    image_id = llava_chat.model.config.image_token_index
    assert [int((row == image_id).sum()) for row in inputs["input_ids"]] == [3 * 16, 3 * 16]
    residuals = residuals_at_marker(llava_chat, prompts, occurrence=-2).residuals
    hidden = _hidden_states(llava_chat, inputs)
    for row, ids in enumerate(inputs["input_ids"]):
        column = find_marker_positions(llava_chat.tokenizer, ids, "A:")[-2]
        assert torch.allclose(residuals[row, :-1], hidden[:, row, column], atol=1e-5)
    columns = query_marker_columns(llava_chat, inputs)
    assert all(
        _pieces(llava_chat, inputs["input_ids"][row, c + 1 :])[:1] == ["<end_of_turn>"]
        for row, c in enumerate(columns)
    )


def test_a_patch_at_the_query_marker_columns_changes_that_column_only(llama_chat: ModelHandle) -> None:
    prompts = [build_icl_prompt(DEMOS, QUERY, template="chat"), build_query_prompt(QUERY, template="chat")]
    inputs = encode_prompts(llama_chat, prompts)
    columns = query_marker_columns(llama_chat, inputs)
    assert all(column < inputs["input_ids"].shape[1] - 1 for column in columns)
    layer = 1
    patch = Patch(layer, torch.full((llama_chat.hidden_size,), 3.0), position=columns)

    def layer_output(patches: list[Patch]) -> torch.Tensor:
        outputs: list[torch.Tensor] = []

        def record(_module: Any, _args: Any, output: Any) -> None:
            outputs.append((output[0] if isinstance(output, tuple) else output).detach().clone())

        with torch.no_grad(), patch_at(llama_chat, patches):
            hook = llama_chat.layers[layer].register_forward_hook(record)  # after the patch's own hook
            try:
                llama_chat.model(**inputs)
            finally:
                hook.remove()
        return outputs[0]

    changed = (layer_output([]) != layer_output([patch])).any(dim=-1)
    assert [row.nonzero().flatten().tolist() for row in changed] == [[column] for column in columns]


def _saved_chat_checkpoint(family: str, directory: Path, template: str = GEMMA_STYLE) -> Path:
    tiny = build_tiny(family)
    model, processor = _with_chat_template(tiny.model, tiny.processor, template)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_cli_patch_with_the_chat_template_patches_the_query_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import taskvec.engine
    from taskvec.cli import main

    model_dir = _saved_chat_checkpoint("llama", tmp_path / "model")
    task_file = write_task_file(tmp_path / "task")
    vector = tmp_path / "v.safetensors"
    common = ["--model", str(model_dir), "--template", "chat", "--json"]
    assert (
        main(
            [
                "extract",
                *common,
                "--task",
                str(task_file),
                "--shots",
                "2",
                "--limit",
                "2",
                "--out",
                str(vector),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["template"]["format"] == "chat"
    seen: list[tuple[torch.Tensor, list[Patch]]] = []
    generate = taskvec.engine.generate_greedy

    def spy(handle: ModelHandle, inputs: Any, patches: Any = (), **options: Any) -> list[str]:
        seen.append((inputs["input_ids"], list(patches)))
        return generate(handle, inputs, patches, **options)

    monkeypatch.setattr(taskvec.engine, "generate_greedy", spy)
    assert main(["patch", *common, "--vector", str(vector), "--layer", "1", "--text", "France"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt"] == "<start_of_turn>user\nQ:France\nA:<end_of_turn>\n<start_of_turn>model\n"
    ids, patches = seen[-1]
    [patch] = patches
    assert list(patch.position) == [ids.shape[1] - 6]  # ":" of A:, before 5 template tokens
    for command in (["sweep", "--vector", str(vector)], ["lens", "--prompts", "2", "--shots", "2"]):
        assert main([command[0], *common, "--task", str(task_file), *command[1:]]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["position"].startswith(
        "the prompt's last token"
    )


def test_cli_refuses_chat_for_a_model_without_a_chat_template(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from taskvec.cli import main

    model_dir = save_tiny_checkpoint("llama", tmp_path / "plain")
    model = ["--model", str(model_dir)]
    extract = ["extract", *model, "--task", str(write_task_file(tmp_path / "task")), "--shots", "2"]
    vector = tmp_path / "v.safetensors"
    assert main([*extract, "--limit", "1", "--out", str(vector)]) == 0  # qa: no template needed
    capsys.readouterr()
    patch = ["patch", *model, "--vector", str(vector), "--layer", "1", "--text", "France"]
    assert main([*patch, "--template", "chat"]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line == "taskvec: error: plain has no chat template; use template='qa'"


def test_lens_reads_where_the_answer_is_produced(llama_chat: ModelHandle, tmp_path: Path) -> None:
    from taskvec.analysis import lens_phases

    task = _tiny_capital(tmp_path)
    chat = lens_phases(
        llama_chat,
        task,
        specs=["text-icl", "instruction"],
        max_prompts=2,
        prompts=PromptSettings(shots=2, template="chat"),
    )
    qa = lens_phases(llama_chat, task, specs=["text-icl"], max_prompts=2, prompts=PromptSettings(shots=2))
    assert chat.as_dict()["template"] == "chat" and "template" not in qa.as_dict()
    assert set(chat.curves) == {"text-icl", "instruction"}
    # The last token's lens: the answer's probability there is what the chat curves record.
    from taskvec.analysis.lens_phases import phase_curves
    from taskvec.analysis.prompt_sets import query_items, spec_prompts

    queries = query_items(task, 2)
    prompts = spec_prompts(task, "text-icl", queries, settings=PromptSettings(shots=2, template="chat"))
    inputs = encode_prompts(llama_chat, prompts)
    with torch.no_grad():
        logits = llama_chat.model(**inputs).logits[:, -1]
    answer_ids = [llama_chat.tokenizer.convert_tokens_to_ids(item.output) for item in queries]
    last_layer = [float(logits[row].softmax(-1)[token]) for row, token in enumerate(answer_ids)]
    curves = phase_curves(
        llama_chat, prompts, [q.input for q in queries], [[q.output] for q in queries], task.task_words
    )
    assert curves.probability["answer"][-1] == pytest.approx(sum(last_layer) / 2, rel=1e-4)


def test_run_config_takes_the_template_and_keys_cached_steps_by_it(tmp_path: Path) -> None:
    from taskvec.cli import build_parser
    from taskvec.experiments.execution.steps import StepRunner
    from taskvec.experiments.protocol.conditions import plan_conditions
    from taskvec.tasks import load_task

    chat = RunConfig(prompts=PromptSettings(template="chat"))
    assert RunConfig().prompts.template == "qa" and chat.prompts.template == "chat"
    with pytest.raises(ValueError, match="unknown template"):
        RunConfig(prompts=PromptSettings(template="jinja"))  # type: ignore[arg-type]
    assert build_parser().parse_args(["run", "--template", "chat"]).template == "chat"
    task = load_task(str(write_task_file(tmp_path / "task")))
    handle = tiny_handle("llava")
    identities = {}
    for name in ("qa", "chat"):
        config = tiny_config(Path(task.name), prompts=PromptSettings(shots=2, batch_size=4, template=name))
        cache = StepCache(tmp_path / name)
        store = VectorStore(tmp_path / name, config, cache, run_models(handle, None), progress=False)
        runner = StepRunner(handle, None, config, cache, store, progress=False)
        condition = next(c for c in plan_conditions(handle, [task], config, None)[0] if c.demos == "text")
        identities[name] = (
            runner._prompt_identity(condition, task, 0),
            TEXT_ICL.identity(store, task, 0, inputs=[]),
            INSTRUCTION.identity(store, task, 0, inputs=[]),
        )
        prompts = runner.prompts(condition, task, task.split("test")[:2], 0)
        assert all(prompt.chat == (name == "chat") for prompt in prompts)
    qa_key = [DEFAULT_TEMPLATE.query, DEFAULT_TEMPLATE.answer, DEFAULT_TEMPLATE.marker]
    assert identities["qa"][0]["template"] == identities["qa"][1]["template"] == qa_key
    assert "template" not in identities["qa"][2]
    for qa, chat in zip(identities["qa"], identities["chat"], strict=True):
        assert qa != chat


def test_vectors_for_the_analyses_are_read_under_the_template_they_are_given(
    llama_chat: ModelHandle, tmp_path: Path
) -> None:
    from dataclasses import replace

    from taskvec.analysis import QUICK, VectorKey, analysis_vectors

    task = _tiny_capital(tmp_path)
    qa_settings = replace(QUICK, prompts=PromptSettings(shots=2, batch_size=2))
    chat_settings = replace(qa_settings, prompts=PromptSettings(shots=2, batch_size=2, template="chat"))
    qa = analysis_vectors(llama_chat, [task], settings=qa_settings)
    chat = analysis_vectors(llama_chat, [task], settings=chat_settings)
    key = VectorKey("vlm", task.name, "text-icl")
    expected = extract_vector(
        llama_chat, task, "text-icl", settings=PromptSettings(shots=2, template="chat"), limit=4
    ).vector
    torch.testing.assert_close(chat[key], expected.vectors)
    assert not torch.allclose(chat[key], qa[key])


def test_a_tiny_run_under_the_chat_template(tmp_path: Path) -> None:
    """The run end to end on a tiny LLaVA with a chat template: its vectors are read under the
    template, and every cached step is keyed by it."""
    handle = chat_handle("llava", LLAVA_STYLE)
    config = tiny_config(
        write_task_file(tmp_path / "task"),
        prompts=PromptSettings(shots=2, batch_size=4, template="chat"),
        seeds=(0,),
        ensemble_examples=(0, 2),
        val_limit=2,
        test_limit=2,
        max_new_tokens=1,
    )
    out = tmp_path / "out"
    results = run_experiments(handle, config, out, progress=False)
    assert results.config.prompts.template == "chat"
    assert json.loads((out / "results.json").read_text())["config"]["prompts"]["template"] == "chat"
    vectors = out / "vectors" / "vlm" / "country-capital"
    assert load_task_vector(vectors / "text-icl-seed0.safetensors").metadata["template"]["format"] == "chat"
    assert "user turn" in load_task_vector(vectors / "instruction-seed0.safetensors").metadata["position"]
    steps = [*(out / "cache" / "sweeps").rglob("*.json"), *(out / "cache" / "test").rglob("*.json")]
    assert steps and all(json.loads(step.read_text())["key"]["template"][-1] == "chat" for step in steps)
    from taskvec.experiments.execution.run_analyses import run_analyses_of_run

    run_analyses_of_run(handle, results, out, progress=False)
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["meta"]["settings"]["prompts"]["template"] == "chat"
    assert all(lens["template"] == "chat" for lens in analysis["results"]["lens"]["per_task"].values())


def _patched_chat_queries(handle: ModelHandle) -> tuple[list[Prompt], dict[str, torch.Tensor], list[int]]:
    prompts = [
        build_query_prompt(Item(country, ""), template="chat") for country in ("France", "Japan", "Peru")
    ]
    inputs = encode_prompts(handle, prompts)
    return prompts, inputs, query_marker_columns(handle, inputs)


def test_generated_answers_under_chat_are_patched_at_the_query_marker(llama_chat: ModelHandle) -> None:
    from taskvec.engine import generate_greedy_ids
    from taskvec.evaluation import generate_answers

    prompts, inputs, columns = _patched_chat_queries(llama_chat)
    vector = torch.randn(llama_chat.hidden_size, generator=torch.Generator().manual_seed(0)) * 4
    first: list[int] = []
    generate_answers(llama_chat, prompts, vector=vector, layer=1, max_new_tokens=1, first_tokens=first)
    expected = generate_greedy_ids(llama_chat, inputs, [Patch(1, vector, position=columns)], max_new_tokens=1)
    at_last = generate_greedy_ids(llama_chat, inputs, [Patch(1, vector, position=-1)], max_new_tokens=1)
    assert not torch.equal(expected, at_last)  # the two positions are told apart
    assert first == expected[:, 0].tolist()


def test_layer_sweeps_under_chat_patch_the_query_marker(llama_chat: ModelHandle) -> None:
    from taskvec.engine import generate_greedy_ids
    from taskvec.evaluation import sweep_first_tokens

    prompts, inputs, columns = _patched_chat_queries(llama_chat)
    vectors = (
        torch.randn(llama_chat.num_layers, llama_chat.hidden_size, generator=torch.Generator().manual_seed(1))
        * 4
    )
    tokens = sweep_first_tokens(llama_chat, prompts[:1], vectors)[0]
    row = {key: value[:1] for key, value in inputs.items()}
    expected = [
        generate_greedy_ids(
            llama_chat, row, [Patch(layer, vectors[layer], position=columns[:1])], max_new_tokens=1
        )
        for layer in range(llama_chat.num_layers)
    ]
    assert tokens == [llama_chat.tokenizer.decode(ids[0]) for ids in expected]
