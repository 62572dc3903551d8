"""Handing a trained model on: a model archive (`model.zip`), TorchScript and ONNX networks.

A model archive is a zip a colleague runs with `medseg infer model.zip ...` on another machine:

| member | what it is |
|---|---|
| `manifest.json` | format name and version, medseg's version, the folds and their validation cases, the model's arch, widths and patch size |
| `config.json` | the resolved training config the networks were built from (dataset paths reduced to their names) |
| `preprocessing.json` | target spacing, normalisation, channels, classes: what the networks expect |
| `classes.json` | class names, indexed by label value (0 = background) |
| `postprocessing.json` | the postprocessing chosen on the cross-validation, when the run has one |
| `folds/fold<k>.json`, `folds/fold<k>.bin` | each fold's weights as raw little-endian fp32 tensors and their index (name, dtype, shape, offset) |

Loading an archive executes nothing it holds: no pickle, only JSON and raw tensor bytes. Member
names come from a fixed list (no path leads outside, nothing is extracted to disk), every size is
bounded and checked against the archive and the tensor index before anything is decompressed, and
every value of the JSON members (config, preprocessing, class names) is checked when it loads
(`check_config`, `check_preprocessing`, the same checks a checkpoint's records get in `load_checkpoint`).

Export never replaces a file: an output that exists, above all a checkpoint being exported, is
refused before anything is written (for networks: every fold's file and its sidecar).

TorchScript and ONNX exports hold one network each (one file per fold), in eval mode, in fp32:
input the preprocessed patch `(batch, channels, x, y, z)` (any batch; ONNX: any spatial size the
network's downsampling divides), output the full-resolution logits `(batch, classes, x, y, z)`.
The preprocessing (spacing, normalisation) is not part of them: it is in `<name>.preprocessing.json`
beside the file. Each export is run against PyTorch on the CPU before it is reported written.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from medseg.errors import CheckpointError, MedsegError

FORMAT = "medseg-model"
FORMAT_VERSION = 1
FORMATS = ("zip", "torchscript", "onnx")
SUFFIXES = {"zip": ".zip", "torchscript": ".torchscript.pt", "onnx": ".onnx"}

# Bounds on what an archive may claim: JSON members are small; one fold's weights are at most a few
# GiB for any network medseg builds; a deflated member expanding beyond `MAX_RATIO` is a zip bomb.
MAX_JSON_BYTES = 16 << 20
MAX_WEIGHTS_BYTES = 8 << 30
MAX_FOLDS = 100
MAX_RATIO = 1000
MEMBER_NAMES = re.compile(r"(manifest|config|preprocessing|classes|postprocessing)\.json|folds/fold\d{1,3}\.(json|bin)")
REQUIRED = ("manifest.json", "config.json", "preprocessing.json", "classes.json")
DTYPES = {"float32": np.dtype("<f4"), "int64": np.dtype("<i8")}
# Exported logits may differ from PyTorch's by float rounding of reordered sums, scaled by the logits.
TOLERANCE = 1e-3


@dataclass
class ModelArchive:
    """A loaded `model.zip`: per fold a checkpoint-like dict (`model`, `config`, `preprocessing`, `fold`)
    that `medseg.infer.Predictor` builds a network from, and what the archive says about them."""

    manifest: dict[str, Any]
    checkpoints: list[dict[str, Any]]
    class_names: list[str]
    postprocessing: dict[str, Any] | None = None


@dataclass
class Exported:
    """One file `export` wrote; for networks, the largest difference of their logits from PyTorch's."""

    path: Path
    fold: int | None = None
    max_difference: float | None = None
    sidecar: Path | None = None


def is_model_archive(path: Path | str) -> bool:
    """Whether `path` names a model archive (a `.zip` file) rather than a checkpoint."""
    return Path(path).suffix.lower() == ".zip" and not Path(path).is_dir()


def run_checkpoints(run: Path) -> list[Path]:
    """The checkpoints a run stands for: a checkpoint file itself; a run directory's `best.pt`; a
    cross-validation folder's `fold*/best.pt`, in fold order."""
    run = Path(run)
    if run.is_file():
        return [run]
    if not run.is_dir():
        raise CheckpointError(f"{run}: no such run directory or checkpoint")
    if (run / "best.pt").is_file():
        return [run / "best.pt"]
    folds = sorted((p for p in run.glob("fold*/best.pt") if re.fullmatch(r"fold\d+", p.parent.name)),
                   key=lambda p: int(p.parent.name[4:]))
    if not folds:
        raise CheckpointError(f"{run}: neither best.pt nor fold*/best.pt inside; give a run directory or a checkpoint")
    return folds


