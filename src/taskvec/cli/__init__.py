"""`taskvec ...`: the command line, thin over the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from taskvec.cli.run_command import ModelOutcome
    from taskvec.engine import PatchMode
    from taskvec.function_vectors.settings import FunctionVectorSettings
    from taskvec.prompts.settings import PromptSettings

# Function vectors are added to the residual, task vectors replace it (the paper's protocol).
MODE_HELP = "replace or add to the residual (default: add for a function vector, else replace)"


def _command_models(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from taskvec.models import ARCHITECTURES
    from taskvec.models.image_settings import image_settings_for
    from taskvec.models.loading import NAMED_MODELS

    if args.json:
        named = [
            {
                "names": list(m.names),
                "base_lm": m.base_lm,
                "description": m.description,
                "image_width": m.image_width,
            }
            for m in NAMED_MODELS
        ]
        architectures = [
            {**asdict(entry), "image_settings": image_settings_for(entry).as_record()}
            for entry in ARCHITECTURES
        ]
        print(json.dumps({"architectures": architectures, "named": named}, indent=1))
        return 0
    print(f"{'family':16s} {'model class':42s} {'images':7s} {'sweep':9s} image settings (default width 224)")
    for entry in ARCHITECTURES:
        images = "yes" if entry.is_vision_language else "-"
        sweep = "one-pass" if entry.cached_step and not entry.bidirectional_prompt else "batched"
        defaults = (*entry.image_defaults, *entry.image_processor_defaults)
        settings = ", ".join(f"{key}={value!r}" for key, value in defaults) or "-"
        shown = settings if entry.is_vision_language else ""
        print(f"{entry.family:16s} {entry.model_class:42s} {images:7s} {sweep:9s} {shown}")
    print()
    for model in NAMED_MODELS:
        print(f"{model.names[0]!r}: {model.description}")
    print(
        "Checkpoints of the classes above load by directory or hub id (org/name, --revision); other"
        " image-text models load if they follow transformers' common layout (with a warning)."
    )
    return 0


def _command_tasks(args: argparse.Namespace) -> int:
    from taskvec.tasks.summary import task_summaries, task_table

    print(json.dumps(task_summaries(), indent=2) if args.json else task_table())
    return 0


def _command_demo(args: argparse.Namespace) -> int:
    from taskvec.experiments.demo import run_demo
    from taskvec.models import load_model
    from taskvec.tasks import load_task

    task = load_task(args.task, strict=args.strict)  # before the model: a bad task fails in milliseconds
    handle = load_model(args.model, _load_options(args))
    prompts = _prompt_settings(args)
    result = run_demo(
        handle,
        task,
        shots=prompts.shots,
        seed=prompts.seed,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        template=prompts.template,
    )
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    count = result.max_new_tokens
    protocol = "the run's protocol" if count == 1 else "`taskvec run` scores 1 token"
    print(
        f"{result.task} on {result.model}, {result.test_items} test items, "
        f"vector from {result.shots}-shot text prompts (seed {result.seed})"
    )
    print(f"  accuracy: {result.metric} match, {count} generated token{'s' * (count > 1)} ({protocol})")
    patched = "not tested" if result.patched is None else f"{result.patched:.2f}"
    rows = [
        ("no context", f"{result.no_context:.2f}"),
        (f"{result.shots}-shot in context", f"{result.in_context:.2f}"),
        (f"patched ({result.placement})", patched),
    ]
    for label, value in rows:
        print(f"  {label:32s}{value}")
    candidates = result.candidate_layers
    print(
        f"  (patching layer chosen on validation among layers {candidates[0]}-{candidates[-1]} of "
        f"{len(result.validation_accuracy_per_layer)}; it must beat the unpatched validation queries' "
        f"{result.unpatched_validation:.2f})"
    )
    curve = " ".join(f"{value:.2f}" for value in result.validation_accuracy_per_layer)
    print(f"  validation accuracy per layer: {curve}")
    return 0


def _command_extract(args: argparse.Namespace) -> int:
    from taskvec.models import load_model
    from taskvec.tasks import load_task
    from taskvec.vectors import extract_vector, parse_spec, save_task_vector

    spec = parse_spec(args.spec)
    task = load_task(args.task, strict=args.strict)
    handle = load_model(args.model, _load_options(args))
    extraction = extract_vector(
        handle,
        task,
        spec,
        settings=_prompt_settings(args),
        split=args.split,
        limit=args.limit,
        progress=None if args.json else f"{task.name} {spec.value} vector",
    )
    vector = extraction.vector
    path = save_task_vector(vector, args.out)
    print(json.dumps({"out": str(path), **vector.metadata}) if args.json else f"wrote {path}")
    return 0


def _command_patch(args: argparse.Namespace) -> int:
    from PIL import Image

    from taskvec.engine import Patch, generate_greedy
    from taskvec.models import IMAGE_PLACEHOLDER, load_model
    from taskvec.prompts import Prompt, as_template, encode_prompts, model_texts, query_marker_columns
    from taskvec.tasks.images import read_rgb
    from taskvec.vectors import load_task_vector
    from taskvec.vectors.task_vector import check_layers, check_vector_fits

    vector = load_task_vector(args.vector)
    check_layers(vector, [args.layer], args.vector)  # before the model: a bad layer fails in milliseconds
    template = as_template(args.template)
    if args.image is not None:
        images: tuple[Image.Image, ...] = (read_rgb(args.image),)
        query = Prompt(template.query.format(input=IMAGE_PLACEHOLDER), images, chat=template.chat)
    else:
        query = Prompt(template.query.format(input=args.text), chat=template.chat)
    handle = load_model(args.model, _load_options(args))
    check_vector_fits(vector, handle, args.vector, layers=[args.layer])
    inputs = encode_prompts(handle, [query])
    # At the query's answer marker: the last token under qa, before the chat template's own tokens.
    column = query_marker_columns(handle, inputs, template.marker)
    mode = _patch_mode(args.mode, vector.metadata)
    patch = Patch(args.layer, vector.at(args.layer), position=column, mode=mode, scale=args.scale)
    result = {
        "prompt": model_texts(handle, [query])[0],
        "layer": args.layer,
        "mode": mode,
        "unpatched": generate_greedy(handle, inputs, max_new_tokens=args.max_new_tokens)[0],
        "patched": generate_greedy(handle, inputs, [patch], max_new_tokens=args.max_new_tokens)[0],
    }
    print(
        json.dumps(result)
        if args.json
        else f"unpatched: {result['unpatched']!r}\npatched:   {result['patched']!r}"
    )
    return 0


def _patch_mode(asked: str | None, metadata: dict[str, Any]) -> PatchMode:
    """The mode asked for, else the vector's own: function vectors are added, task vectors replace."""
    if asked is not None:
        return "add" if asked == "add" else "replace"
    return "add" if metadata.get("kind") == "function-vector" else "replace"


