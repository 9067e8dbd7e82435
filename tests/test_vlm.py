"""The embedded VLM's machinery on a tiny Gemma3 text model: assembly, processor, batches from the
tower's cached tokens, training stages, checkpoints and the shipped-parts format (the tower itself and
its token cache: tests/test_vision_tower.py). The real (Gemma-3-270M) model is never loaded here; the
tower is EfficientNet-Lite0 with random weights on 64-pixel pictures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
import transformers
from conftest import random_image
from tiny_models import build_tokenizer

from taskvec.engine import generate_greedy
from taskvec.models import ModelHandle, load_model
from taskvec.vlm.architecture import IMAGE_TOKEN, add_image_token, assemble_llava
from taskvec.vlm.artifacts import LORA_FILE, PROJECTOR_FILE, build_vlm, export_checkpoint, save_parts
from taskvec.vlm.batches import answer_loss, collate, expand_image_tokens
from taskvec.vlm.cached_features import TowerTokens, cached_tower_tokens
from taskvec.vlm.card import ACCEPTANCE_FILE, PREVIOUS_ACCEPTANCE_FILE, write_model_card
from taskvec.vlm.data import (
    EntityImage,
    Example,
    IclTask,
    InstructMix,
    augment,
    caption_example,
    captions_and_questions,
    entity_images,
    icl_example,
    instruct_examples,
    split_by_style,
    training_icl_tasks,
)
from taskvec.vlm.evaluation import Naming
from taskvec.vlm.processor import build_processor
from taskvec.vlm.recipe import ship_parts
from taskvec.vlm.training import (
    StageSettings,
    TowerSettings,
    TrainConfig,
    adapters_disabled,
    add_lora,
    align_batch,
    align_loss,
    image_step_loss,
    name_embedding_targets,
    text_step_loss,
    train_vlm,
)
from taskvec.vlm.vision_tower import ImagenetColourTower

TOWER_SETTINGS = TowerSettings(grid=2, colour_side=2, colour_scale=4.0, image_size=64)
TOWER = TOWER_SETTINGS.config()


def tiny_language_model(
    seed: int = 0, tokenizer: object | None = None
) -> tuple[transformers.Gemma3ForCausalLM, object]:
    tokenizer = tokenizer or build_tokenizer(add_bos=True)
    config = transformers.Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Gemma3ForCausalLM(config).eval()
    return model, tokenizer


def tiny_vlm(seed: int = 0) -> tuple[transformers.LlavaForConditionalGeneration, transformers.LlavaProcessor]:
    language_model, tokenizer = tiny_language_model(seed)
    model = assemble_llava(language_model, tokenizer, TOWER, seed=seed, imagenet_weights=False)
    return model, build_processor(tokenizer, TOWER)


# Entities whose names the tiny WordLevel tokenizer knows (one token each).
KNOWN = {
    "countries/France",
    "countries/Japan",
    "countries/Italy",
    "animals/cat",
    "animals/dog",
    "foods/apple",
}


@pytest.fixture(scope="module")
def pool() -> list[EntityImage]:
    images = [image for image in entity_images() if image.entity in KNOWN]
    train, _ = split_by_style(images)
    return train


@pytest.fixture(scope="module")
def tokens(pool: list[EntityImage], tmp_path_factory: pytest.TempPathFactory) -> TowerTokens:
    """The pool's tower tokens (the picture and one augmented copy). Every tiny VLM's tower has the
    same random weights (they are drawn from the seed before anything else), so one cache serves all."""
    model, _ = tiny_vlm()
    cache = tmp_path_factory.mktemp("tokens") / "pool.safetensors"
    return cached_tower_tokens(model.model.vision_tower, pool, cache, copies=1, seed=0)


def test_assembled_llava_is_a_real_llava_sharing_the_language_models_modules() -> None:
    language_model, tokenizer = tiny_language_model()
    model = assemble_llava(language_model, tokenizer, TOWER, imagenet_weights=False)
    assert type(model) is transformers.LlavaForConditionalGeneration
    assert model.model.language_model is language_model.model
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert model.config.image_seq_length == TOWER.tokens_per_image == 4
    assert isinstance(model.model.vision_tower, ImagenetColourTower)
    assert model.config.vision_config.model_type == "taskvec_imagenet_colour"
    assert not any(parameter.requires_grad for parameter in model.model.vision_tower.parameters())
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert not any(tensor.is_meta for tensor in model.state_dict().values())


def test_image_placeholder_expands_to_tokens_per_image_and_the_model_runs() -> None:
    model, processor = tiny_vlm()
    handle = ModelHandle.wrap(model, processor)
    assert handle.architecture.family == "llava"
    inputs = handle.build_inputs(
        ["Q:<image>\nA:", "Q:<image>\nA:France\n\nQ:<image>\nA:"],
        [[random_image(1)], [random_image(2), random_image(3)]],
    )
    image_id = model.config.image_token_id
    assert (inputs["input_ids"] == image_id).sum(-1).tolist() == [4, 8]
    assert inputs["pixel_values"].shape == (3, 3, 64, 64)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(logits).all()
    assert len(generate_greedy(handle, inputs, max_new_tokens=2)) == 2


def tokenizer_without_image_token() -> transformers.PreTrainedTokenizerFast:
    full = build_tokenizer(add_bos=True)
    vocab = {token: index for token, index in full.get_vocab().items() if token != IMAGE_TOKEN}
    words = {token: index for index, token in enumerate(sorted(vocab, key=vocab.__getitem__))}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=words, unk_token="<unk>"))
    backend.pre_tokenizer = full.backend_tokenizer.pre_tokenizer
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def test_adding_the_image_token_grows_the_tied_vocabulary_with_a_zero_row() -> None:
    bare = tokenizer_without_image_token()
    language_model, _ = tiny_language_model(tokenizer=bare)
    old_rows = language_model.get_input_embeddings().weight.shape[0]
    assert old_rows == len(bare)
    model = assemble_llava(language_model, bare, TOWER, imagenet_weights=False)
    new_id = bare.convert_tokens_to_ids(IMAGE_TOKEN)
    assert new_id == old_rows and len(bare) == old_rows + 1
    assert bare.encode("a" + IMAGE_TOKEN, add_special_tokens=False)[-1] == new_id
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == old_rows + 1 == model.config.text_config.vocab_size
    assert torch.count_nonzero(embeddings[new_id]) == 0
    assert model.lm_head.weight is embeddings
    assert add_image_token(bare) == new_id  # idempotent


def test_collate_matches_the_processor_and_the_models_own_forward(
    pool: list[EntityImage], tokens: TowerTokens
) -> None:
    from taskvec.vlm.data import load_picture

    model, processor = tiny_vlm()
    examples = [
        Example("<image>\nCountry:", " France", (pool[0],)),
        Example("Q:<image>\nA:", " Japan", (pool[1],)),
    ]
    batch = collate(examples, processor, 4, tokens, rng=None)
    reference = processor(
        text=[example.prompt + example.answer for example in examples],
        images=[[load_picture(example.images[0].path)] for example in examples],
        return_tensors="pt",
        padding=True,
    )
    length = processor(text=[examples[0].prompt], images=[[load_picture(pool[0].path)]], return_tensors="pt")[
        "input_ids"
    ].shape[1]
    assert batch.predicts_answer.sum().item() == len(batch.targets) == 2
    assert batch.input_ids[0, length].item() == batch.targets[0].item()
    assert batch.image_tokens is not None and batch.image_tokens.shape == (2, 4, TOWER.hidden_size)
    # The cached tokens at the image positions give the logits of the model's own forward from pixels
    # (the processor pads on the left, collate on the right: compare each row's real tokens).
    with torch.no_grad():
        cached = model(**batch.model_inputs(model)).logits
        full = model(**reference).logits
    for row in range(2):
        real = batch.attention_mask[row].bool()
        reference_real = reference["attention_mask"][row].bool()
        assert batch.input_ids[row, real].tolist() == reference["input_ids"][row, reference_real].tolist()
        torch.testing.assert_close(cached[row, real], full[row, reference_real], atol=1e-4, rtol=1e-4)
    assert expand_image_tokens("a<image>b", 3) == "a" + IMAGE_TOKEN * 3 + "b"


def test_text_only_batches_have_no_images_and_train(pool: list[EntityImage], tokens: TowerTokens) -> None:
    model, processor = tiny_vlm()
    text = [Example("Q:France\nA:", "Paris\n\n", ()), Example("Q:dog\nA:", "mammal\n\n", ())]
    batch = collate(text, processor, 4, tokens, np.random.default_rng(0))
    assert batch.image_tokens is None and "inputs_embeds" not in batch.model_inputs(model)
    assert torch.isfinite(answer_loss(model, batch))


def test_answer_loss_equals_cross_entropy_of_full_logits_at_answer_positions(
    pool: list[EntityImage], tokens: TowerTokens
) -> None:
    model, processor = tiny_vlm()
    rng = np.random.default_rng(0)
    batch = collate([caption_example(image, rng) for image in pool[:4]], processor, 4, tokens, rng)
    with torch.no_grad():
        full = model(**batch.model_inputs(model)).logits
        expected = torch.nn.functional.cross_entropy(full[batch.predicts_answer], batch.targets)
        torch.testing.assert_close(answer_loss(model, batch), expected)


def test_text_steps_distil_toward_the_base_language_model_with_adapters_off(tokens: TowerTokens) -> None:
    model, processor = tiny_vlm()
    text = [Example("Q:France\nA:", "Paris\n\n", ()), Example("Q:dog\nA:", "mammal\n\n", ())]
    batch = collate(text, processor, 4, tokens, np.random.default_rng(0))
    with torch.no_grad():
        base_logits = model(**batch.model_inputs(model)).logits
    add_lora(model, rank=4, alpha=8, seed=0)
    lora = {name: parameter for name, parameter in model.named_parameters() if "lora_" in name}
    with torch.no_grad():
        for name, parameter in lora.items():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # peft starts B at zero: make the adapters change the model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in lora.values():
        parameter.requires_grad_(True)
    with torch.no_grad(), adapters_disabled(model):
        torch.testing.assert_close(model(**batch.model_inputs(model)).logits, base_logits)
    assert all(parameter.requires_grad for parameter in lora.values())
    assert not any(p.requires_grad for name, p in model.named_parameters() if name not in lora)
    assert not torch.allclose(model(**batch.model_inputs(model)).logits, base_logits)

    cross_entropy = answer_loss(model, batch)
    torch.testing.assert_close(text_step_loss(model, batch, 0.0), cross_entropy)
    with_distillation = text_step_loss(model, batch, 1.0)
    assert with_distillation > cross_entropy
    with_distillation.backward()
    assert all(parameter.grad is not None for parameter in lora.values())


def test_augmentation_is_seeded_and_sized(pool: list[EntityImage]) -> None:
    from taskvec.vlm.data import load_picture

    picture = load_picture(pool[0].path)
    first = augment(picture, np.random.default_rng(3), 16)
    again = augment(picture, np.random.default_rng(3), 16)
    assert first.size == (16, 16)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    examples = captions_and_questions(pool, 5, np.random.default_rng([1, 7]))
    assert examples == captions_and_questions(pool, 5, np.random.default_rng([1, 7]))


def test_instruct_stage_never_trains_the_paper_tasks() -> None:
    from taskvec.tasks.builtin import PAPER_TASKS

    tasks = training_icl_tasks()
    assert {task.name for task in tasks}.isdisjoint(PAPER_TASKS)
    assert {task.family for task in tasks} == {"countries", "animals", "foods"}
    with pytest.raises(ValueError, match="country-capital"):
        training_icl_tasks(("country-continent", "country-capital"))
    with pytest.raises(ValueError, match="reversed"):
        training_icl_tasks(formats=("name", "reversed"))


def test_each_family_has_several_in_context_tasks_over_the_same_entities() -> None:
    tasks = {task.name: task for task in training_icl_tasks()}
    for kind in ("flag", "animal", "food"):
        assert {"name", "capitals", "initial"} <= {
            name.rsplit("-", 1)[0] for name in tasks if name.endswith(kind)
        }
    assert tasks["capitals-flag"].answers["France"] == "FRANCE"
    assert tasks["initial-animal"].answers["dog"] == "D"
    assert tasks["name-food"].answers["lemon"] == "lemon"
    assert tasks["initial-flag"].answers.keys() == tasks["name-flag"].answers.keys()
    for family in ("countries", "animals", "foods"):
        assert sum(task.family == family for task in tasks.values()) >= 4


def test_icl_examples_use_the_evaluation_prompt_format(pool: list[EntityImage]) -> None:
    from taskvec.prompts import build_icl_prompt
    from taskvec.tasks import Item

    task = IclTask("toy", "countries", {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome"})
    pictures: dict[str, list[EntityImage]] = {}
    for image in pool:
        if image.family == "countries":
            pictures.setdefault(image.name, []).append(image)
    text = icl_example(task, pictures, 2, "text", np.random.default_rng(0))
    order = [line[2:] for line in text.prompt.split("\n") if line.startswith("Q:")]
    demos = [Item(name, task.answers[name]) for name in order[:-1]]
    expected = build_icl_prompt(demos, Item(order[-1], task.answers[order[-1]]))
    assert text.prompt == expected.text and text.answer == f"{task.answers[order[-1]]}\n\n"

    image = icl_example(task, pictures, 3, "image", np.random.default_rng(0))
    assert image.prompt.count("<image>") == len(image.images) == 4
    assert image.prompt.startswith("Q:<image>\nA:") and image.prompt.endswith("Q:<image>\nA:")
    assert image.answer == f"{task.answers[image.images[-1].name]}\n\n"
    assert all(picture.family == "countries" for picture in image.images)
    pieces = image.prompt.split("<image>")
    named = pieces[0] + "".join(p.name + rest for p, rest in zip(image.images, pieces[1:], strict=True))
    assert image.text_prompt == named and text.text_prompt is None


def test_instruct_batches_are_seeded_and_mix_questions_text_and_image_icl(pool: list[EntityImage]) -> None:
    tasks = training_icl_tasks()
    mix = InstructMix(icl_batch_size=3)
    kinds = set()
    for step in range(30):
        examples, _ = instruct_examples(pool, tasks, mix, 5, seed=1, step=step)
        again, _ = instruct_examples(pool, tasks, mix, 5, seed=1, step=step)
        assert examples == again
        if examples[0].prompt.startswith("Q:<image>"):
            kinds.add("image")
            assert len(examples) == 3
        elif examples[0].prompt.startswith("Q:"):
            kinds.add("text")
            assert not any(example.images for example in examples) and len(examples) == 3
        else:
            kinds.add("questions")
        # Only tasks with two pictured entities in the pool: the tiny pool has one food.
        with_images = [example for example in examples if example.prompt.startswith("Q:<")]
        assert all(example.images[0].family != "foods" for example in with_images)
    assert kinds == {"questions", "text", "image"}


def small_config(**steps: int) -> TrainConfig:
    config = TrainConfig(seed=0, checkpoint_every=2, tower=TOWER_SETTINGS)
    config.align = StageSettings(steps.get("align", 0), 4, 1e-2, 1)
    config.instruct = StageSettings(steps.get("instruct", 0), 4, 1e-2, 1)
    return config


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    # peft moves an adapted Linear's weight to `<module>.base_layer.weight`.
    after = {name.replace(".base_layer.", "."): value for name, value in model.state_dict().items()}
    return {name for name, value in before.items() if not torch.equal(value, after[name])}


def test_align_stage_trains_only_the_projector(
    pool: list[EntityImage], tokens: TowerTokens, tmp_path: Path
) -> None:
    model, processor = tiny_vlm()
    before = snapshot(model)
    result = train_vlm(
        model, processor, pool, tokens, small_config(align=3), tmp_path, progress=False, stages=("align",)
    )
    assert len(result.state.losses["align"]) == 3 and all(np.isfinite(result.state.losses["align"]))
    moved = changed(before, model)
    assert moved and all(name.startswith("model.multi_modal_projector.") for name in moved)


@pytest.mark.parametrize("trains_projector", [False, True])
def test_instruct_stage_moves_the_language_model_through_lora_but_never_the_tower(
    pool: list[EntityImage], tokens: TowerTokens, tmp_path: Path, trains_projector: bool
) -> None:
    model, processor = tiny_vlm()
    config = small_config(align=1, instruct=3)
    config.instruct_trains_projector = trains_projector
    train_vlm(model, processor, pool, tokens, config, tmp_path, progress=False, stages=("align",))
    before = snapshot(model)
    train_vlm(model, processor, pool, tokens, config, tmp_path, progress=False)
    after = {name: value for name, value in model.state_dict().items() if "lora_B" in name}
    assert after and any(torch.count_nonzero(value) for value in after.values())
    assert all(".self_attn." in name for name in after)
    moved = changed(before, model)
    assert not any(name.startswith("model.vision_tower.") for name in moved)
    assert any(name.startswith("model.multi_modal_projector.") for name in moved) == trains_projector


def test_image_steps_distil_toward_the_base_language_model_reading_the_names(
    pool: list[EntityImage], tokens: TowerTokens
) -> None:
    model, processor = tiny_vlm()
    task = IclTask("toy", "countries", {"France": "Paris", "Japan": "Tokyo"})
    pictures: dict[str, list[EntityImage]] = {}
    for image in pool:
        if image.family == "countries":
            pictures.setdefault(image.name, []).append(image)
    examples = [icl_example(task, pictures, 2, "image", np.random.default_rng(seed)) for seed in range(3)]
    rng = np.random.default_rng(0)
    batch = collate(examples, processor, 4, tokens, rng)
    twins = [Example(example.text_prompt or "", example.answer, ()) for example in examples]
    named = collate(twins, processor, 4, tokens, None)
    with torch.no_grad():
        base_logits = model(**named.model_inputs(model)).logits[named.predicts_answer]
    add_lora(model, rank=4, alpha=8, seed=0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    student = model(**batch.model_inputs(model)).logits[batch.predicts_answer]
    expected = torch.nn.functional.cross_entropy(student, batch.targets) + 0.5 * torch.nn.functional.kl_div(
        student.log_softmax(-1), base_logits.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    torch.testing.assert_close(image_step_loss(model, batch, named, 0.5), expected)
    torch.testing.assert_close(image_step_loss(model, batch, named, 0.0), answer_loss(model, batch))


def test_align_targets_are_the_names_input_embeddings_and_the_loss_falls(
    pool: list[EntityImage], tokens: TowerTokens
) -> None:
    model, processor = tiny_vlm()
    entities = sorted({image.entity for image in pool})
    targets = name_embedding_targets(model, processor.tokenizer, entities, 4)
    france = targets.tiled[targets.index["countries/France"]]
    ids = processor.tokenizer("France", add_special_tokens=False).input_ids
    embedded = model.get_input_embeddings()(torch.tensor(ids)).detach()
    torch.testing.assert_close(france, embedded[torch.arange(4) % len(ids)])
    image_tokens, drawn = align_batch(pool, tokens, 6, seed=0, step=0)
    again, drawn_again = align_batch(pool, tokens, 6, seed=0, step=0)
    assert torch.equal(image_tokens, again) and drawn == drawn_again
    optimizer = torch.optim.AdamW(model.model.multi_modal_projector.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = align_loss(model, image_tokens, drawn, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_projector_loss_falls_on_a_fixed_batch(pool: list[EntityImage], tokens: TowerTokens) -> None:
    model, processor = tiny_vlm()
    rng = np.random.default_rng(0)
    batch = collate([caption_example(image, rng) for image in pool[:4]], processor, 4, tokens, rng)
    optimizer = torch.optim.AdamW(model.model.multi_modal_projector.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = answer_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_resumed_training_equals_uninterrupted_training(
    pool: list[EntityImage], tokens: TowerTokens, tmp_path: Path
) -> None:
    straight, processor = tiny_vlm()
    config = small_config(align=2, instruct=3)
    train_vlm(straight, processor, pool, tokens, config, tmp_path / "a", progress=False)

    resumed, processor = tiny_vlm()
    first = train_vlm(
        resumed, processor, pool, tokens, config, tmp_path / "b", progress=False, time_limit_seconds=0.0
    )
    assert first.stopped_early and first.state.stage == "align" and first.state.step == 1
    fresh, processor = tiny_vlm()  # a new process: nothing but the checkpoint carries over
    final = train_vlm(fresh, processor, pool, tokens, config, tmp_path / "b", progress=False)
    assert final.state.stage == "instruct" and final.state.finished
    expected = dict(straight.named_parameters())
    for name, parameter in fresh.named_parameters():
        torch.testing.assert_close(parameter, expected[name], rtol=0, atol=0, msg=name)


def test_a_later_stage_retrains_from_the_kept_end_of_the_earlier_one(
    pool: list[EntityImage], tokens: TowerTokens, tmp_path: Path
) -> None:
    first, processor = tiny_vlm()
    train_vlm(
        first, processor, pool, tokens, small_config(align=2, instruct=2), tmp_path / "a", progress=False
    )
    assert (tmp_path / "a/after-align/state.json").is_file()

    changed_recipe = small_config(align=2, instruct=3)
    changed_recipe.instruct.learning_rate = 3e-3
    again, processor = tiny_vlm()
    result = train_vlm(
        again, processor, pool, tokens, changed_recipe, tmp_path / "a", progress=False,
        restart_after="align",
    )  # fmt: skip
    assert result.state.stage == "instruct" and len(result.state.losses["instruct"]) == 3
    straight, processor = tiny_vlm()
    train_vlm(straight, processor, pool, tokens, changed_recipe, tmp_path / "b", progress=False)
    expected = dict(straight.named_parameters())
    for name, parameter in again.named_parameters():
        torch.testing.assert_close(parameter, expected[name], rtol=0, atol=0, msg=name)
    with pytest.raises(FileNotFoundError, match="after-align"):
        train_vlm(
            *tiny_vlm(),
            pool,
            tokens,
            changed_recipe,
            tmp_path / "c",
            progress=False,
            restart_after="align",
        )


def test_shipped_parts_rebuild_the_trained_model_and_export_as_plain_llava(
    pool: list[EntityImage], tokens: TowerTokens, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, processor = tiny_vlm()
    config = small_config(align=2, instruct=2)
    before = snapshot(model)
    train_vlm(model, processor, pool, tokens, config, tmp_path / "ckpt", progress=False)
    moved = changed(before, model)
    assert not any("language_model" in name and "lora_" not in name for name in moved)
    save_parts(
        model, tmp_path / "parts", lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
        base_model="tiny",
    )  # fmt: skip
    assert (tmp_path / "parts" / PROJECTOR_FILE).is_file() and (tmp_path / "parts" / LORA_FILE).is_file()
    card = write_model_card(tmp_path / "parts").read_text()
    assert f"rank-{config.lora_rank} LoRA" in card and "not run yet" in card
    acceptance = {
        "recognition": {"animals": {"noto": {"accuracy": 0.5, "pictures": 4, "held_out": True}}},
        "icl": {"animal-young": dict.fromkeys(
            ("text_icl_base_lm", "text_icl_vlm", "image_icl_vlm", "no_context_image_vlm"), 0.25)},
        "residual_cosine_per_layer": [0.99, 0.98],
        "settings": {"shots": 5},
    }  # fmt: skip
    (tmp_path / "parts" / ACCEPTANCE_FILE).write_text(json.dumps(acceptance))
    card = write_model_card(tmp_path / "parts").read_text()
    assert "| animals | **noto (held out)** | 4 | 0.50 |" in card and "0.990 0.980" in card
    # Weaknesses are stated from the figures: image ICL equal to the query alone is one, text is not.
    assert "Image in-context learning (0.25) does not beat the image query alone (0.25)" in card
    assert "Text in-context learning fell" not in card
    assert "Against the default VLM it replaced" not in card
    previous = {
        **acceptance,
        "recognition": {"animals": {"noto": {"accuracy": 0.25, "pictures": 4, "held_out": True}}},
    }
    previous["residual_cosine_per_layer"] = [1.0, 0.995]
    # Shipping replaces the old parts whole and keeps their acceptance figures for the comparison.
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / ACCEPTANCE_FILE).write_text(json.dumps(previous))
    (shipped / "vision.safetensors").write_bytes(b"old model")
    ship_parts(tmp_path / "parts", shipped)
    assert not (shipped / "vision.safetensors").exists()
    assert json.loads((shipped / PREVIOUS_ACCEPTANCE_FILE).read_text()) == previous
    assert json.loads((shipped / ACCEPTANCE_FILE).read_text()) == acceptance
    card = (shipped / "MODEL_CARD.md").read_text()
    assert "| naming, held-out style, animals | 0.25 | 0.50 |" in card
    assert "| base-LM / VLM text-ICL cosine, lowest layer | 0.995 | 0.980 |" in card

    # The parts carry no tower weights: a rebuild gives the tower the ImageNet weights, here the
    # tiny models' random ones.
    tower_state = {name: value.clone() for name, value in model.model.vision_tower.state_dict().items()}
    monkeypatch.setattr(
        ImagenetColourTower, "load_imagenet_weights", lambda self: self.load_state_dict(tower_state)
    )
    language_model, tokenizer = tiny_language_model()
    rebuilt, rebuilt_processor = build_vlm(language_model, tokenizer, tmp_path / "parts")
    assert type(rebuilt) is transformers.LlavaForConditionalGeneration
    assert not any("lora" in name for name, _ in rebuilt.named_parameters())
    inputs = ModelHandle.wrap(rebuilt, rebuilt_processor).build_inputs(["Q:<image>\nA:"], [[random_image(4)]])
    with torch.no_grad():
        trained_logits = model(**inputs).logits
        rebuilt_logits = rebuilt(**inputs).logits
    torch.testing.assert_close(rebuilt_logits, trained_logits, atol=1e-5, rtol=1e-4)

    export = export_checkpoint(rebuilt, rebuilt_processor, tmp_path / "hf")
    assert json.loads((export / "config.json").read_text())["vision_config"]["model_type"] == (
        "taskvec_imagenet_colour"
    )
    loaded = transformers.LlavaForConditionalGeneration.from_pretrained(export).eval()
    loaded_processor = transformers.AutoProcessor.from_pretrained(export)
    assert type(loaded_processor) is transformers.LlavaProcessor
    again = ModelHandle.wrap(loaded, loaded_processor).build_inputs(["Q:<image>\nA:"], [[random_image(4)]])
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**again).logits, rebuilt_logits, atol=1e-5, rtol=1e-4)
    handle = load_model(str(export))  # through taskvec's loader, the LLaVA adapter
    assert handle.architecture.family == "llava"
    with torch.no_grad():
        torch.testing.assert_close(handle.model(**again).logits, rebuilt_logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("answer", "name", "correct"),
    [(" France\n", "France", True), ("Fra", "France", True), ("polar bear", "polar bear", True),
     ("Dog.", "dog", True), ("", "dog", False), ("Japan", "France", False)],
)  # fmt: skip
def test_naming_metric_is_a_prefix_match(answer: str, name: str, correct: bool) -> None:
    image = EntityImage("animals", name, "twemoji", Path("x.png"))
    assert Naming(image, answer).correct is correct


def test_default_vlm_without_its_parts_says_how_to_make_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskvec.models import load_model
    from taskvec.vlm import recipe

    monkeypatch.setattr(recipe, "SHIPPED_PARTS_DIR", tmp_path / "absent")
    with pytest.raises(recipe.DefaultVLMMissingError, match="taskvec train-vlm"):
        load_model("default-vlm")