def export(run: Path, fmt: str, out: Path | None = None) -> list[Exported]:
    """Export the run (see `run_checkpoints`) as `fmt` (`zip`, `torchscript` or `onnx`) to `out`.

    Default `out`: `model.zip`, `model.torchscript.pt` or `model.onnx` in the run directory (beside a checkpoint
    file). TorchScript and ONNX exports of several folds are written one per fold (`model_fold<k>.onnx`).
    """
    if fmt not in FORMATS:
        raise MedsegError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    checkpoints = run_checkpoints(run)
    run = Path(run)
    base = run if run.is_dir() else run.parent
    out = Path(out) if out is not None else base / f"model{SUFFIXES[fmt]}"
    if out.is_dir():
        raise MedsegError(f"{out}: is a folder; give the file to write, e.g. {out / ('model' + SUFFIXES[fmt])}")
    if not out.parent.is_dir():
        raise MedsegError(f"{out}: folder {out.parent} does not exist")
    if fmt == "zip":
        # The decision `medseg train --folds` writes beside the folds (medseg.postprocessing).
        recorded = base / "postprocessing.json" if run.is_dir() else None
        write_model_archive(checkpoints, out, recorded if recorded is not None and recorded.is_file() else None)
        return [Exported(out)]
    states, targets = [load_checkpoint(path) for path in checkpoints], []
    for path, state in zip(checkpoints, states):
        fold = int(state["config"]["data"]["fold"])
        stem, dot, suffixes = out.name.partition(".")
        targets.append(out if len(checkpoints) == 1 else out.with_name(f"{stem}_fold{fold}{dot}{suffixes}"))
        if targets[-1] in targets[:-1]:
            raise CheckpointError(f"{path}: fold {fold} given twice")
    # Every file of every fold is checked before the first is written: a refusal writes nothing.
    refuse_existing([p for target in targets for p in (target, sidecar_path(target))], checkpoints)
    return [export_network(state, target, fmt, int(state["config"]["data"]["fold"]))
            for state, target in zip(states, targets)]


def refuse_existing(paths: Sequence[Path], checkpoints: Sequence[Path] = ()) -> None:
    """MedsegError naming the first of `paths` that exists (a link too, even a dangling one):
    export never replaces a file, least of all one of the `checkpoints` it reads."""
    for path in paths:
        if os.path.lexists(path):
            what = ("is a checkpoint being exported" if any(Path(path).resolve() == Path(c).resolve() for c in checkpoints)
                    else "exists")
            raise MedsegError(f"{path}: {what}; medseg export never overwrites a file (remove it or give another --out)")


def sidecar_path(network: Path) -> Path:
    """`<stem>.preprocessing.json` beside an exported network file."""
    return network.with_name(f"{_split_name(network)[0]}.preprocessing.json")


def write_model_archive(checkpoints: Sequence[Path], out: Path, postprocessing: Path | None = None) -> Path:
    """Write the model archive of `checkpoints` (the folds of one model) to `out`, atomically;
    refused if `out` exists (`refuse_existing`)."""
    from medseg import __version__
    from medseg.files import atomic_write_with

    refuse_existing([out], checkpoints)
    states = [load_checkpoint(path) for path in checkpoints]
    first = states[0]
    for path, state in zip(checkpoints[1:], states[1:]):
        if state["preprocessing"] != first["preprocessing"] or state["config"]["model"] != first["config"]["model"]:
            raise CheckpointError(f"{path}: another model or preprocessing than {checkpoints[0]}; "
                                  "the folds of one archive must share them")
    cfg = _portable_config(first["config"])
    prep = first["preprocessing"]
    names = _class_names(prep)
    folds, members = [], {}
    for path, state in zip(checkpoints, states):
        k = int(state["config"]["data"]["fold"])
        if any(f["fold"] == k for f in folds):
            raise CheckpointError(f"{path}: fold {k} given twice")
        index, payload = _tensor_payload(state["model"])
        members[f"folds/fold{k}.json"] = _json_bytes(index)
        members[f"folds/fold{k}.bin"] = payload
        split = state.get("split") or {}
        folds.append({"fold": k, "index": f"folds/fold{k}.json", "weights": f"folds/fold{k}.bin",
                      "validation_cases": list(split.get("validation", [])), "epoch": int(state.get("epoch", -1)) + 1})
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "medseg_version": __version__,
                "model": {**cfg["model"], "patch_size": cfg["train"]["patch_size"], "channels": prep["channels"],
                          "classes": prep["num_classes"]},
                "folds": folds}
    members.update({"manifest.json": _json_bytes(manifest), "config.json": _json_bytes(cfg),
                    "preprocessing.json": _json_bytes(prep), "classes.json": _json_bytes(names)})
    if postprocessing is not None:
        from medseg import postprocessing as postprocessing_module

        members["postprocessing.json"] = _json_bytes(postprocessing_module.read(postprocessing))

    def write(stream) -> None:
        with zipfile.ZipFile(stream, "w") as archive:
            for name, data in members.items():
                # Weights are stored as they are (fp32 barely compresses); JSON deflated.
                method = zipfile.ZIP_STORED if name.endswith(".bin") else zipfile.ZIP_DEFLATED
                archive.writestr(name, data, compress_type=method)

    atomic_write_with(Path(out), write)
    return Path(out)


