"""MONAI image readers giving every format NibabelReader's conventions.

Give :func:`readers` to ``LoadImaged(keys, reader=readers())``. NIfTI goes through MONAI's own
``NibabelReader``; NRRD, MetaImage and DICOM series go through :class:`SimpleITKReader`, which
returns what ``NibabelReader`` would have returned for the same physical volume: an array indexed
``(x, y, z[, channel])`` and a 4x4 voxel-to-RAS affine (read by :mod:`medseg.data.io`, which
:func:`medseg.data.io.load_volume` shares without importing MONAI).

When ``reader=`` is given, MONAI does *not* pick a reader by suffix: it calls ``read`` on every
registered reader, newest first, and keeps the first that does not raise. :class:`SimpleITKReader`
is therefore tried first and refuses (raises) anything that is not one of its formats, so NIfTI
falls through to ``NibabelReader``.

Both return their array in C order, cast to their `dtype` in the same single pass
(:func:`medseg.data.io.c_order`). ``LoadImage`` would otherwise cast the file's array (x fastest)
to its dtype and then make it C-ordered for torch in a second, cache-missing copy; given the array
as it wants it, it copies nothing. The values are those of that two-step path, element for element.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.data import ImageReader
from monai.data import NibabelReader as MonaiNibabelReader
from monai.utils import MetaKeys, SpaceKeys

from medseg.data.io import (
    PathLike,
    SitkSource,
    as_paths,
    c_order,
    is_sitk_path,
    nifti_array,
    sitk_source,
    sitk_volume,
    sitk_voxels,
    stack_channels,
)
from medseg.errors import DataError, doing

__all__ = ["NibabelReader", "SimpleITKReader", "readers"]


class NibabelReader(MonaiNibabelReader):
    """MONAI's ``NibabelReader`` (same files, meta and values), its array in C order and cast to
    `dtype` (None: the stored dtype, as nibabel gives it) in one pass.

    Args:
        dtype: the dtype ``LoadImage`` converts to (its ``dtype``), so that it has nothing left to do.
        kwargs: MONAI's ``NibabelReader`` arguments.
    """

    def __init__(self, dtype: np.dtype | type | str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dtype = dtype

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        """MONAI's ``get_data``, its array in C order and of `dtype`."""
        array, meta = super().get_data(img)
        return c_order(array, self.dtype), meta

    def _get_array_data(self, img: Any, filename: Any) -> np.ndarray:
        # MONAI's hook for reading one image's array (``np.asanyarray(img.dataobj)``), the same
        # array read so that a gzip-compressed file's CRC and length are checked.
        return nifti_array(img)


class SimpleITKReader(ImageReader):
    """MONAI image reader for NRRD, MetaImage and DICOM series, in NibabelReader's conventions.

    ``get_data`` returns an array indexed ``(x, y, z[, component])`` (the transpose of
    ``SimpleITK.GetArrayFromImage``) and meta with a RAS ``affine``/``original_affine``,
    ``spatial_shape``, ``space`` and ``original_channel_dim`` (``nan`` for scalar images, ``-1``
    for vector pixels, ``0`` when a list of files is stacked into channels).

    Args:
        series_uid: SeriesInstanceUID to read when a DICOM directory holds several series.
            Without it such a directory is refused with a DataError.
        dtype: the array's dtype (None: the stored one); it comes in C order, cast in one pass.
    """

    def __init__(self, series_uid: str | None = None, dtype: np.dtype | type | str | None = None) -> None:
        super().__init__()
        self.series_uid = series_uid
        self.dtype = dtype

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Return True if every given path is an NRRD/MetaImage file or a (DICOM) directory."""
        return all(is_sitk_path(name) for name in as_paths(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> Any:
        """Check one path, or a list of them (stacked as channels later), and set up their readers;
        the voxels are read by :meth:`get_data`.

        ``LoadImage`` takes an error raised here for "not this reader's file" and tries the next
        reader, ending in a message about missing reader libraries; an error raised by ``get_data``
        reaches the user as it is. So a file of these formats whose data are truncated or corrupt
        is refused there.

        Raises:
            DataError: a path is not one of this reader's formats, or its header is unusable.
        """
        paths = as_paths(data)
        if not paths:
            raise DataError("no image path given")
        sources = []
        for path in paths:
            with doing(f"reading {path}"):
                sources.append(sitk_source(path, self.series_uid))
        return sources if len(sources) > 1 else sources[0]

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        """Return ``(array, meta)`` for what :meth:`read` returned.

        Raises:
            DataError: a file's voxel data are truncated, corrupt or unreadable.
        """
        sources = [img] if isinstance(img, SitkSource) else list(img)
        images = []
        for source in sources:
            with doing(f"reading {source.name}"):
                images.append(sitk_voxels(source))
        volumes = [sitk_volume(image) for image in images]
        array, channel_dim = stack_channels(volumes, nifti=False)
        first = volumes[0]
        meta: dict = {
            "spacing": np.asarray(images[0].GetSpacing(), dtype=np.float64),
            MetaKeys.ORIGINAL_AFFINE: first.affine,
            MetaKeys.AFFINE: first.affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(first.spatial_shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if channel_dim is None else channel_dim,
        }
        return c_order(array, self.dtype), meta


def readers(series_uid: str | None = None, dtype: np.dtype | type | str | None = None) -> list[ImageReader]:
    """Readers for ``LoadImaged(keys, reader=readers(dtype=...))``.

    MONAI tries the given readers last-to-first; the SimpleITK reader refuses NIfTI, which then
    goes to nibabel, exactly as ``LoadImaged`` without ``reader=`` would load it. `series_uid`
    picks one DICOM series in a directory that holds several. `dtype`: give ``LoadImaged``'s, so
    that the readers convert to it while they reorder (None: the stored dtypes; LoadImaged then
    casts those itself).
    """
    return [NibabelReader(dtype=dtype), SimpleITKReader(series_uid=series_uid, dtype=dtype)]
