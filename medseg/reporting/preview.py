"""Preview PNGs: a volume's central slices in three planes with label maps overlaid."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medseg.files import atomic_write

LINE_STYLES = ("solid", "dashed", "dotted", "dashdot")
MAX_PREVIEWS = 3


def choose_preview_cases(names: Sequence[str], count: int = MAX_PREVIEWS) -> list[str]:
    """Up to `count` of the validation cases `names`, spread over their sorted order."""
    ordered = sorted(names)
    if len(ordered) <= count:
        return ordered
    return [ordered[round(i * (len(ordered) - 1) / (count - 1))] for i in range(count)] if count > 1 else ordered[:1]


def slice_centre(labels: Sequence[np.ndarray], shape: Sequence[int]) -> tuple[int, int, int]:
    """Where the three planes cross: the centre of the labelled voxels of all `labels` (so small
    structures are in view), the centre of the volume where nothing is labelled."""
    mask = np.zeros(tuple(shape), dtype=bool)
    for label in labels:
        mask |= np.asarray(label) > 0
    if not mask.any():
        return tuple(int(n) // 2 for n in shape)  # type: ignore[return-value]
    return tuple(int(round(float(c.mean()))) for c in np.nonzero(mask))  # type: ignore[return-value]


def write_preview(image: Any, labels_by_name: Mapping[str, Any], class_names: Sequence[str], path: Path,
                  spacing: Sequence[float] = (1.0, 1.0, 1.0), title: str | None = None) -> None:
    """Write a PNG of `image` (a 3-D array in RAS order, x y z) in axial, coronal and sagittal
    central slices with each label map of `labels_by_name` (e.g. {"reference": ..., "prediction":
    ...}; integer maps, class c named `class_names[c - 1]`) overlaid: each class in its own colour;
    the last map filled, the others as outlines (solid, dashed, ...). `spacing` (mm) sets the
    panels' aspect. Replaces `path` atomically."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    volume = np.asarray(image, dtype=np.float32)
    maps = {name: np.asarray(labels) for name, labels in labels_by_name.items()}
    centre = slice_centre(list(maps.values()), volume.shape)
    low, high = np.percentile(volume, (0.5, 99.5)) if volume.size else (0.0, 1.0)
    colours = [f"C{c % 10}" for c in range(len(class_names))]
    fill = ListedColormap(colours)
    figure = Figure(figsize=(13, 5), dpi=100, layout="constrained")
    axes = figure.subplots(1, 3)
    names = list(maps)
    for axis, (plane, cut, aspect) in zip(axes, _planes(centre, spacing)):
        axis.imshow(volume[cut].T, cmap="gray", vmin=low, vmax=max(high, low + 1e-6), origin="lower",
                    aspect=aspect, interpolation="nearest")
        for index, name in enumerate(names):
            labels = maps[name][cut].T
            if index == len(names) - 1:  # the last map filled, translucent
                shown = np.ma.masked_where(labels == 0, labels - 1)
                axis.imshow(shown, cmap=fill, vmin=0, vmax=max(len(class_names) - 1, 1), alpha=0.45,
                            origin="lower", aspect=aspect, interpolation="nearest")
            else:
                for c in range(1, len(class_names) + 1):
                    if (labels == c).any():
                        axis.contour(labels == c, levels=[0.5], colors=[colours[c - 1]], linewidths=1.6,
                                     linestyles=LINE_STYLES[index % len(LINE_STYLES)], origin="lower")
        axis.set_title(plane)
        axis.set_axis_off()
    handles: list[Any] = [Patch(color=colours[c], label=name) for c, name in enumerate(class_names)]
    handles += [Line2D([], [], color="black", linestyle=LINE_STYLES[i % len(LINE_STYLES)], label=f"{n} (outline)")
                for i, n in enumerate(names[:-1])]
    if names:
        handles.append(Patch(facecolor="lightgray", edgecolor="black", label=f"{names[-1]} (filled)"))
    figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=10)
    if title:
        figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write(Path(path), buffer.getvalue())


def _planes(centre: Sequence[int], spacing: Sequence[float]) -> list[tuple[str, tuple, float]]:
    """(title, index into the x y z volume, aspect) per plane; each slice is drawn transposed so
    that the second axis runs upwards (anterior in the axial plane, superior in the others)."""
    x, y, z = centre
    sx, sy, sz = (float(s) for s in spacing)
    return [(f"axial (z={z})", (slice(None), slice(None), z), sy / sx),
            (f"coronal (y={y})", (slice(None), y, slice(None)), sz / sx),
            (f"sagittal (x={x})", (x, slice(None), slice(None)), sz / sy)]


def preview_path(output: Path) -> Path:
    """Where `medseg infer --preview` puts the preview of the label map `output`: `<name>_preview.png`."""
    from medseg.data.cases import case_name

    output = Path(output)
    return output.with_name(f"{output.stem if output.name.endswith('.dcm') else case_name(output)}_preview.png")


def write_prediction_preview(image: Any, labels: Any, class_names: Sequence[str], output: Path) -> Path:
    """The preview of one inference input beside its label map `output`: the preprocessed image's
    first channel (a MetaTensor (C, x, y, z) on the network's grid) and `labels` on that grid."""
    import torch

    path = preview_path(output)
    volume = image[0].detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)[0]
    prediction = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    spacing = [float(s) for s in getattr(image, "pixdim", (1.0, 1.0, 1.0))]
    write_preview(volume, {"prediction": prediction}, class_names, path, spacing, title=path.stem.removesuffix("_preview"))
    return path