def load_model_archive(path: Path | str) -> ModelArchive:
    """Read a model archive safely (see the module docstring); CheckpointError naming the archive
    and the problem for anything that is not a well-formed medseg model archive."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model archive not found")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = _checked_members(path, archive)
            manifest = _member_json(path, archive, infos, "manifest.json")
            _check_manifest(path, manifest, infos)
            cfg, prep = (_member_json(path, archive, infos, name) for name in ("config.json", "preprocessing.json"))
            check_config(f"{path}: config.json", cfg)
            check_preprocessing(f"{path}: preprocessing.json", prep)
            names = _member_json(path, archive, infos, "classes.json")
            if not (isinstance(names, list) and len(names) == prep["num_classes"]
                    and all(isinstance(n, str) for n in names)):
                raise CheckpointError(f"{path}: classes.json is not a list of {prep['num_classes']} class names "
                                      "(num_classes in preprocessing.json)")
            postprocessing = (_member_json(path, archive, infos, "postprocessing.json")
                              if "postprocessing.json" in infos else None)
            checkpoints = []
            for fold in manifest["folds"]:
                index = _member_json(path, archive, infos, fold["index"])
                weights = _tensors(path, fold["weights"], index, infos, archive)
                checkpoints.append({"model": weights, "config": cfg, "preprocessing": prep, "fold": fold["fold"]})
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
        raise CheckpointError(f"{path}: not a readable model archive ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0][:120] if str(exc) else 'unreadable'})") from None
    return ModelArchive(manifest, checkpoints, names, postprocessing)


def load_states(path: Path | str) -> list[dict[str, Any]]:
    """The checkpoint-like states of a model archive (one per fold) or of one checkpoint file, loaded
    safely either way: what `medseg.infer` builds its networks from."""
    return load_model_archive(path).checkpoints if is_model_archive(path) else [load_checkpoint(Path(path))]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """`medseg.checkpoint.load`, then its config and preprocessing record checked as an archive's are."""
    from medseg import checkpoint

    state = checkpoint.load(path)
    check_config(f"{path}: its config", state["config"])
    check_preprocessing(f"{path}: its preprocessing", state.get("preprocessing"))
    return state


def check_config(source: str, values: Any) -> None:
    """CheckpointError naming `source` unless `values` is a config medseg's config loader accepts."""
    from medseg import config
    from medseg.errors import ConfigError

    if not isinstance(values, dict):
        raise CheckpointError(f"{source}: expected a mapping of config sections, got {type(values).__name__}")
    try:
        config.from_dict(values)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: not a config medseg loads ({str(exc).splitlines()[0][:200]})") from None