def _command_heads(args: argparse.Namespace) -> int:
    from taskvec.function_vectors import find_function_vector
    from taskvec.models import load_model
    from taskvec.tasks import load_task
    from taskvec.vectors import save_task_vector

    task = load_task(args.task, strict=args.strict)
    handle = load_model(args.model, _load_options(args))
    if args.across_modalities:
        return _heads_across_modalities(args, handle, task)
    found = find_function_vector(
        handle,
        task,
        args.spec,
        settings=_function_vector_settings(args),
        prompts=_prompt_settings(args),
        split=args.split,
        memory_budget=args.sweep_memory,
        progress=not args.json,
    )
    heads = [
        {"layer": layer, "head": head, "effect": float(found.effects[layer, head])}
        for layer, head in found.heads
    ]
    out = None
    if args.out:
        out = str(save_task_vector(found.as_task_vector(handle.num_layers), args.out))
    if args.figure:
        modality = args.spec.removesuffix("-icl")
        _save_head_effects(args.figure, {modality: found.effects.tolist()}, {modality: found.heads})
    if args.json:
        print(
            json.dumps(
                {"task": task.name, "spec": args.spec, "top_heads": heads, "out": out, **found.metadata}
            )
        )
        return 0
    print(f"top {len(heads)} heads of {task.name} ({args.spec}), by mean indirect effect:")
    for entry in heads:
        print(f"  layer {entry['layer']:3d}  head {entry['head']:3d}  {entry['effect']:+.4f}")
    if out:
        print(f"wrote the function vector (sum of their mean outputs) to {out}")
    return 0


def _save_head_effects(path: str, effects: Any, top_heads: Any) -> None:
    from taskvec.report.figures import head_effects, save_figure

    figure = head_effects(effects, top_heads)
    if figure is not None:
        save_figure(figure, Path(path))


