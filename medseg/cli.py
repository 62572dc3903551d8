"""The `medseg` command line. Thin: parse, call one library function, print.

Heavy imports (torch, MONAI) live inside the commands so that `medseg --help` is instant.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from medseg.errors import MedsegError, StopSignal, TrainingInterrupted
from medseg.monai_import import skip_monai_extras
from medseg.quiet import hide_known_warnings
from medseg.stopping import stopping_at_once

app = typer.Typer(
    help="Train 3D medical image segmentation networks and run them on new scans.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's own help layout: a boolean option shows as the flag it is ("--mirror"), where Typer's
    # panels give every option, flags included, a type column ("--mirror <bool>").
    rich_markup_mode=None,
)
console = Console()
errors = Console(stderr=True)

def _print_version(value: bool) -> None:
    if value:
        import medseg

        console.print(f"medseg {medseg.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="On an unexpected error, also print its full traceback.")] = False,
) -> None:
    """Train 3D medical image segmentation networks and run them on new scans."""
    ctx.meta[_DEBUG] = debug
    hide_known_warnings()  # before the commands import MONAI, whose imports print some of them
    # MLflow, imported with MONAI where it is installed, would record an installation id in the
    # home folder at import (its telemetry); a user's own setting is kept.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    skip_monai_extras()  # before the commands import MONAI
    # SIGTERM (a scheduler's) ends any command as Ctrl-C does: exit code 130, no traceback; every
    # file medseg writes is renamed into place complete, so what was written before stays whole.
    ctx.with_resource(stopping_at_once("before the command finished; the files written before it are complete"))
    # Under an ASCII locale a "×" in a table must not end a training run with UnicodeEncodeError.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a config key: section.key=value (repeatable)."),
]


@app.command()
def train(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Argument(help="Experiment config (overrides of the packaged defaults; `medseg plan` writes one).")] = None,
    set_: SetOption = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this directory from last.pt, or a cross-validation folder's folds (--set may change only train.epochs, train.max_minutes, data.dataset and validate.*).")] = None,
    gpus: Annotated[int, typer.Option(help="Train on this many GPUs of this machine (starts torchrun).")] = 1,
    gpu_memory: Annotated[Optional[str], typer.Option(help="Fit patch, batch and checkpointing into this much GPU memory, e.g. 24GiB.")] = None,
    folds: Annotated[Optional[str], typer.Option(help="Cross-validation: train these folds (all, or e.g. 0,1,2) one after another into one folder, then score them and choose the postprocessing.")] = None,
) -> None:
    """Train a 3D U-Net on a dataset folder."""
    if config is None and resume is None:
        # The defaults alone describe no dataset of the user's: show how to start instead.
        console.print(ctx.get_help())
        errors.print("[bold red]error:[/] give a CONFIG (`medseg plan DATASET -o CONFIG` writes one) or --resume RUN",
                     highlight=False, soft_wrap=True)
        raise typer.Exit(code=2)
    if gpu_memory is not None:
        set_ = [*(set_ or []), f"train.memory_budget={gpu_memory}"]
    if folds is not None and (resume is not None or gpus > 1):
        errors.print("[bold red]error:[/] --folds trains new runs on one device; give it without --resume and --gpus",
                     highlight=False, soft_wrap=True)
        raise typer.Exit(code=2)
    if gpus > 1 and "LOCAL_RANK" not in os.environ:
        # The same as `torchrun --nproc-per-node N -m medseg train ...`: PyTorch's own launcher,
        # after the checks that need no process of it.
        with _user_errors():
            from medseg import config as config_module
            from medseg.distributed import check_batch

            if config is not None:
                check_batch(config_module.load(config, set_ or []).train.batch_size, gpus)
        from torch.distributed.run import main as torchrun

        arguments = [str(config)] if config is not None else []
        for item in set_ or []:
            arguments += ["--set", item]
        if resume is not None:
            arguments += ["--resume", str(resume)]
        torchrun(["--standalone", "--nproc-per-node", str(gpus), "-m", "medseg", "train", *arguments])
        return
    # Until training installs its stop handler (medseg.stopping), SIGINT and SIGTERM end the
    # command at once: exit code 130, no traceback.
    with _user_errors(), stopping_at_once("while starting; nothing was saved"):
        from medseg import config as config_module
        from medseg.device import prefer_growing_segments
        from medseg.train import train as run_training

        prefer_growing_segments()  # before CUDA starts
        if resume is not None and config is not None:
            raise MedsegError("--resume continues a run with its own config; give no CONFIG with it "
                              "(--set may change what a resumed run allows)")
        from medseg.folds import cross_validate, is_cross_validation, parse_folds, resume_cross_validation

        cfg = None if resume is not None else config_module.load(config, set_ or [])
        if folds is None and not (resume is not None and is_cross_validation(resume)):
            run_training(cfg, resume=resume, console=console, overrides=set_ or [] if resume is not None else [])
            return
    # Between and after the folds' trainings (each with its own stop handler) a stop ends the
    # command at once, as any command's does (the callback's handling).
    with _user_errors():
        if resume is not None:
            resume_cross_validation(resume, set_ or [], console=console)
        else:
            cross_validate(cfg, parse_folds(folds, cfg.data.folds), console=console)


@app.command()
def plan(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder (dataset.json + imagesTr/labelsTr, or image/label pairs).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the planned config (overrides) here.")] = None,
    gpu_memory: Annotated[str, typer.Option(help="GPU memory to plan for, e.g. 24GiB.")] = "8GiB",
    modality: Annotated[Optional[str], typer.Option(help="The images' modality (CT, MR, ...), in place of dataset.json's; CT is clipped to its foreground percentiles before z-scoring.")] = None,
) -> None:
    """Fingerprint a dataset (checking every case) and write a training config for it."""
    with _user_errors():
        from rich.markup import escape
        from rich.table import Table

        from medseg.memory import parse_size
        from medseg.plan import plan as make_plan

        if modality is not None and not modality.strip():
            raise MedsegError("--modality: give a modality such as CT or MR")
        result = make_plan(dataset, parse_size(gpu_memory), modality=modality)
        table = Table(title=f"medseg plan: {result.cases} cases", title_justify="left", show_header=False)
        table.add_row("channels", f"{result.channels} ({', '.join(result.modalities) or 'unknown modality'})")
        table.add_row("median shape (RAS)", "×".join(map(str, result.median_shape)))
        table.add_row("median spacing (mm)", "×".join(f"{v:.3g}" for v in result.median_spacing))
        table.add_row("target spacing (mm)", "×".join(f"{v:.3g}" for v in result.spacing))
        table.add_row("classes (voxel fraction)", ", ".join(f"{k} {v:.2%}" for k, v in result.class_fraction.items()))
        for index, stats in enumerate(result.intensity):
            table.add_row(f"foreground intensity, channel {index}",
                          ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))
        table.add_row("memory", result.memory)
        console.print(table)
        for warning in result.warnings:
            errors.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
        text = result.to_yaml()
        if out is None:
            console.print(text, highlight=False, markup=False)
            return
        from medseg.files import atomic_write_text

        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MedsegError(f"{out}: cannot write the plan ({exc.strerror or exc})") from None
        atomic_write_text(out, text)
        console.print(f"wrote {out}; train with: medseg train {out}")


@app.command()
def memory(
    config: Annotated[Optional[Path], typer.Argument(help="Experiment config (overrides of the packaged defaults).")] = None,
    set_: SetOption = None,
    gpu_memory: Annotated[Optional[str], typer.Option(help="GPU memory to fit into, e.g. 24GiB.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    measure: Annotated[bool, typer.Option("--measure", help="Also run real steps on this machine's GPU and compare.")] = False,
) -> None:
    """Predict the peak GPU memory of a training step and of the whole run (no GPU needed) and what fits a budget.

    The run: the step, the batch rendered ahead, the resident training volumes, validation (its
    sliding-window buffers and the network's inference activations) and the overhead margin; in
    --json under "run". With --gpu-memory (or train.memory_budget in the config) it also prints the
    patch, batch and checkpointing that `medseg train` with the same config and budget runs: it
    reads and checks the data as train does and runs the same fit. In --json that configuration is
    under "fit" (patch_size, batch_size, checkpointing, amp, total, the run's parts; or "error"
    when nothing fits).
    """
    with _user_errors():
        import json

        from rich.table import Table

        from medseg import config as config_module
        from medseg import memory as memory_module
        from medseg.data.fingerprint import plan_preprocessing, training_cases
        from medseg.data.io import usable_cpus

        if gpu_memory is not None:
            set_ = [*(set_ or []), f"train.memory_budget={gpu_memory}"]
        cfg = config_module.load(config, set_ or [])
        cases = training_cases(cfg, workers=usable_cpus())
        prep = plan_preprocessing(cfg, cases, workers=usable_cpus())
        result = memory_module.overview(cfg, prep, cases.train_summaries,
                                        [cases.summaries[case.name] for case in cases.validation])
        if measure:
            import torch

            if not torch.cuda.is_available():
                raise MedsegError("--measure needs a CUDA GPU on this machine")
            for row in result["rows"]:
                candidate = cfg.replace(train={"amp": row["amp"]}, model={"checkpointing": row["checkpointing"]})
                row.update(memory_module.measure(candidate, prep.channels, prep.num_classes, prep.spacing))
        if json_output:
            print(json.dumps(result, indent=2))
            return
        gib, budget = memory_module.GiB, result["budget"]
        table = Table(title=f"medseg memory: patch {cfg.train.patch_size}, batch {cfg.train.batch_size}, "
                            f"{prep.channels} channel(s), {prep.num_classes} classes", title_justify="left")
        for column in ("amp", "checkpointing", "peak GiB", "parameters", "gradients", "optimizer", "activations",
                       "run GiB"):
            table.add_column(column, justify="right")
        if measure:
            table.add_column("measured GiB", justify="right")
            table.add_column("error", justify="right")
        if budget is not None:
            table.add_column(f"fits {budget / gib:.1f} GiB", justify="center")
        for row in result["rows"]:
            cells = [row["amp"], row["checkpointing"]] + [
                f"{row[k] / gib:.2f}" for k in ("total", "parameters", "gradients", "optimizer_state", "activations",
                                                "run_total")]
            if measure:
                measured = row["max_memory_allocated"]
                cells += [f"{measured / gib:.2f}", f"{100 * (row['total'] - measured) / measured:+.1f} %"]
            if budget is not None:
                cells.append("[green]yes[/]" if row["fits"] else "[red]no[/]")
            table.add_row(*cells)
        console.print(table)
        console.print(_run_table(result["run"], f"the run at checkpointing {cfg.model.checkpointing}"))
        if "fit" in result:
            chosen = result["fit"]
            line = chosen.get("error") or (
                f"patch {chosen['patch_size']}, batch {chosen['batch_size']}, amp {chosen['amp']}, "
                f"checkpointing {chosen['checkpointing']}: {chosen['total'] / gib:.2f} GiB for the run")
            console.print(f"medseg train with this budget runs: {line}")
            if "error" not in chosen:
                console.print(_run_table(chosen, "the run medseg train chooses"))


def _run_table(run: dict, title: str):  # type: ignore[no-untyped-def]
    """The whole run's parts (`medseg.memory.RunReport.to_dict`) as a Rich table, in GiB."""
    from rich.table import Table

    rows = [("training step", "step"), ("batch rendered ahead", "next_batch"),
            ("resident training volumes", "resident_volumes"), ("validation (without the volumes)", "validation"),
            ("  inference activations", "inference"), ("  sliding-window buffers", "validation_buffers"),
            ("overhead (cuDNN, allocator)", "overhead"), ("run peak", "total")]
    table = Table(title=f"GPU memory of {title}", title_justify="left")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    for name, key in rows:
        table.add_row(name, f"{run[key] / 2**30:.2f}")
    return table


@app.command()
def infer(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint (best.pt), a run folder (its best.pt), a cross-validation folder (every fold's best.pt: the fold ensemble) or a model.zip.")],
    inputs: Annotated[list[Path], typer.Argument(help="Images (NIfTI, NRRD, MHA), DICOM series folders, or folders of these.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the label maps (never an input folder).")] = Path("predictions"),
    format_: Annotated[str, typer.Option("--format", "-f", help="nii.gz | nrrd | mha | dicom-seg (DICOM inputs only).")] = "nii.gz",
    ensemble: Annotated[Optional[list[Path]], typer.Option("--ensemble", help="Another checkpoint or folder whose models join CHECKPOINT's: their class probabilities are averaged (repeatable).")] = None,
    include: Annotated[Optional[list[str]], typer.Option("--include", help="In folders, segment only files matching this pattern, e.g. '*.nii.gz' (repeatable).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="In folders, leave out files matching this pattern (repeatable); label-like files (*_label*, *_seg*, *mask*, labelsTr/) are always left out of folders.")] = None,
    overlap: Annotated[float, typer.Option(help="Sliding-window overlap, in [0, 1).")] = 0.5,
    mirror: Annotated[bool, typer.Option("--mirror", help="Test-time augmentation: average over the 8 axis flips.")] = False,
    save_probabilities: Annotated[bool, typer.Option("--save-probabilities", help="Also write <name>_probabilities.nii.gz.")] = False,
    preview: Annotated[bool, typer.Option("--preview", help="Also write <name>_preview.png: central slices in three planes with the prediction overlaid.")] = False,
    largest_component: Annotated[Optional[bool], typer.Option("--largest-component/--no-largest-component", help="Keep only the largest connected component of every class / of none. Default: what the cross-validation chose (postprocessing.json), else none.")] = None,
    sw_batch_size: Annotated[int, typer.Option(help="Windows evaluated together (at least 1).")] = 4,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
) -> None:
    """Segment volumes with a trained model or fold ensemble; outputs share each input's grid exactly."""
    with _user_errors():
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Table

        from medseg.device import prefer_growing_segments
        from medseg.infer import check_options, predict

        prefer_growing_segments()  # before CUDA starts
        check_options(overlap, sw_batch_size, device, format_)  # once, before any model or input is read
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("segmenting", total=None)

            def start(source: str, index: int, total: int) -> None:
                progress.update(task, total=total, completed=index, description=f"segmenting {escape(source)}")

            def report(result) -> None:
                if result.error:
                    errors.print(f"[bold red]error:[/] {escape(result.error)}", highlight=False, soft_wrap=True)

            results = predict([checkpoint, *(ensemble or [])], inputs, out, overlap=overlap, mirror=mirror,
                              save_probabilities=save_probabilities, largest_component=largest_component, preview=preview,
                              sw_batch_size=sw_batch_size, device=device, on_result=report, fmt=format_,
                              include=include or (), exclude=exclude or (), on_start=start,
                              on_note=lambda line: console.print(escape(line), highlight=False, soft_wrap=True))
        table = Table(title="medseg infer", title_justify="left")
        for column in ("input", "shape", "spacing (mm)", "seconds", "output"):
            table.add_column(column, overflow="fold")
        for r in results:
            table.add_row(escape(r.source), "×".join(map(str, r.shape)), "×".join(f"{s:.3g}" for s in r.spacing),
                          f"{r.seconds:.2f}", escape(str(r.output)) if r.output else "[red]failed[/]")
        console.print(table)
        failed = sum(r.error is not None for r in results)
        if failed:
            if len(results) > 1:  # each failure had its own line; one input's needs no summary
                errors.print(f"{failed} of {len(results)} inputs failed")
            raise typer.Exit(code=2)


@app.command()
def evaluate(
    predictions: Annotated[Path, typer.Argument(help="Folder (or file) of predicted label maps.")],
    references: Annotated[Path, typer.Argument(help="Folder (or file) of reference label maps, matched by case name.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for evaluation.csv and evaluation.json (default: the predictions folder).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Take class names from this checkpoint (or run, cross-validation folder, model.zip).")] = None,
    require_all: Annotated[bool, typer.Option("--require-all", help="Fail when a reference case has no prediction (default: warn and score the cases found).")] = False,
) -> None:
    """Dice, HD95 and mean surface distance (mm) and volumes per case and class."""
    with _user_errors():
        from rich.markup import escape
        from rich.table import Table

        from medseg.evaluate import evaluate as run_evaluation

        labels = None
        if checkpoint is not None:
            from medseg.infer import resolve_model

            from medseg.data.cases import class_name

            prep = resolve_model([checkpoint]).states[0]["preprocessing"]
            names = {str(k): v for k, v in prep.get("labels", {}).items()}
            count = int(prep.get("num_classes", 0)) or max((int(k) + 1 for k in names), default=0)
            labels = {c: names.get(str(c), class_name(c)) for c in range(1, count)}
        result = run_evaluation(predictions, references, labels, require_all=require_all)
        if result.missing:
            shown = ", ".join(result.missing[:5]) + (", ..." if len(result.missing) > 5 else "")
            errors.print(f"[bold yellow]warning:[/] no prediction for {len(result.missing)} reference case(s) "
                         f"({escape(shown)}); scored the {len({r['case'] for r in result.rows})} found "
                         "(--require-all makes this an error)", highlight=False, soft_wrap=True)
        folder = out or (predictions if predictions.is_dir() else predictions.parent)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MedsegError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None
        result.write_csv(folder / "evaluation.csv")
        result.write_json(folder / "evaluation.json")
        table = Table(title=f"medseg evaluate ({len({r['case'] for r in result.rows})} cases)", title_justify="left")
        metrics = ("dice", "hd95_mm", "msd_mm")
        table.add_column("class")
        for metric in metrics:
            table.add_column(metric, justify="right")
        for name, summary in result.summary.items():
            table.add_row(escape(name), *[_mean_std(summary.get(m)) for m in metrics])
        console.print(table)
        console.print(f"wrote {folder / 'evaluation.csv'} and {folder / 'evaluation.json'}")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A run folder (its best.pt), a checkpoint, or a cross-validation folder (fold*/best.pt).")],
    format_: Annotated[str, typer.Option("--format", "-f", help="zip (model archive for medseg infer) | torchscript | onnx")] = "zip",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="File to write (default: model.zip, model.torchscript.pt or model.onnx in the run folder).")] = None,
) -> None:
    """Export a trained model: a model archive `medseg infer` runs anywhere, or a TorchScript or
    ONNX network (checked against PyTorch on the CPU) with its preprocessing beside it."""
    with _user_errors():
        from medseg.export import export as run_export
        from medseg.export import run_checkpoints

        for path in run_checkpoints(run):
            console.print(f"exporting {path}", highlight=False)
        for item in run_export(run, format_, out):
            line = f"wrote {item.path}"
            if item.max_difference is not None:
                line += (f" (fold {item.fold}; largest difference of its logits from PyTorch's on the CPU: "
                         f"{item.max_difference:.2g}); preprocessing in {item.sidecar}")
            console.print(line, highlight=False, soft_wrap=True)


def _mean_std(value) -> str:
    if not value:
        return "-"
    mean, std, count = value
    return "-" if count == 0 else f"{mean:.4f} ± {std:.4f}"


class _user_errors:
    """Turn every error into one line on stderr, without a traceback.

    MedsegError: its message, exit code 2. Any other exception: what medseg was doing and on
    which file (`medseg.errors.describe`), exit code 2 when bad input causes it
    (`medseg.errors.is_input_error`: OSError, ValueError, KeyError, MemoryError, ...), else 1 (an
    internal error). Its traceback is printed only under `medseg --debug` (and appended to the
    run's train.log by `medseg.files.RunLock` once a run folder exists).
    """

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        from rich.markup import escape
        from typer.main import get_current_context

        if isinstance(error, (TrainingInterrupted, StopSignal)):
            errors.print(f"interrupted: {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=130)
        if isinstance(error, MedsegError):
            errors.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2)
        if isinstance(error, KeyboardInterrupt):
            errors.print("interrupted")
            raise typer.Exit(code=130)
        if error is None or not isinstance(error, Exception) or type(error).__module__.startswith(("typer", "click")):
            return False  # the command line's own exits and usage errors
        from medseg.errors import describe, is_input_error

        context = get_current_context(silent=True)
        if context is not None and context.meta.get(_DEBUG):
            import traceback as traceback_module

            sys.stderr.write("".join(traceback_module.format_exception(kind, error, traceback)))
        command = context.info_name if context is not None else "medseg"
        user_caused = is_input_error(error)
        line = describe(error) if user_caused else f"internal error, please report it: {describe(error)}"
        errors.print(f"[bold red]error:[/] medseg {command}: {escape(_one_line(line))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2 if user_caused else 1)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# The key under which the `--debug` flag is kept in the command line's context.
_DEBUG = "medseg.debug"


def main() -> None:
    """Entry point for `python -m medseg`: an error that escapes a command is still one line."""
    try:
        with _user_errors():
            app()
    except typer.Exit as stop:  # what _user_errors raises outside a command
        sys.exit(stop.exit_code)