def check_preprocessing(source: str, values: Any) -> None:
    """CheckpointError naming `source` and the key unless `values` is a preprocessing record
    (`medseg.data.transforms.Preprocessing.to_dict`) that medseg's transforms can run: spacing three
    positive finite numbers, a known normalisation with the per-channel statistics ct needs,
    counts in range, labels a mapping of class values to names."""
    from dataclasses import MISSING, fields

    from medseg.config import CHOICES
    from medseg.data.checks import MAX_LABEL
    from medseg.data.transforms import Preprocessing

    if not isinstance(values, dict):
        raise CheckpointError(f"{source}: expected a mapping of preprocessing keys, got {type(values).__name__}")
    known = [f.name for f in fields(Preprocessing)]
    required = [f.name for f in fields(Preprocessing) if f.default is MISSING and f.default_factory is MISSING]
    for key in [k for k in values if k not in known] + [k for k in required if k not in values]:
        raise CheckpointError(f"{source}: {'missing' if key in known else 'unknown'} key {str(key)[:40]!r}")

    def expect(key: str, ok: bool, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{source}: '{key}' must be {what}, got {json.dumps(values.get(key))[:80]}")

    expect("spacing", _finite_numbers(values["spacing"], 3) and min(values["spacing"]) > 0,
           "three positive finite numbers (mm)")
    expect("channels", _whole(values["channels"]) and values["channels"] >= 1, "a positive whole number")
    expect("num_classes", _whole(values["num_classes"]) and 2 <= values["num_classes"] <= MAX_LABEL + 1,
           f"a whole number from 2 to {MAX_LABEL + 1}")
    schemes = [s for s in CHOICES["data.normalization"] if s != "auto"]
    expect("normalization", values["normalization"] in schemes, f"one of {', '.join(schemes)}")
    for key in ("clip_low", "clip_high", "mean", "std"):
        # ct needs each statistic for every channel; the other schemes use none.
        count = values["channels"] if values["normalization"] == "ct" else None
        if key in values or count is not None:
            expect(key, _finite_numbers(values.get(key), count),
                   f"one finite number per channel ({count}) for ct normalisation" if count else "a list of numbers")
    if "crop_foreground" in values:
        expect("crop_foreground", isinstance(values["crop_foreground"], bool), "true or false")
    if "labels" in values:
        labels = values["labels"]
        expect("labels", isinstance(labels, dict) and all(
            _class_value(k, values["num_classes"]) and isinstance(v, str) for k, v in labels.items()),
            f"a mapping of class values (0 to {values['num_classes'] - 1}) to names")


def export_network(state: dict[str, Any], out: Path, fmt: str, fold: int | None = None) -> Exported:
    """Write one checkpoint's network as TorchScript (`torch.jit.trace`) or ONNX (opset 17, dynamic
    batch and spatial axes) with `<stem>.preprocessing.json` beside it, after checking on the CPU
    that it computes PyTorch's logits on a random batch of two patches (`TOLERANCE`)."""
    from medseg.files import atomic_write

    refuse_existing([out, sidecar_path(out)])
    model, patch, channels = _eval_network(state)
    torch.manual_seed(0)
    traced_on = torch.randn(1, channels, *patch)
    check_on = torch.randn(2, channels, *patch)  # another batch size: the batch axis is not fixed
    with torch.no_grad():
        expected = model(check_on)
    with warnings.catch_warnings():
        # The tracer and the legacy ONNX exporter warn about constructs that are fine in eval mode.
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            network = torch.jit.trace(model, traced_on, check_trace=False)  # checked below, on another batch
            with torch.no_grad():
                got = network(check_on).numpy()
            buffer = io.BytesIO()
            torch.jit.save(network, buffer)
            payload = buffer.getvalue()
        else:
            payload = _onnx_bytes(model, traced_on)
            got = run_onnx(payload, check_on.numpy())
    difference = float(np.abs(got - expected.numpy()).max())
    limit = TOLERANCE * max(1.0, float(expected.abs().max()))
    if not difference <= limit:
        raise MedsegError(f"{out}: the {fmt} network's logits differ from PyTorch's by {difference:.3g} "
                          f"(more than {limit:.3g}); not written")
    atomic_write(out, payload)
    sidecar = sidecar_path(out)
    atomic_write(sidecar, _json_bytes(_sidecar(state, fmt, out.name)))
    return Exported(out, fold, difference, sidecar)


def run_onnx(model: bytes | Path, image: np.ndarray) -> np.ndarray:
    """Logits of an exported ONNX network for `image` (batch, channels, x, y, z), by onnxruntime on the CPU."""
    session = onnx_session(model)
    return session.run(None, {"image": np.ascontiguousarray(image, dtype=np.float32)})[0]


def onnx_session(model: bytes | Path) -> Any:
    """An onnxruntime CPU session of an exported network (`pip install medseg[export]`)."""
    try:
        import onnxruntime
    except ImportError:
        raise MedsegError("ONNX needs onnx and onnxruntime: pip install 'medseg[export]'") from None
    source = model if isinstance(model, bytes) else str(model)
    return onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])