def _heads_across_modalities(args: argparse.Namespace, handle: Any, task: Any) -> int:
    from taskvec.function_vectors import compare_modalities

    if not handle.architecture.is_vision_language:
        raise SystemExit(f"taskvec: --across-modalities needs a vision-language model; {args.model} is not")
    comparison = compare_modalities(
        handle,
        task,
        k=args.heads,
        shots=args.shots,
        mean_prompts=args.mean_prompts,
        effect_prompts=args.effect_prompts,
        scales=args.scales,
        seed=args.seed,
        style=args.style,
        template=args.template,
        memory_budget=args.sweep_memory,
        progress=not args.json,
    )
    if args.figure:
        _save_head_effects(args.figure, comparison.effects, comparison.top_heads)
    if args.json:
        print(json.dumps(comparison.to_json()))
        return 0
    k = comparison.k
    print(f"{task.name}: top {k} heads by indirect effect")
    for modality, heads in comparison.top_heads.items():
        print(f"  {modality:5s} ICL: {' '.join(f'{layer}.{head}' for layer, head in heads)}")
    print(f"  shared: {len(comparison.shared_heads)} of {k}")
    print("test accuracy (layer and scale chosen on validation, not tested when no layer helped):")
    for target, accuracy in comparison.no_context.items():
        print(f"  no context -> {target:5s}        {accuracy:.2f}")
    for transfer in comparison.transfers:
        interval = transfer.interval
        if transfer.test_accuracy is None or interval is None:
            print(
                f"  {transfer.name:20s} -  {transfer.placement} (no candidate layer beat the "
                f"unpatched validation queries' {transfer.unpatched_validation:.2f})"
            )
            continue
        print(
            f"  {transfer.name:20s} {transfer.test_accuracy:.2f} [{interval.low:.2f}, {interval.high:.2f}]"
            f"  {transfer.placement}"
        )
    return 0


def _command_sweep(args: argparse.Namespace) -> int:
    from taskvec.evaluation import accuracy, generate_answers, sweep_accuracy
    from taskvec.layer_choice import choose_on_validation, default_candidates
    from taskvec.models import load_model
    from taskvec.prompts import build_query_prompt
    from taskvec.tasks import load_task
    from taskvec.vectors import load_task_vector
    from taskvec.vectors.task_vector import check_vector_fits

    vector = load_task_vector(args.vector)
    items = load_task(args.task, strict=args.strict).split(args.split)[: args.limit]
    handle = load_model(args.model, _load_options(args))
    check_vector_fits(vector, handle, args.vector)
    prompts = [
        build_query_prompt(item, modality=args.modality, style=args.style, template=args.template)
        for item in items
    ]
    candidates = default_candidates(handle.num_layers)
    answers = [item.answers() for item in items]
    per_layer = sweep_accuracy(
        handle,
        prompts,
        answers,
        vector.vectors,
        progress="layer sweep",
        memory_budget=args.sweep_memory,
        mode=_patch_mode(args.mode, vector.metadata),
        scale=args.scale,
    )
    # The bare queries scored as the sweep is (first token): the reference a layer must beat.
    unpatched = accuracy(generate_answers(handle, prompts, max_new_tokens=1), answers)
    choice = choose_on_validation(
        {args.scale: {args.task: [per_layer]}}, candidates, unpatched={args.task: unpatched}, scaled=False
    )
    if args.json:
        record: dict[str, Any] = {"task": args.task, "split": args.split, "items": len(items)}
        record |= {"accuracy": per_layer, "unpatched": unpatched, "candidates": candidates}
        print(json.dumps({**record, "chosen": choice.chosen}))
    else:
        marks = {layer: "  (not a candidate)" for layer in range(len(per_layer)) if layer not in candidates}
        if choice.chosen is not None:
            marks[choice.chosen] = "  <- chosen"
        for layer, value in enumerate(per_layer):
            print(f"layer {layer:3d}  {value:.2f}{marks.get(layer, '')}")
        print(f"unpatched  {unpatched:.2f}")
        print(f"the run's layer choice on these items: {choice.text}")
    return 0


def _command_lens(args: argparse.Namespace) -> int:
    from taskvec.analysis import lens_phases
    from taskvec.models import load_model
    from taskvec.tasks import load_task
    from taskvec.vectors import EXTRACTABLE_SPECS, parse_spec

    task = load_task(args.task, strict=args.strict)
    handle = load_model(args.model, _load_options(args))
    specs = EXTRACTABLE_SPECS if args.spec == "all" else (parse_spec(args.spec),)
    result = lens_phases(
        handle,
        task,
        specs=specs,
        max_prompts=args.prompts,
        prompts=_prompt_settings(args),
        task_word_reduce=args.task_word_reduce,
        progress=not args.json,
    )
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    for spec, reason in result.skipped.items():
        print(f"{spec}: not run ({reason})")
    for spec, curves in result.curves.items():
        peaks = ", ".join(f"{phase} {layer}" for phase, layer in curves.peak_layer.items())
        print(f"{task.name}, {spec}, {curves.prompts} prompts; peak layers: {peaks}")
        print("layer   input    task  answer   (relative probability over layers)")
        for layer in range(handle.num_layers):
            values = "".join(f"{curves.relative[phase][layer]:8.3f}" for phase in ("input", "task", "answer"))
            print(f"{layer:5d}{values}")
    return 0