class OnnxNetwork(nn.Module):
    """An exported ONNX network as a module on the CPU: the same call as the PyTorch network (a
    preprocessed batch in, logits out), so medseg's sliding-window code runs it unchanged."""

    def __init__(self, model: bytes | Path) -> None:
        super().__init__()
        self.session = onnx_session(model)
        # Sliding-window inference asks a module's parameters where it runs.
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits of `image` (batch, channels, x, y, z) computed by onnxruntime."""
        array = np.ascontiguousarray(image.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(None, {"image": array})[0])


# ---------------------------------------------------------------------------------------------
# private helpers


def _eval_network(state: dict[str, Any]) -> tuple[nn.Module, tuple[int, ...], int]:
    from medseg import config
    from medseg.data.transforms import Preprocessing
    from medseg.models import build_model

    cfg = config.from_dict(state["config"])
    prep = Preprocessing.from_dict(state["preprocessing"])
    model = build_model(cfg.replace(model={"checkpointing": "off"}), prep.channels, prep.num_classes, prep.spacing)
    model.load_state_dict(state["model"])
    return model.float().cpu().eval(), tuple(cfg.train.patch_size), prep.channels


def _onnx_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    # The TorchScript-based exporter: it runs offline without onnxscript and keeps dynamic axes.
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise MedsegError("ONNX export needs onnx and onnxruntime: pip install 'medseg[export]'") from None
    axes = {0: "batch", 2: "x", 3: "y", 4: "z"}
    buffer = io.BytesIO()
    torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": axes, "logits": axes}, opset_version=17)
    return buffer.getvalue()


def _split_name(path: Path) -> tuple[str, str]:
    """`model.torchscript.pt` -> (`model.torchscript`, `.pt`)."""
    return path.name[: len(path.name) - len(path.suffix)], path.suffix


def _sidecar(state: dict[str, Any], fmt: str, name: str) -> dict[str, Any]:
    from medseg import __version__

    prep = state["preprocessing"]
    return {"network": name, "format": fmt, "medseg_version": __version__,
            "input": "preprocessed image (batch, channels, x, y, z), float32: RAS orientation, resampled to "
                     "`spacing` (mm), normalised by `normalization`",
            "output": "logits (batch, classes, x, y, z); the label is their arg-max over classes",
            "patch_size": state["config"]["train"]["patch_size"], "fold": state["config"]["data"]["fold"],
            "class_names": _class_names(prep), "preprocessing": prep}


def _portable_config(values: dict[str, Any]) -> dict[str, Any]:
    """The config without the exporting machine's paths: the dataset by its folder name only."""
    cfg = json.loads(json.dumps(values))
    cfg["data"]["dataset"] = Path(str(cfg["data"]["dataset"])).name
    cfg["data"]["cache_dir"] = None
    cfg["output_dir"] = "runs"
    return cfg


def _class_names(prep: dict[str, Any]) -> list[str]:
    from medseg.data.cases import class_name

    labels = {int(k): v for k, v in prep.get("labels", {}).items()}
    return [labels.get(c, "background" if c == 0 else class_name(c)) for c in range(int(prep["num_classes"]))]


def _tensor_payload(weights: dict[str, torch.Tensor]) -> tuple[dict[str, Any], bytes]:
    """Index and raw bytes of a state dict: floats as fp32, integers as int64, little-endian."""
    index, chunks, offset = [], [], 0
    for name, tensor in weights.items():
        tensor = tensor.detach().cpu()
        dtype = "float32" if tensor.is_floating_point() else "int64"
        data = tensor.to(getattr(torch, dtype)).contiguous().numpy().astype(DTYPES[dtype], copy=False).tobytes()
        index.append({"name": name, "dtype": dtype, "shape": list(tensor.shape), "offset": offset, "nbytes": len(data)})
        chunks.append(data)
        offset += len(data)
    return {"tensors": index}, b"".join(chunks)


def _checked_members(path: Path, archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The archive's members by name, each checked before any is read."""
    infos: dict[str, zipfile.ZipInfo] = {}
    size = path.stat().st_size
    for info in archive.infolist():
        name = info.filename
        if not MEMBER_NAMES.fullmatch(name):
            raise CheckpointError(f"{path}: refused: unexpected member {name[:80]!r} (a model archive holds "
                                  "only manifest.json, config.json, preprocessing.json, classes.json, "
                                  "postprocessing.json and folds/fold<k>.json/.bin)")
        if name in infos:
            raise CheckpointError(f"{path}: refused: member {name} appears twice")
        if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CheckpointError(f"{path}: refused: member {name} is encrypted or compressed in an unsupported way")
        limit = MAX_WEIGHTS_BYTES if name.endswith(".bin") else MAX_JSON_BYTES
        if info.file_size > limit or info.compress_size > size:
            raise CheckpointError(f"{path}: refused: member {name} claims {info.file_size} bytes "
                                  f"(at most {limit} for it, in an archive of {size} bytes)")
        stored = info.compress_type == zipfile.ZIP_STORED
        if (stored and info.file_size != info.compress_size) or (
                not stored and info.file_size > MAX_RATIO * max(info.compress_size, 1024)):
            raise CheckpointError(f"{path}: refused: member {name} would expand from {info.compress_size} "
                                  f"to {info.file_size} bytes")
        infos[name] = info
    for name in REQUIRED:
        if name not in infos:
            raise CheckpointError(f"{path}: refused: no {name} inside; not a medseg model archive")
    return infos


def _member_json(path: Path, archive: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo], name: str) -> Any:
    if name not in infos:
        raise CheckpointError(f"{path}: refused: {name} is named in the manifest but not inside")
    try:
        return json.loads(archive.read(infos[name]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: {name} is not valid JSON ({exc.__class__.__name__})") from None


def _check_manifest(path: Path, manifest: Any, infos: dict[str, zipfile.ZipInfo]) -> None:
    from medseg import __version__

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: refused: manifest.json does not describe a {FORMAT} archive")
    version = manifest.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{path}: archive format version {version!r}; medseg {__version__} reads "
                              f"versions 1 to {FORMAT_VERSION} (upgrade medseg)")
    folds = manifest.get("folds")
    if not isinstance(folds, list) or not 1 <= len(folds) <= MAX_FOLDS:
        raise CheckpointError(f"{path}: refused: manifest.json lists no folds")
    for fold in folds:
        k = fold.get("fold") if isinstance(fold, dict) else None
        if not isinstance(k, int) or fold.get("index") != f"folds/fold{k}.json" or fold.get("weights") != f"folds/fold{k}.bin":
            raise CheckpointError(f"{path}: refused: manifest.json has a malformed fold entry {str(fold)[:80]}")
        if fold["weights"] not in infos:
            raise CheckpointError(f"{path}: refused: {fold['weights']} is named in the manifest but not inside")


def _tensors(path: Path, member: str, index: Any, infos: dict[str, zipfile.ZipInfo],
             archive: zipfile.ZipFile) -> dict[str, torch.Tensor]:
    """The state dict stored in `member`, after checking its index against the member's size."""
    entries = index.get("tensors") if isinstance(index, dict) else None
    if not isinstance(entries, list):
        raise CheckpointError(f"{path}: refused: the index of {member} lists no tensors")
    offset = 0
    for entry in entries:
        _check_entry(path, member, entry, offset)
        offset += entry["nbytes"]
    if offset != infos[member].file_size:
        raise CheckpointError(f"{path}: refused: {member} holds {infos[member].file_size} bytes, "
                              f"its index describes {offset}")
    data = archive.read(infos[member])
    weights = {}
    for entry in entries:
        dtype = DTYPES[entry["dtype"]]
        count = entry["nbytes"] // dtype.itemsize
        array = np.frombuffer(data, dtype=dtype, count=count, offset=entry["offset"]).reshape(entry["shape"])
        weights[entry["name"]] = torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))
    return weights


def _check_entry(path: Path, member: str, entry: Any, offset: int) -> None:
    ok = (isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry.get("dtype") in DTYPES
          and isinstance(entry.get("shape"), list) and all(isinstance(n, int) and n >= 0 for n in entry["shape"])
          and entry.get("offset") == offset and isinstance(entry.get("nbytes"), int))
    if not ok or int(np.prod(entry["shape"], dtype=np.int64)) * DTYPES[entry["dtype"]].itemsize != entry["nbytes"]:
        raise CheckpointError(f"{path}: refused: malformed tensor entry in the index of {member}: {str(entry)[:100]}")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_numbers(value: Any, count: int | None) -> bool:
    return (isinstance(value, (list, tuple)) and (count is None or len(value) == count)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def _class_value(key: Any, num_classes: int) -> bool:
    """A label key as `Preprocessing.to_dict` writes it (a decimal string; an int in memory)."""
    text = str(key) if _whole(key) else key
    return isinstance(text, str) and text.isdecimal() and text.isascii() and int(text) < num_classes


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, allow_nan=False) + "\n").encode("utf-8")