def _command_check(args: argparse.Namespace) -> int:
    from taskvec.checks import format_table, run_checks
    from taskvec.models import load_model
    from taskvec.typed_json import to_json

    loaded = [load_model(args.model, _load_options(args))]
    if args.llm:
        loaded.append(load_model(args.llm, _load_options(args, for_llm=True)))
    checked = []
    for handle in loaded:
        checks = run_checks(handle, args.template, only=args.only)
        checked.append(checks)
        if not args.json:
            print(format_table(checks))
    if args.json:
        print(json.dumps({"checks": [to_json(checks) for checks in checked]}))
    for checks in checked:
        for row in checks.failures:
            print(f"taskvec: {row.failure_line(checks.model)}", file=sys.stderr)
    return 1 if any(checks.failures for checks in checked) else 0


def _analyse_run_directory(args: argparse.Namespace, run_dir: Path) -> None:
    """The analyses of a run directory: at the run's layer with its vectors when it has results.json,
    else over the given tasks with vectors computed here, at the middle layer."""
    from taskvec.analysis import QUICK, AnalysisSettings, analysis_vectors, run_analyses
    from taskvec.caching import StepCache
    from taskvec.experiments import RunResults, run_analyses_of_run
    from taskvec.models import load_model
    from taskvec.tasks import PAPER_TASKS, load_task

    handle = load_model(args.model, _load_options(args))
    llm = load_model(args.llm, _load_options(args, for_llm=True)) if args.llm else None
    if (run_dir / "results.json").is_file() and not args.tasks:
        run_analyses_of_run(handle, RunResults.read(run_dir / "results.json"), run_dir, llm=llm)
        return
    tasks = [load_task(name, strict=args.strict) for name in args.tasks or PAPER_TASKS]
    settings = QUICK if args.quick else AnalysisSettings()
    vectors = analysis_vectors(handle, tasks, llm=llm, settings=settings, progress=True)
    layer = handle.num_layers // 2
    document = run_analyses(
        handle,
        tasks,
        layer=layer,
        layer_source="the middle layer (no run results to take a chosen layer from)",
        vectors=vectors,
        cache=StepCache(run_dir / "cache"),
        llm=llm,
        settings=settings,
    )
    document.write(run_dir / "analysis.json")


def _command_report(args: argparse.Namespace) -> int:
    from taskvec.report import write_report

    run_dir = Path(args.dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory at {run_dir}")
    if args.analyse:
        _analyse_run_directory(args, run_dir)
    report = write_report(run_dir)
    if args.json:
        analysis = run_dir / "analysis.json"
        written = {"report": str(report), "analysis": str(analysis) if analysis.is_file() else None}
        print(json.dumps(written))
    else:
        print(report)
    return 0


def _command_train_vlm(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from taskvec.vlm.card import write_model_card
    from taskvec.vlm.recipe import SHIPPED_PARTS_DIR, ship_parts, train_default_vlm
    from taskvec.vlm.training import TrainConfig

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    record = train_default_vlm(
        out,
        TrainConfig(seed=args.seed),
        time_limit_seconds=args.time_limit_minutes * 60,
        restart_after=args.restart_after,
    )
    if not record["finished"]:
        if args.json:
            print(json.dumps({"finished": False, "checkpoint": str(out / "checkpoint")}))
        else:
            print(f"stopped at the time limit; checkpoint in {out / 'checkpoint'}; run again to resume")
        return 0
    write_model_card(out / "parts")
    if args.ship:
        ship_parts(out / "parts")
    recognition = record.get("recognition", {})
    if args.json:
        shipped = str(SHIPPED_PARTS_DIR) if args.ship else None
        trained = {"finished": True, "parts": str(out / "parts"), "shipped_to": shipped}
        print(json.dumps({**trained, "recognition": recognition}))
    elif args.ship:
        print(json.dumps(recognition, indent=1))
        print(f"shipped the parts to {SHIPPED_PARTS_DIR}; measure them: python scripts/evaluate_vlm.py")
    else:
        print(json.dumps(recognition, indent=1))
        print(f"parts in {out / 'parts'}; load them with taskvec.vlm.recipe.load_vlm_from_parts")
    return 0


def _command_export_vlm(args: argparse.Namespace) -> int:
    from pathlib import Path

    from taskvec.models import load_model
    from taskvec.vlm.artifacts import export_checkpoint

    handle = load_model("default-vlm")
    directory = export_checkpoint(handle.model, handle.processor, Path(args.out))
    if args.json:
        print(json.dumps({"out": str(directory), "model_class": type(handle.model).__name__}))
    else:
        print(f"wrote a LlavaForConditionalGeneration checkpoint to {directory}")
    return 0


def _command_run(args: argparse.Namespace) -> int:
    import contextlib

    from taskvec.cli.run_command import summary_lines

    # With --json the printed tables and notes go to stderr, so stdout holds the JSON document alone.
    printed = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with printed:
        outcomes = _run_and_report(args)
        if len(outcomes) > 1:
            print("\n" + "\n".join(summary_lines(outcomes)))
    if args.json:
        print(json.dumps(_runs_document(outcomes)))
    elif len(outcomes) == 1 and outcomes[0].report is not None:
        print(f"wrote {outcomes[0].report}")
    # Every model ran; a failed one is named above, and the exit status says some did fail.
    return 1 if any(outcome.error is not None for outcome in outcomes) else 0


def _run_and_report(args: argparse.Namespace) -> list[ModelOutcome]:
    """Each model's outcome with its report written. Reports are written one after another, after
    every model ran: matplotlib's pyplot is not safe to use from several threads."""
    import dataclasses

    from taskvec.cli.run_command import run_command
    from taskvec.report import write_report

    outcomes, report = run_command(args)
    if not report:
        return outcomes
    if len(outcomes) == 1:  # one model: a failing report is the command's error, as it always was
        return [dataclasses.replace(outcomes[0], report=write_report(outcomes[0].out))]
    reported = []
    for outcome in outcomes:
        if outcome.error is None:
            try:
                outcome = dataclasses.replace(outcome, report=write_report(outcome.out))
            except Exception as error:
                print(f"taskvec: error: model {outcome.model}: report: {error}", file=sys.stderr)
                outcome = dataclasses.replace(outcome, error=f"report: {error}")
        reported.append(outcome)
    return reported


def _runs_document(outcomes: list[ModelOutcome]) -> dict[str, Any]:
    """One model: its run's document, as before several were possible; several: one each, named."""
    if len(outcomes) == 1:
        return _run_document(outcomes[0])
    return {"runs": [{"model": o.model, **_run_document(o), "error": o.error} for o in outcomes]}


def _run_document(outcome: ModelOutcome) -> dict[str, Any]:
    """What --json prints of one model's run (its paths None where the run failed)."""
    from taskvec.typed_json import to_json

    out, results = outcome.out, outcome.results
    files = {"results": out / "results.json", "summary_csv": out / "summary.csv", "report": outcome.report}
    paths = {key: str(path) if path and results is not None else None for key, path in files.items()}
    seconds = results.meta.seconds if results is not None else None
    summaries = to_json(results.summaries) if results is not None else None
    return {"run_dir": str(out), **paths, "seconds": seconds, "summaries": summaries}


def _add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _add_prompt_options(parser: argparse.ArgumentParser, *used: str) -> None:
    """The fields of taskvec.prompts.settings.PromptSettings that a command uses, as its flags."""
    from taskvec.options import add_options
    from taskvec.prompts.settings import PromptSettings

    add_options(parser, PromptSettings, fill_defaults=True, only=used)


def _prompt_settings(args: argparse.Namespace) -> PromptSettings:
    from taskvec.options import options_instance
    from taskvec.prompts.settings import PromptSettings

    return options_instance(PromptSettings, args)


def _function_vector_settings(args: argparse.Namespace) -> FunctionVectorSettings:
    from taskvec.function_vectors.settings import FunctionVectorSettings
    from taskvec.options import options_instance

    return options_instance(FunctionVectorSettings, args)


def _add_strict_option(parser: argparse.ArgumentParser) -> None:
    from taskvec.tasks import STRICT_HELP

    parser.add_argument("--strict", action="store_true", help=STRICT_HELP)


def _add_task_options(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """--task (required unless given a default) and --strict, as every one-task command takes them."""
    help_text = "a built-in task name or a task file"
    parser.add_argument("--task", required=default is None, default=default, help=help_text)
    _add_strict_option(parser)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """Declared with their defaults in RunCommandOptions and RunConfig (see taskvec.options)."""
    from taskvec.cli.run_command import PER_MODEL_OPTIONS, RunCommandOptions
    from taskvec.experiments.config import RunConfig
    from taskvec.options import add_options

    add_options(parser, RunCommandOptions, fill_defaults=True)
    # RunCommandOptions holds one model's options; the command line takes several models (one run
    # each), so these take several values. Unset, they keep their default: one value, a string.
    for action in parser._actions:
        if action.dest in PER_MODEL_OPTIONS:
            action.nargs = "+"
    _add_load_options(parser)
    add_options(parser.add_argument_group("experiment options (defaults: the paper's protocol)"), RunConfig)


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    from taskvec.models.load_options import LoadOptions
    from taskvec.options import add_options

    add_options(parser.add_argument_group("model loading (taskvec.models.LoadOptions)"), LoadOptions)


def _load_options(args: argparse.Namespace, for_llm: bool = False) -> Any:
    """The LoadOptions given on the command line; an LLM takes the placement options only."""
    import dataclasses

    from taskvec.models.load_options import LoadOptions
    from taskvec.options import options_from_args

    options = LoadOptions(**options_from_args(LoadOptions, args))
    return dataclasses.replace(options, revision=None, processor_kwargs=None) if for_llm else options


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model and --json (taskvec.options.ModelOptions), and how the model loads (LoadOptions)."""
    from taskvec.options import ModelOptions, add_options

    add_options(parser, ModelOptions, fill_defaults=True)
    _add_load_options(parser)


class _CommandParser(argparse.ArgumentParser):
    """A command's parser whose flags are added by `arguments` when it first parses or shows its
    help: flags declared in heavy modules (torch, transformers) cost nothing to the other commands."""

    def __init__(
        self, *args: Any, arguments: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._pending_arguments = arguments

    def add_declared_arguments(self) -> None:
        if self._pending_arguments is not None:
            add, self._pending_arguments = self._pending_arguments, None
            add(self)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self.add_declared_arguments()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.add_declared_arguments()
        return super().format_usage()

    def format_help(self) -> str:
        self.add_declared_arguments()
        return super().format_help()


def _models_arguments(models: argparse.ArgumentParser) -> None:
    models.add_argument("--json", action="store_true", help="machine-readable output")


def _tasks_arguments(tasks: argparse.ArgumentParser) -> None:
    tasks.add_argument("--json", action="store_true", help="machine-readable output")


def _demo_arguments(demo: argparse.ArgumentParser) -> None:
    from taskvec.options import at_least

    _add_model_options(demo)
    _add_task_options(demo, default="country-capital")
    _add_prompt_options(demo, "shots", "seed", "template")
    demo.add_argument("--limit", type=at_least(1), default=None, help="score only the first N test items")
    demo.add_argument(
        "--max-new-tokens",
        type=at_least(1),
        default=1,
        help="tokens generated per answer, prefix-matched (default 1: the run's protocol)",
    )


def _extract_arguments(extract: argparse.ArgumentParser) -> None:
    from taskvec.options import at_least
    from taskvec.vectors import EXTRACTABLE_SPECS

    spec_names = [spec.value for spec in EXTRACTABLE_SPECS]

    _add_model_options(extract)
    _add_task_options(extract)
    _add_prompt_options(extract, "shots", "seed", "style", "template", "batch_size")
    extract.add_argument("--spec", default="text-icl", choices=spec_names)
    extract.add_argument("--split", default="val", help="prompts are built from this split")
    extract.add_argument(
        "--limit", type=at_least(1), default=None, help="only the first N queries of the split"
    )
    extract.add_argument("--out", required=True, help="output .safetensors path")


def _patch_arguments(patch: argparse.ArgumentParser) -> None:
    from taskvec.options import at_least

    _add_model_options(patch)
    patch.add_argument("--vector", required=True, help="a .safetensors task vector")
    patch.add_argument("--layer", type=int, required=True)
    query = patch.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="the query input, asked as Q:{text}\\nA:")
    query.add_argument("--image", help="an image file, asked as Q:<image>\\nA:")
    patch.add_argument("--mode", default=None, choices=["replace", "add"], help=MODE_HELP)
    patch.add_argument("--scale", type=float, default=1.0)
    patch.add_argument("--max-new-tokens", type=at_least(1), default=5)
    _add_prompt_options(patch, "template")


def _sweep_arguments(sweep: argparse.ArgumentParser) -> None:
    from taskvec.byte_sizes import byte_size_argument
    from taskvec.engine.sweep_memory import SWEEP_MEMORY_HELP
    from taskvec.options import at_least

    _add_model_options(sweep)
    sweep.add_argument("--vector", required=True, help="a .safetensors task vector")
    _add_task_options(sweep)
    _add_prompt_options(sweep, "style", "template")
    sweep.add_argument("--split", default="val")
    sweep.add_argument("--modality", default="text", choices=["text", "image"], help="the query's input")
    sweep.add_argument("--limit", type=at_least(1), default=None, help="only the first N items")
    sweep.add_argument(
        "--sweep-memory",
        type=byte_size_argument,
        default=None,
        metavar="BYTES",
        help=SWEEP_MEMORY_HELP,
    )
    sweep.add_argument("--mode", default=None, choices=["replace", "add"], help=MODE_HELP)
    sweep.add_argument("--scale", type=float, default=1.0)


def _heads_arguments(heads: argparse.ArgumentParser) -> None:
    from taskvec.byte_sizes import byte_size_argument
    from taskvec.engine.sweep_memory import SWEEP_MEMORY_HELP
    from taskvec.function_vectors.settings import FunctionVectorSettings
    from taskvec.options import add_options

    _add_model_options(heads)
    _add_task_options(heads)
    heads.add_argument("--spec", default="text-icl", choices=["text-icl", "image-icl"])
    # The protocol's own shots (10): the prompt settings give the rest of how its prompts are drawn.
    add_options(heads, FunctionVectorSettings, fill_defaults=True)
    _add_prompt_options(heads, "seed", "style", "template", "batch_size")
    heads.add_argument("--split", default="val", help="prompts are built from this split")
    heads.add_argument("--out", default=None, help="save the function vector to this .safetensors path")
    heads.add_argument(
        "--figure",
        default=None,
        help="write the per-layer, per-head indirect-effect heatmap (one panel per modality) to this PNG",
    )
    heads.add_argument(
        "--across-modalities",
        action="store_true",
        help="score heads from text and from image ICL (a VLM), compare their top heads, and apply both "
        "function vectors and both residual task vectors to text and image test queries",
    )
    heads.add_argument(
        "--sweep-memory", type=byte_size_argument, default=None, metavar="BYTES", help=SWEEP_MEMORY_HELP
    )


def _lens_arguments(lens: argparse.ArgumentParser) -> None:
    from taskvec.options import at_least
    from taskvec.vectors import EXTRACTABLE_SPECS

    spec_names = [spec.value for spec in EXTRACTABLE_SPECS]

    _add_model_options(lens)
    _add_task_options(lens)
    _add_prompt_options(lens, "shots", "seed", "style", "template", "batch_size")
    lens.add_argument("--spec", default="text-icl", choices=[*spec_names, "all"])
    lens.add_argument("--prompts", type=at_least(1), default=100, help="test queries to average over")
    lens.add_argument("--task-word-reduce", default="max", choices=["max", "sum"], help="over task words")


def _check_arguments(check: argparse.ArgumentParser) -> None:
    from taskvec.checks import CHECK_NAMES

    _add_model_options(check)
    check.add_argument("--llm", default=None, help="also check this base LM (loaded like --model)")
    _add_prompt_options(check, "template")
    check.add_argument(
        "--only",
        nargs="+",
        choices=CHECK_NAMES,
        default=None,
        metavar="CHECK",
        help=f"run only these checks: {', '.join(CHECK_NAMES)}",
    )


def _report_arguments(report: argparse.ArgumentParser) -> None:
    report.add_argument("dir", help="a run directory (results.json and/or analysis.json)")
    report.add_argument("--analyse", action="store_true", help="run the analyses first (loads --model)")
    report.add_argument("--model", default="default-vlm", help="model to analyse with --analyse")
    report.add_argument("--llm", default=None, help="base LM to compare with --analyse (default: none)")
    report.add_argument("--tasks", nargs="+", help="tasks to analyse (default: those of results.json)")
    _add_strict_option(report)
    _add_json_option(report)
    report.add_argument("--quick", action="store_true", help="few prompts per analysis")
    _add_load_options(report)


def _train_vlm_arguments(train_vlm: argparse.ArgumentParser) -> None:
    from taskvec.options import at_least

    train_vlm.add_argument("--out", default="taskvec-vlm", help="checkpoints and trained parts go here")
    train_vlm.add_argument("--seed", type=int, default=0)
    train_vlm.add_argument("--threads", type=at_least(1), default=2)
    train_vlm.add_argument(
        "--time-limit-minutes", type=float, default=88.0, help="stop with a checkpoint after this long"
    )
    train_vlm.add_argument("--ship", action="store_true", help="copy the parts into the package as default")
    _add_json_option(train_vlm)
    train_vlm.add_argument(
        "--restart-after",
        choices=("align",),
        help="retrain the instruct stage from the align stage's kept end checkpoint (e.g. a new recipe)",
    )


def _export_vlm_arguments(export_vlm: argparse.ArgumentParser) -> None:
    export_vlm.add_argument("out", help="output directory")
    _add_json_option(export_vlm)


def _run_arguments(run: argparse.ArgumentParser) -> None:
    _add_run_options(run)
    run.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the steps on a Ray cluster (ADDRESS, e.g. 'auto' or ray://head:10001; none: a local "
        'cluster); needs pip install -e ".[ray]"',
    )
    _add_json_option(run)


class _Command(NamedTuple):
    """One command: its name, its help line, what adds its flags and what runs it."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: tuple[_Command, ...] = (
    _Command("models", "supported architectures and the named models", _models_arguments, _command_models),
    _Command("tasks", "built-in tasks, sizes per split and image style", _tasks_arguments, _command_tasks),
    _Command(
        "demo", "no context vs in-context vs patched task vector on one task", _demo_arguments, _command_demo
    ),
    _Command(
        "extract",
        "extract a task vector (all layers) to a .safetensors file",
        _extract_arguments,
        _command_extract,
    ),
    _Command("patch", "answer one query with a task vector patched in", _patch_arguments, _command_patch),
    _Command(
        "sweep",
        "first-token accuracy per layer with a vector patched in, and the layer the run would choose",
        _sweep_arguments,
        _command_sweep,
    ),
    _Command(
        "heads",
        "attention heads carrying a task (causal indirect effect) and their function vector",
        _heads_arguments,
        _command_heads,
    ),
    _Command(
        "lens",
        "input / task / answer probability per layer (three-phase lens)",
        _lens_arguments,
        _command_lens,
    ),
    _Command(
        "check",
        "the engine's invariants on this model as loaded, each against its tolerance",
        _check_arguments,
        _command_check,
    ),
    _Command(
        "report",
        "write DIR/report.html (self-contained) from a run directory",
        _report_arguments,
        _command_report,
    ),
    _Command(
        "train-vlm",
        "train the default VLM (LLaVA on Gemma-3-270M) on CPU; resumable",
        _train_vlm_arguments,
        _command_train_vlm,
    ),
    _Command(
        "export-vlm",
        "write the default VLM as a plain HF checkpoint",
        _export_vlm_arguments,
        _command_export_vlm,
    ),
    _Command(
        "run", "the whole reproduction: vectors, layer choice, every condition", _run_arguments, _command_run
    ),
)


def build_parser(lazy: bool = False) -> argparse.ArgumentParser:
    """The command line. lazy=True: each command's flags are added when that command parses or
    shows its help (what `main` uses: a command imports only the modules its own flags need)."""
    parser = argparse.ArgumentParser(prog="taskvec", description="Task vectors in VLMs and language models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    for command in COMMANDS:
        parser_of = commands.add_parser(command.name, help=command.help, arguments=command.arguments)
        parser_of.set_defaults(run=command.run)

    if not lazy:
        for subparser in commands.choices.values():
            subparser.add_declared_arguments()
    return parser


def _show_taskvec_warnings_as_lines(loads_models: bool) -> None:
    """taskvec's warnings about the user's input (a task file's repeated inputs) and the run
    directory (a cached step computed again) as one line on stderr, shown even where warning filters
    would hide them; other warnings as Python shows them."""
    import warnings

    from taskvec.tasks import DuplicateInputWarning

    one_line: tuple[type[Warning], ...] = (DuplicateInputWarning,)
    if loads_models:  # a command without a model writes no cache, and need not import torch to say so
        from taskvec.caching import CacheEntryWarning

        one_line += (CacheEntryWarning,)

    show_as_python_does = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: Any = None,
    ) -> None:
        if issubclass(category, one_line):
            print(f"taskvec: warning: {message}", file=sys.stderr)
        else:
            show_as_python_does(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    for category in one_line:
        warnings.simplefilter("default", category)


# Commands that load no model, so importing transformers to quiet its bars would be their whole cost.
COMMANDS_WITHOUT_MODELS = frozenset({"tasks"})


def _library_bars_only_on_a_terminal() -> None:
    """transformers' and the hub's own bars (loading weights, writing shards) off a terminal would
    write their frames into the log, as ours would (taskvec.progress)."""
    from taskvec.progress import on_terminal

    if not on_terminal():
        import huggingface_hub.utils
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    args = build_parser(lazy=True).parse_args(argv)
    loads_models = args.command not in COMMANDS_WITHOUT_MODELS
    if loads_models:
        _library_bars_only_on_a_terminal()
    with warnings.catch_warnings():
        _show_taskvec_warnings_as_lines(loads_models)
        try:
            return int(args.run(args))
        except (ValueError, OSError, LookupError) as error:
            # Bad input (unknown architecture, malformed task file, missing image...) reads as one line.
            print(f"taskvec: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            # Ctrl-C: one line, not the traceback of whatever step was running. A run keeps every
            # finished step in its directory (130: the shell's status for a process stopped by SIGINT).
            if args.command == "run":
                print(
                    f"taskvec: run stopped; its finished steps are kept in {args.out}: run the same "
                    "command again to resume",
                    file=sys.stderr,
                )
            else:
                print(f"taskvec: {args.command} stopped", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
