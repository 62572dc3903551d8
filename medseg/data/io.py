"""Reading and writing volumes with one array layout and one world frame for every format.

Every format loads as MONAI's ``NibabelReader`` loads NIfTI: an array indexed ``(x, y, z[, channel])``
and a 4x4 affine mapping voxel indices to RAS world coordinates in mm. NIfTI is read with nibabel
exactly as ``NibabelReader`` reads it; NRRD, MetaImage and DICOM series with SimpleITK. ITK works
in LPS, so its direction and origin are converted by negating the first two rows of the affine, as
MONAI's ``ITKReader`` does.

This module imports no MONAI (importing it takes seconds), so ``medseg plan`` and the dataset
checks start fast. The MONAI readers that training gives ``LoadImaged`` are in
:mod:`medseg.data.readers`, built on the helpers here, so both read every file alike.
"""

from __future__ import annotations

import gzip
import io
import itertools
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError

from medseg.data.datafiles import MAX_HEADER_BYTES, check_data_files
from medseg.data.grid import grid_difference
from medseg.errors import DataError
from medseg.files import atomic_write
from medseg.stopping import SIGNALS, signals_blocked

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = [
    "Header",
    "MAX_VOXELS",
    "Volume",
    "as_paths",
    "c_order",
    "is_sitk_path",
    "load_volume",
    "map_cases",
    "nifti_array",
    "read_header",
    "SitkSource",
    "sitk_read",
    "sitk_source",
    "sitk_volume",
    "sitk_voxels",
    "spacing_in_ras",
    "stack_channels",
    "usable_cpus",
    "write_nifti",
]

PathLike = Union[str, os.PathLike]

# The most voxels (all channels together) medseg reads from one file or lets one case become
# after resampling to the target spacing: 2^30, 4 GiB as float32. A header claiming more is
# refused before any voxel is decompressed or allocated (a few KB of gzip can claim gigabytes).
MAX_VOXELS = 1 << 30
# NIfTI extensions (read before the voxels) may hold at most this many bytes.
MAX_NIFTI_EXTENSION_BYTES = 16 << 20

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")

# Errors that third-party readers raise for unreadable files; turned into DataError at the boundary.
_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    RuntimeError,
    zlib.error,
    ImageFileError,
    HeaderDataError,
    WrapStructError,
)


@dataclass(frozen=True, eq=False)
class Header:
    """Cheaply read geometry of a volume.

    Attributes:
        shape: spatial shape, in the array axis order ``(x, y, z)`` that the readers return.
        spacing: voxel size in mm along those axes.
        affine: voxel-to-RAS-world affine (4x4 for 3D images), as in MONAI's ``meta["affine"]``.
        channels: number of channels (vector components or non-spatial axes); 1 for scalar images.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray
    channels: int

    def __post_init__(self) -> None:
        affine = np.array(self.affine, dtype=np.float64)
        affine.flags.writeable = False
        object.__setattr__(self, "affine", affine)


def load_volume(
    path: Sequence[PathLike] | PathLike, *, label: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Load a volume channel-first with its RAS affine, as training's readers load it.

    The array and affine are those that ``LoadImaged(reader=readers())`` of
    :mod:`medseg.data.readers` gives before any transform, without importing MONAI.

    Args:
        path: an image file, a DICOM series directory, or a list of them stacked as channels.
        label: keep the stored dtype (for label maps) instead of converting to float32.

    Returns:
        ``(array, affine)``: array shaped ``(C, x, y, z)``, not reoriented; affine 4x4 RAS.

    Raises:
        DataError: the file is missing, unreadable or of an unsupported type.
    """
    paths = as_paths(path)
    if not paths:
        raise DataError("no image path given")
    for p in paths:
        _check_readable(p)
    nifti = _is_nifti_list(paths)
    for p in paths:
        if not os.path.isdir(p):  # a DICOM series is checked slice by slice as it is read
            read_header(p)  # size, voxel type and geometry, before any voxel is read
    shown = paths[0] if len(paths) == 1 else ", ".join(paths)
    try:
        if nifti:
            volumes = [_nifti_volume(nib.load(p)) for p in paths]
        else:
            volumes = [sitk_volume(sitk_read(p, None)) for p in paths]
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(f"{shown}: {_short_reason(exc)}") from exc
    try:
        array, channel_dim = stack_channels(volumes, nifti)
    except DataError as exc:
        raise DataError(f"{shown}: {exc}") from exc
    except ValueError as exc:  # e.g. numpy refusing to stack a 3D and a 4D image
        raise DataError(f"{shown}: {_short_reason(exc)}") from exc
    array = array[None] if channel_dim is None else np.moveaxis(array, channel_dim, 0)
    _check_voxel_type(shown, array.dtype)
    return c_order(array, None if label else np.float32), np.array(volumes[0].affine, dtype=np.float64)


def read_header(path: PathLike, series_uid: str | None = None) -> Header:
    """Read a volume's spatial shape, spacing, RAS affine and channel count without its voxels.

    NIfTI: nibabel header only. NRRD/MetaImage: ``ImageFileReader.ReadImageInformation``.
    DICOM directory: the first and last slice headers plus the slice count, reproducing how
    ``ImageSeriesReader`` derives slice spacing and direction. A truncated file whose header is
    intact is not detected here; :func:`load_volume` detects it. `series_uid` picks one DICOM
    series of a directory that holds several.

    The header is also checked: a voxel type medseg cannot train on (complex, RGB or other
    structured voxels), more than :data:`MAX_VOXELS` voxels, or a non-finite, zero-length or
    singular voxel-to-world matrix is refused here, before any voxel is read.

    Raises:
        DataError: the file is missing, unreadable, of an unsupported type, or its header
            describes a volume medseg cannot use.
    """
    name = os.fspath(path)
    _check_readable(name)
    try:
        if _has_suffix(name, NIFTI_SUFFIXES):
            header = _nifti_header(name)
        elif is_sitk_path(name):
            header = _sitk_header(name, series_uid)
        else:
            raise DataError(f"{name}: {_unsupported_reason()}")
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(f"{name}: {_short_reason(exc)}") from exc
    _check_size(name, header.shape, header.channels)
    check_geometry(name, header.affine)
    return header


def check_geometry(name: PathLike, affine: np.ndarray) -> None:
    """Refuse a voxel-to-world affine that no resampling can use: non-finite entries, a voxel
    size of zero, or axes that are not independent (a singular matrix).

    Raises:
        DataError: ``"<name>: invalid voxel spacing ..."`` or ``"<name>: singular affine ..."``.
    """
    affine = np.asarray(affine, dtype=np.float64)
    matrix = affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    if not np.all(np.isfinite(affine)) or np.any(spacing <= 0):
        raise DataError(f"{os.fspath(name)}: invalid voxel spacing {_mm(spacing)} mm or origin in the header")
    # |det| over the product of the column lengths: 1 for orthogonal axes, 0 for parallel ones.
    if abs(np.linalg.det(matrix)) < 1e-6 * float(np.prod(spacing)):
        raise DataError(f"{os.fspath(name)}: singular affine in the header (its voxel axes are not "
                        f"independent directions), so the volume has no usable world grid")


def spacing_in_ras(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes (mm) in the axis order a volume has after ``Orientationd(axcodes="RAS")``.

    Args:
        affine: 4x4 voxel-to-world affine of the volume as loaded.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"expected a 4x4 affine, got shape {affine.shape}")
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    ornt = nib.orientations.io_orientation(affine)
    out = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(ornt):
        out[int(target)] = float(sizes[axis])
    return out[0], out[1], out[2]


def write_nifti(
    array: np.ndarray,
    affine: np.ndarray,
    path: PathLike,
    dtype: np.dtype | type | str | None = None,
) -> None:
    """Write ``array`` (indexed ``(x, y, z[, c])``) as NIfTI with the given RAS affine, atomically.

    The data go to a temporary file in the target directory, which is flushed, fsynced and then
    renamed over ``path``; a failure leaves any existing file at ``path`` untouched.

    Args:
        array: voxel data, spatial axes first (as the readers return them, not channel-first).
        affine: 4x4 voxel-to-RAS-world affine, e.g. ``meta["affine"]`` of the matching image.
        path: target ``.nii.gz`` (gzip-compressed) or ``.nii`` file.
        dtype: stored dtype. ``None``: integer/bool arrays get the smallest of uint8, int16,
            uint16, int32 that holds their range (label maps); float arrays get float32.

    Raises:
        DataError: the target directory is missing or not writable, or writing fails.
        ValueError: bad array/affine shape, or values that do not fit ``dtype``.
    """
    target = Path(os.fspath(path))
    if not _has_suffix(target.name, NIFTI_SUFFIXES):
        raise ValueError(f"{target}: NIfTI file names end in .nii or .nii.gz")
    data = _nifti_data(np.asarray(array), dtype)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"expected a 4x4 affine, got shape {affine.shape}")
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    payload = image.to_bytes()
    if target.name.lower().endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=1, mtime=0)
    atomic_write(target, payload)


def usable_cpus() -> int:
    """CPU cores this process may run on, shared among the processes torchrun started on this
    machine (LOCAL_WORLD_SIZE), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cpus // max(local_world, 1))


def map_cases(function: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list[Any]:
    """``[function(item) for item in items]``, in order, spread over up to `workers` processes.

    Reading and preprocessing volumes (nibabel, MONAI) is mostly Python holding the GIL, so
    threads barely run it faster than one; forked processes scale with the cores. The children
    inherit `function` through fork (nothing is pickled but the items and results) and run
    torch on one thread each. Where fork is unsafe or unavailable (not Linux, or inside a
    daemonic process such as a DataLoader worker), a thread pool stands in, as before.
    """
    items = list(items)
    workers = min(workers, len(items))
    if workers <= 1:
        return [function(item) for item in items]
    if not sys.platform.startswith("linux") or multiprocessing.current_process().daemon:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(function, items))
    global _FORKED_FUNCTION
    _FORKED_FUNCTION = function
    pool = None
    try:
        # The children are forked here with SIGINT and SIGTERM held back until `_start_child` has
        # set what they do (a stop request is the parent's to handle).
        with signals_blocked():
            pool = ProcessPoolExecutor(workers, multiprocessing.get_context("fork"), initializer=_start_child)
            results = pool.map(_call_forked, items, chunksize=max(1, len(items) // (4 * workers)))
        return list(results)
    except BrokenProcessPool:
        raise MemoryError("a process reading the cases died (killed, or out of memory)") from None
    finally:
        if pool is not None:
            # On an error or a stop, the cases not begun are dropped; the children then exit.
            pool.shutdown(wait=True, cancel_futures=True)
        _FORKED_FUNCTION = None


# ---------------------------------------------------------------------------------------------
# shared with medseg.data.readers (the MONAI reader for SimpleITK's formats)


def as_paths(data: Sequence[PathLike] | PathLike) -> list[str]:
    """One path or a list of them (channel files), as a list of strings."""
    if isinstance(data, (str, os.PathLike)):
        return [os.fspath(data)]
    return [os.fspath(d) for d in data]


def is_sitk_path(name: PathLike) -> bool:
    """True for what SimpleITK reads here: NRRD and MetaImage files, and directories (DICOM series)."""
    name = os.fspath(name)
    return os.path.isdir(name) or _has_suffix(name, SITK_SUFFIXES)


def sitk_read(name: str, series_uid: str | None) -> sitk.Image:
    """Read an NRRD/MetaImage file or a DICOM series (`series_uid` picks one of several) with SimpleITK.

    Raises:
        DataError: the path is missing, not one of these formats, or unreadable.
    """
    return sitk_voxels(sitk_source(name, series_uid))


class SitkSource(NamedTuple):
    """A SimpleITK reader set up for one path, its header checks passed, no voxel read yet."""

    name: str
    reader: Any  # SimpleITK.ImageFileReader or ImageSeriesReader
    files: tuple[str, ...]  # a DICOM series' slice files; () for one file


def sitk_source(name: str, series_uid: str | None) -> SitkSource:
    """The first half of :func:`sitk_read`: the path checked and a reader set up for it.

    Raises:
        DataError: the path is missing, not one of SimpleITK's formats here, or its DICOM series
            cannot be chosen or does not lie on one grid.
    """
    import SimpleITK as sitk

    _check_readable(name)
    if os.path.isdir(name):
        files = _dicom_series_files(name, series_uid)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(list(files))
        reader.MetaDataDictionaryArrayUpdateOff()
        return SitkSource(name, reader, files)
    if not _has_suffix(name, SITK_SUFFIXES):
        raise DataError(f"{name}: not a SimpleITKReader format ({', '.join(SITK_SUFFIXES)} or a directory)")
    reader = sitk.ImageFileReader()
    reader.SetFileName(name)
    return SitkSource(name, reader, ())


def sitk_voxels(source: SitkSource) -> sitk.Image:
    """The second half of :func:`sitk_read`: the voxels read.

    A MetaImage file's data are checked first (its length, and a compressed stream to its end),
    since ITK reads missing or undecodable data as zeros and only prints a warning.

    Raises:
        DataError: the data are truncated, corrupt or otherwise unreadable.
    """
    if not source.files and _has_suffix(source.name, (".mha", ".mhd")):
        _check_metaimage_data(source.name)
    try:
        with _itk_output_held():
            return source.reader.Execute()
    except RuntimeError as exc:
        if source.files:
            culprit = _unreadable_slice(source.files)
            raise DataError(f"{culprit or source.name}: {_short_reason(exc)}") from exc
        raise DataError(f"{source.name}: voxel data truncated or unreadable ({_itk_reason(exc)})") from exc


def nifti_array(image: nib.Nifti1Image) -> np.ndarray:
    """``np.asanyarray(image.dataobj)`` (the array MONAI's ``NibabelReader`` reads), a gzip-compressed
    file checked to its end.

    nibabel stops decompressing once it has the voxels, so gzip never reaches the trailer with the
    CRC and length of the data, and a file altered inside a stored block reads without a complaint.
    Here the voxels are read through one gzip stream that then goes on to its end, which makes
    Python's gzip check that trailer: the voxels are decompressed once, with only the bytes after
    them (normally none) added.

    Raises:
        DataError: the gzip data are corrupt or truncated.
    """
    proxy = image.dataobj
    name = getattr(proxy, "file_like", None)
    if not isinstance(proxy, nib.arrayproxy.ArrayProxy) or not isinstance(name, str) or not _is_gzip(name):
        return np.asanyarray(proxy)
    spec = (proxy.shape, proxy.dtype, proxy.offset, proxy.slope, proxy.inter)
    try:
        with nib.openers.ImageOpener(name) as stream:
            array = np.asanyarray(type(proxy)(stream, spec, mmap=False, order=proxy.order))
            _read_to_end(name, stream)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{name}: corrupt or truncated gzip data ({exc or type(exc).__name__})") from exc
    return array


def c_order(array: np.ndarray, dtype: np.dtype | type | str | None = None) -> np.ndarray:
    """``np.ascontiguousarray(array.astype(dtype, copy=False))`` in one pass: `array` in C order,
    cast to `dtype` (None: its own dtype, byte order included). The values are astype's, element
    for element; an array already in C order and of that dtype is returned as it is.

    Every reader returns a C-ordered array, but NIfTI stores x fastest and SimpleITK's arrays are
    transposed views, so that copy transposes. Copied element by element (numpy's order) one side
    of it jumps a whole slice per element and misses the cache at each; copied in tiles that fit in
    the cache, and cast on the way instead of in a pass of its own, it runs several times faster
    (scripts/bench_reading.py).
    """
    dtype = array.dtype if dtype is None else np.dtype(dtype)
    fastest = _fastest_axis(array)
    if array.flags.c_contiguous or fastest is None or fastest == array.ndim - 1:
        return np.ascontiguousarray(array.astype(dtype, copy=False))
    out = np.empty(array.shape, dtype=dtype)
    for tile in _tiles(array.shape, (fastest, array.ndim - 1)):
        out[tile] = array[tile]
    return out


class Volume(NamedTuple):
    """A volume as read, before channels are moved first."""

    array: np.ndarray  # indexed (x, y, z[, channel]); NIfTI's extra axes stay as stored
    affine: np.ndarray  # 4x4 voxel-to-RAS
    spatial_shape: tuple[int, ...]  # the first 1-3 axes

    @property
    def channel_dim(self) -> int | None:
        """Axis of the channels: None for a scalar image, else the last (MONAI's "original_channel_dim")."""
        return None if self.array.ndim == len(self.spatial_shape) else -1


def stack_channels(volumes: Sequence[Volume], nifti: bool) -> tuple[np.ndarray, int | None]:
    """One array of several files' voxels, as MONAI's readers join a list of files.

    Scalar images are stacked along a new first axis; images with channels are concatenated along
    their channel axis. Returns the array and its channel axis (None: a single scalar image).
    NIfTI channel files must share their affine as closely as MONAI's ``NibabelReader`` demands
    (``np.allclose``'s defaults), since training reads them through it; the other formats go
    through medseg's own reader and share the grid rule of the dataset checks
    (:func:`medseg.data.grid.grid_difference`).

    Raises:
        DataError: the volumes differ in spatial shape or affine.
    """
    first = volumes[0]
    if len(volumes) == 1:
        return first.array, first.channel_dim
    for other in volumes[1:]:
        if other.spatial_shape != first.spatial_shape:
            raise DataError(
                f"channel images differ in shape: {first.spatial_shape} vs {other.spatial_shape}"
            )
        if nifti and not np.allclose(other.affine, first.affine):
            raise DataError("channel images differ in affine (voxel-to-world geometry)")
        difference = None if nifti else grid_difference(other.affine, first.affine, "channel 0")
        if difference:
            raise DataError(f"channel images differ: {difference}")
    arrays = [volume.array for volume in volumes]
    if first.channel_dim is None:
        return np.stack(arrays, axis=0), 0
    return np.concatenate(arrays, axis=first.channel_dim), first.channel_dim


def sitk_volume(image: sitk.Image) -> Volume:
    """Voxels indexed ``(x, y, z[, component])`` (the transpose of ``GetArrayFromImage``), RAS affine."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)
    dim = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() > 1:
        # (z, y, x, c) -> (x, y, z, c)
        array = np.transpose(array, (*range(dim - 1, -1, -1), dim))
    else:
        array = array.T
    rank = max(min(dim, 3), 1)
    spatial_shape = tuple(int(n) for n in image.GetSize()[:rank])
    affine = _ras_affine(image.GetDirection(), image.GetSpacing(), image.GetOrigin())
    return Volume(array, affine, spatial_shape)


# ---------------------------------------------------------------------------------------------
# private helpers


_FORKED_FUNCTION: Callable[[Any], Any] | None = None


def _call_forked(item: Any) -> Any:
    assert _FORKED_FUNCTION is not None
    return _FORKED_FUNCTION(item)


def _start_child() -> None:
    # One intra-op thread per child: the children already use the cores, and on small volumes
    # OpenMP's start-up per operator costs more than the work (2 processes of 2 threads each took
    # 23 s for the hippocampus cache on 2 cores, of one thread each 4.5 s). Reductions (the
    # z-score's mean and std) then sum in one fixed order, whatever the machine's core count.
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    # The parent's stop handlers (training's SIGINT/SIGTERM requests) must not survive the fork:
    # SIGTERM (a scheduler's, to the whole process group) ends a child at once; Ctrl-C, which a
    # terminal also sends to the whole group, is the parent's to handle.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


# Tile of `c_order`'s copy: 64 voxels along the axes that the source and the target each store
# fastest (a cache line or more of contiguous reads and of contiguous writes), 16 along the others,
# so that a tile of a 3D volume (64 x 16 x 64 voxels, 384 KiB from int16 to float32) stays in the
# cache. On a 512x512x400 int16 volume, 32-64 by 4-16 ran within noise of each other; 128 along the
# fast axes, or every voxel along the other, was slower.
_TILE_FAST = 64
_TILE_OTHER = 16


def _fastest_axis(array: np.ndarray) -> int | None:
    """The axis of more than one element along which `array` is stored densest (None: no such axis)."""
    axes = [axis for axis in range(array.ndim) if array.shape[axis] > 1]
    return min(axes, key=lambda axis: abs(array.strides[axis])) if axes else None


def _tiles(shape: Sequence[int], fast_axes: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    """Index tuples of slices that cover an array of `shape` in tiles (longer along `fast_axes`)."""
    steps = [_TILE_FAST if axis in fast_axes else _TILE_OTHER for axis in range(len(shape))]
    starts = [range(0, int(n), step) for n, step in zip(shape, steps)]
    for corner in itertools.product(*starts):
        yield tuple(slice(start, start + step) for start, step in zip(corner, steps))


# MetaImage element types and their bytes per component, as MetaIO stores them (MET_LONG is 4).
_MET_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}
# zlib's window bits for a zlib or a gzip header, as MetaIO inflates compressed data.
_ZLIB_OR_GZIP = zlib.MAX_WBITS | 32
_CHUNK = 1 << 20

# One read at a time holds the process's stderr (see _itk_output_held).
_STDERR_LOCK = threading.Lock()


@contextmanager
def _itk_output_held() -> Iterator[None]:
    """Keep ITK's own complaints off stderr while it reads; medseg's one line says what failed.

    ITK's warnings obey ``SetGlobalWarningDisplay``, but MetaIO writes straight to the process's
    stderr ("M_ReadElementsData: data not read completely", "Uncompress failed"), so file
    descriptor 2 goes to a temporary file meanwhile. After a read that succeeded, what was written
    there is passed on (another thread may have written it); after one that failed, it is dropped.
    """
    import SimpleITK as sitk

    with _STDERR_LOCK, tempfile.TemporaryFile() as held:
        sys.stderr.flush()
        saved = os.dup(2)
        shown = sitk.ProcessObject.GetGlobalWarningDisplay()
        succeeded = False
        try:
            sitk.ProcessObject.SetGlobalWarningDisplay(False)
            os.dup2(held.fileno(), 2)
            yield
            succeeded = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sitk.ProcessObject.SetGlobalWarningDisplay(shown)
            if succeeded:
                held.seek(0)
                while chunk := held.read(_CHUNK):
                    os.write(2, chunk)


def _itk_reason(exc: RuntimeError) -> str:
    """ITK's message without its source location and object address ("MetaImageIO(0x55...): ")."""
    reason = _short_reason(exc)[len("cannot read ("):-1]
    return re.sub(r"\b(\w+)\(0x[0-9a-fA-F]+\): ", r"\1: ", reason)


class _MetaLayout(NamedTuple):
    data_file: str
    offset: int  # where the element data begin in data_file
    compressed: bool
    compressed_size: int | None  # CompressedDataSize, when the header gives it
    expected: int  # bytes of the (decompressed) element data


def _check_metaimage_data(name: str) -> None:
    """Refuse MetaImage element data that are shorter than the header says, or a compressed stream
    that does not inflate to exactly that length; ITK would fill the rest with zeros.

    The stream is inflated in bounded memory, its output counted and dropped. Layouts this does
    not follow (a LIST of slice files, a file pattern, HeaderSize) are left to ITK.
    """
    layout = _metaimage_layout(name)
    if layout is None:
        return
    available = max(os.path.getsize(layout.data_file) - layout.offset, 0)
    if not layout.compressed:
        if available < layout.expected:
            raise DataError(f"{name}: voxel data truncated ({available:,} of the {layout.expected:,} bytes "
                            f"its header describes)")
        return
    size = available if layout.compressed_size is None else layout.compressed_size
    if size > available:
        raise DataError(f"{name}: compressed data truncated ({available:,} of the {size:,} bytes of "
                        f"CompressedDataSize)")
    produced, complete = _inflate(name, layout.data_file, layout.offset, size, layout.expected)
    if produced > layout.expected:
        raise DataError(f"{name}: compressed data inflate to more than the {layout.expected:,} bytes "
                        f"its header describes")
    if not complete or produced < layout.expected:
        raise DataError(f"{name}: compressed data truncated or corrupt (they end after {produced:,} of "
                        f"the {layout.expected:,} bytes its header describes)")


def _inflate(name: str, data_file: str, offset: int, size: int, limit: int) -> tuple[int, bool]:
    """How many bytes `size` bytes of zlib/gzip data at `offset` inflate to (counting stops past
    `limit`), and whether the stream is complete (its end and checksum reached)."""
    inflate = zlib.decompressobj(_ZLIB_OR_GZIP)
    produced = 0
    with open(data_file, "rb") as stream:
        stream.seek(offset)
        left = size
        try:
            while left > 0 and not inflate.eof and produced <= limit:
                data = stream.read(min(left, _CHUNK))
                left -= len(data)
                while data and not inflate.eof and produced <= limit:
                    produced += len(inflate.decompress(data, _CHUNK))
                    data = inflate.unconsumed_tail
        except zlib.error as exc:
            raise DataError(f"{name}: compressed data are corrupt ({exc})") from exc
    return produced, inflate.eof


def _metaimage_layout(name: str) -> _MetaLayout | None:
    """Where a MetaImage file keeps its element data and how long they are, from its text header
    (None: a layout left to ITK, or a header ITK's own reading judges)."""
    with open(name, "rb") as stream:
        head = stream.read(MAX_HEADER_BYTES)
    fields: dict[str, str] = {}
    offset = 0
    for line in head.splitlines(keepends=True):
        offset += len(line)
        key, separator, value = line.decode("latin-1").partition("=")
        if not separator:
            continue
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            break
    else:
        return None
    try:
        dims = [int(n) for n in fields.get("dimsize", "").split()]
        channels = int(fields.get("elementnumberofchannels", "1"))
        element = _MET_BYTES[fields.get("elementtype", "").upper()]
        compressed_size = int(fields["compresseddatasize"]) if "compresseddatasize" in fields else None
        header_size = int(fields.get("headersize", "0"))
    except (ValueError, KeyError):
        return None
    source = fields["elementdatafile"]
    if not dims or header_size or source.upper().startswith("LIST") or "%" in source:
        return None
    if source.upper() == "LOCAL":
        source = name
    else:
        source, offset = os.path.join(os.path.dirname(name), source), 0
        if not os.path.isfile(source):
            return None  # ITK says the data file is missing
    _check_size(name, dims[:3], channels * int(np.prod(dims[3:], dtype=np.int64)))
    compressed = fields.get("compresseddata", "false").lower() == "true"
    expected = int(np.prod(dims, dtype=np.int64)) * channels * element
    return _MetaLayout(source, offset, compressed, compressed_size, expected)


def _check_size(name: str, shape: Sequence[int], channels: int) -> None:
    voxels = int(np.prod([int(n) for n in shape], dtype=np.float64) * max(int(channels), 1))
    if voxels > MAX_VOXELS:
        dims = "×".join(str(int(n)) for n in shape) + (f"×{channels}" if channels != 1 else "")
        raise DataError(f"{name}: the header claims {dims} = {voxels:,} voxels, more than medseg "
                        f"reads from one file ({MAX_VOXELS:,})")


def _check_voxel_type(name: str, dtype: np.dtype) -> None:
    """Complex and structured (RGB, RGBA, records) voxels are refused: converting them to the
    float32 medseg trains on would drop the imaginary part or mix colours into one number."""
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        raise DataError(f"{name}: complex voxels ({dtype}); medseg reads real-valued images "
                        f"(save the magnitude, e.g. numpy.abs, as a float image)")
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise DataError(f"{name}: {_dtype_text(dtype)} voxels; medseg reads scalar images "
                        f"(one number per voxel and channel), not RGB or structured data")


def _is_gzip(name: str) -> bool:
    return name.lower().endswith(".gz")  # nibabel's openers choose gzip by this suffix too


def _read_to_end(name: str, stream: Any) -> None:
    """Read an open gzip stream to its end (Python's gzip then checks its CRC and length), keeping
    nothing. Data after the voxels are bounded as the extensions before them are: a few bytes of
    gzip could otherwise decompress for hours there."""
    left = MAX_NIFTI_EXTENSION_BYTES
    while chunk := stream.read(min(left + 1, 1 << 20)):
        left -= len(chunk)
        if left < 0:
            raise DataError(f"{name}: more than {MAX_NIFTI_EXTENSION_BYTES:,} bytes of data after the voxels")


def _dtype_text(dtype: np.dtype) -> str:
    if dtype.fields is not None:
        return "structured (" + ", ".join(dtype.names or ()) + ")"
    return str(dtype)


def _mm(values: Sequence[float]) -> str:
    return "×".join(f"{float(v):.4g}" for v in values)


def _has_suffix(name: str, suffixes: Sequence[str]) -> bool:
    return name.lower().endswith(tuple(suffixes))


def _unsupported_reason() -> str:
    return "unsupported file type (expected .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd or a DICOM directory)"


def _check_readable(name: str) -> None:
    if not os.path.exists(name):
        raise DataError(f"{name}: no such file or directory")
    if not os.access(name, os.R_OK):
        raise DataError(f"{name}: permission denied")
    check_data_files(name)  # a MetaImage/NRRD header naming data files outside its folder


def _is_nifti_list(paths: list[str]) -> bool:
    """True for NIfTI files, False for SimpleITK's formats and DICOM directories, else DataError."""
    if all(is_sitk_path(p) for p in paths):
        return False
    if all(_has_suffix(p, NIFTI_SUFFIXES) for p in paths):
        return True
    bad = next((p for p in paths if not (is_sitk_path(p) or _has_suffix(p, NIFTI_SUFFIXES))), None)
    if bad is None:
        raise DataError(f"{', '.join(paths)}: cannot stack NIfTI and non-NIfTI files as channels")
    raise DataError(f"{bad}: {_unsupported_reason()}")


def _short_reason(exc: BaseException) -> str:
    """One line from a library exception; ITK messages carry source locations before 'ERROR:'."""
    text = str(exc).strip()
    if "ERROR:" in text:
        text = text.rsplit("ERROR:", 1)[1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0] if lines else type(exc).__name__
    if len(reason) > 200:
        reason = reason[:197] + "..."
    return f"cannot read ({type(exc).__name__}: {reason})" if lines else f"cannot read ({reason})"


def _dicom_series_files(directory: str, series_uid: str | None) -> tuple[str, ...]:
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(directory)
    if not series:
        raise DataError(f"{directory}: no DICOM series found in directory")
    if series_uid is not None:
        if series_uid not in series:
            raise DataError(f"{directory}: no DICOM series with SeriesInstanceUID {series_uid}")
        uid = series_uid
    elif len(series) > 1:
        raise DataError(
            f"{directory}: directory holds {len(series)} DICOM series; choose one with series_uid"
        )
    else:
        uid = series[0]
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(directory, uid)
    if not files:
        raise DataError(f"{directory}: DICOM series {uid} has no readable files")
    _check_no_dropped_files(directory, series)
    _check_dicom_slices(directory, tuple(files))
    return tuple(files)


def _check_no_dropped_files(directory: str, series: Sequence[str]) -> None:
    """A file that says it is DICOM (the 'DICM' marker) but belongs to no series GDCM could read
    is corrupt; ITK would silently leave it out of the volume."""
    import SimpleITK as sitk

    known = {os.path.abspath(f) for uid in series
             for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(directory, uid)}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if not entry.is_file() or os.path.abspath(entry.path) in known:
            continue
        with open(entry.path, "rb") as stream:
            marker = stream.read(132)[128:]
        if marker == b"DICM":
            raise DataError(f"{entry.path}: corrupt DICOM file (it belongs to no readable series of {directory})")


def _check_dicom_slices(directory: str, files: tuple[str, ...]) -> None:
    """Refuse a series whose slices do not lie on one uniform grid (a missing, duplicated or
    unreadable slice): ITK would stack them at the first gap's spacing, an invented grid.

    Reads every slice's header (geometry only) and compares the steps between neighbouring slice
    positions along the slice normal; the size bound is checked from them too.
    """
    headers = [_read_information(name) for name in files]
    first = headers[0]
    for name, header in zip(files, headers):
        if header.GetSize()[:2] != first.GetSize()[:2]:
            raise DataError(f"{name}: slice of {header.GetSize()[0]}×{header.GetSize()[1]} pixels in a "
                            f"series of {first.GetSize()[0]}×{first.GetSize()[1]} ({directory})")
    _check_size(directory, (*first.GetSize()[:2], len(files)), first.GetNumberOfComponents())
    if len(files) < 3:
        return
    direction = np.asarray(first.GetDirection(), dtype=np.float64).reshape(3, 3)
    normal = np.cross(direction[:, 0], direction[:, 1])
    positions = np.array([np.dot(np.asarray(h.GetOrigin(), dtype=np.float64), normal) for h in headers])
    steps = np.diff(positions)
    usual = float(np.median(steps))
    tolerance = max(1e-3, 0.01 * abs(usual))
    odd = np.flatnonzero(np.abs(steps - usual) > tolerance)
    if abs(usual) <= tolerance or odd.size:
        k = int(odd[0]) if odd.size else 0
        raise DataError(
            f"{directory}: slices {os.path.basename(files[k])} and {os.path.basename(files[k + 1])} are "
            f"{abs(steps[k]):.4g} mm apart where the series steps {abs(usual):.4g} mm: a slice is missing, "
            f"duplicated or unreadable (the series is not on one uniform grid)")


def _unreadable_slice(files: Sequence[str]) -> str | None:
    """The first slice of a series that SimpleITK cannot read on its own, to name in an error."""
    import SimpleITK as sitk

    for name in files:
        try:
            sitk.ReadImage(name)
        except RuntimeError:
            return name
    return None


def _ras_affine(direction: Sequence[float], spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """ITK (LPS) geometry to a voxel-to-RAS affine, as MONAI's ITKReader builds it."""
    dim = len(spacing)
    rank = max(min(dim, 3), 1)
    matrix = np.asarray(direction, dtype=np.float64).reshape(dim, dim)[:rank, :rank]
    affine = np.eye(rank + 1)
    affine[:rank, :rank] = matrix @ np.diag(np.asarray(spacing, dtype=np.float64)[:rank])
    affine[:rank, rank] = np.asarray(origin, dtype=np.float64)[:rank]
    flip = min(rank, 2)
    affine[:flip, :] *= -1.0
    return affine


def _nifti_volume(image: nib.Nifti1Image) -> Volume:
    """Voxels and geometry of a loaded NIfTI image, exactly as MONAI's ``NibabelReader`` returns them.

    The array is ``np.asanyarray(image.dataobj)``: nibabel applies scl_slope/scl_inter (scaled
    data come out as floats, unscaled data keep their stored dtype) and keeps every stored axis.
    """
    affine = _nifti_affine(image)
    dim = image.header["dim"]
    rank = max(min(int(dim[0]), 3), 1)
    spatial_shape = tuple(int(n) for n in dim[1 : rank + 1])
    return Volume(nifti_array(image), affine, spatial_shape)


def _nifti_affine(image: nib.Nifti1Image) -> np.ndarray:
    """The affine MONAI uses for a NIfTI image (its ``correct_nifti_header_if_necessary``).

    Where the voxel sizes in pixdim disagree with the affine nibabel chose, MONAI trusts whichever
    of sform and qform agrees with pixdim: a disagreeing sform is replaced by the qform, or an
    unused sform that agrees becomes the qform. Images with 5 or more dimensions are left alone.
    MONAI then also rewrites pixdim, which moves no voxel and is not needed here.
    """
    header = image.header
    ndim = int(header["dim"][0])
    if ndim >= 5:
        return image.affine
    pixdim = np.asarray(header.get_zooms())[:ndim]
    if np.allclose(pixdim, _column_norms(image.affine, ndim)):
        return image.affine
    sform, qform = image.get_sform(), image.get_qform()
    sform_agrees = np.allclose(_column_norms(sform, ndim), pixdim)
    qform_agrees = np.allclose(_column_norms(qform, ndim), pixdim)
    if header["sform_code"] != 0:
        if sform_agrees:
            return image.affine
        if qform_agrees:
            image.set_sform(qform)  # updates image.affine
            return image.affine
    if header["qform_code"] != 0 and not qform_agrees and sform_agrees:
        image.set_qform(sform)  # the qform becomes the sform's nearest rotation; updates image.affine
    return image.affine


def _column_norms(affine: np.ndarray, rank: int) -> np.ndarray:
    """Lengths of the first `rank` columns of ``affine[:rank, :rank]``, zeros read as 1 (as MONAI)."""
    block = np.asarray(affine, dtype=np.float64)[:rank, :rank]
    norms = np.sqrt(np.sum(block * block, axis=0))
    norms[norms == 0] = 1.0
    return norms


def _nifti_raw_header(name: str) -> None:
    """Check a NIfTI header from its first bytes alone, before nibabel reads its extensions.

    nibabel reads every extension (up to ``vox_offset``) when it opens a file; through gzip a few
    KB can expand to gigabytes there, so the offset, the shape and the voxel type are checked
    from the 348 (NIfTI-1) or 540 (NIfTI-2) header bytes first. Files that are not NIfTI are left
    to nibabel, which says so.
    """
    with nib.openers.ImageOpener(name) as stream:
        raw = stream.read(540)
    if len(raw) < 348:
        return
    sizes = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
    kind = nib.Nifti1Header if 348 in sizes else nib.Nifti2Header if 540 in sizes and len(raw) == 540 else None
    if kind is None:
        return
    try:
        header = kind.from_fileobj(io.BytesIO(raw[:kind.sizeof_hdr]), check=False)
        shape = header.get_data_shape()
        dtype = header.get_data_dtype()
    except (HeaderDataError, WrapStructError, ValueError, TypeError):
        return  # nibabel's own reading reports a malformed header
    if int(header["vox_offset"]) > MAX_NIFTI_EXTENSION_BYTES:
        raise DataError(f"{name}: the header puts the voxels {int(header['vox_offset']):,} bytes into the "
                        f"file, after more extension data than medseg reads ({MAX_NIFTI_EXTENSION_BYTES:,})")
    _check_size(name, shape[:3], int(np.prod(shape[3:], dtype=np.float64)) if len(shape) > 3 else 1)
    _check_voxel_type(name, dtype)


def _nifti_header(name: str) -> Header:
    _nifti_raw_header(name)
    image = nib.load(name)
    shape = tuple(int(s) for s in image.header.get_data_shape())
    affine = np.array(_nifti_affine(image), dtype=np.float64)  # as load_volume and training see it
    rank = min(len(shape), 3)
    spacing = np.linalg.norm(affine[:3, :rank], axis=0)
    channels = int(np.prod(shape[3:])) if len(shape) > 3 else 1
    return Header(shape[:rank], tuple(float(s) for s in spacing), affine, channels)


def _sitk_header(name: str, series_uid: str | None = None) -> Header:
    if os.path.isdir(name):
        return _dicom_header(name, series_uid)
    reader = _read_information(name)
    import SimpleITK as sitk

    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    if "complex" in pixel.lower():
        raise DataError(f"{name}: complex voxels ({pixel}); medseg reads real-valued images "
                        f"(save the magnitude as a float image)")
    size, dim = reader.GetSize(), reader.GetDimension()
    rank = max(min(dim, 3), 1)
    channels = reader.GetNumberOfComponents() * int(np.prod(size[rank:], dtype=np.int64))
    affine = _ras_affine(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin())
    spacing = tuple(float(s) for s in reader.GetSpacing()[:rank])
    return Header(tuple(int(s) for s in size[:rank]), spacing, affine, channels)


def _read_information(name: str) -> "sitk.ImageFileReader":
    """A reader holding the file's header (geometry, pixel type) without its pixels."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(name)
    try:
        with _itk_output_held():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DataError(f"{name}: {_short_reason(exc)}") from exc
    return reader


def _dicom_header(directory: str, series_uid: str | None = None) -> Header:
    """Series geometry from its first and last slice, as ITK's ImageSeriesReader computes it."""
    files = _dicom_series_files(directory, series_uid)
    first, last = (_read_information(name) for name in (files[0], files[-1]))
    size = list(first.GetSize())[:3]
    spacing = list(first.GetSpacing())[:3]
    direction = np.asarray(first.GetDirection(), dtype=np.float64).reshape(3, 3)
    if len(files) > 1:
        step = np.asarray(last.GetOrigin()) - np.asarray(first.GetOrigin())
        distance = float(np.linalg.norm(step))
        if distance > 0:
            spacing[2] = distance / (len(files) - 1)
            direction[:, 2] = step / distance
        size[2] = len(files)
    affine = _ras_affine(direction.ravel(), spacing, first.GetOrigin())
    return Header(tuple(int(s) for s in size), tuple(float(s) for s in spacing), affine, first.GetNumberOfComponents())


def _nifti_data(array: np.ndarray, dtype: np.dtype | type | str | None) -> np.ndarray:
    if array.size == 0:
        raise ValueError("cannot write an empty array")
    if array.ndim == 4 and array.shape[0] == 1 and array.shape[-1] != 1:
        raise ValueError(
            f"array of shape {array.shape} looks channel-first; NIfTI wants (x, y, z[, c]): squeeze it"
        )
    if array.ndim not in (2, 3, 4, 5):
        raise ValueError(f"expected a 2-5 dimensional array, got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if dtype is None:
        if np.issubdtype(array.dtype, np.integer):
            low, high = int(array.min()), int(array.max())
            for candidate in (np.uint8, np.int16, np.uint16, np.int32):
                info = np.iinfo(candidate)
                if info.min <= low and high <= info.max:
                    return array.astype(candidate, copy=False)
            raise ValueError(f"label values {low}..{high} do not fit in int32")
        return array.astype(np.float32, copy=False)
    target = np.dtype(dtype)
    if np.issubdtype(target, np.integer):
        if np.issubdtype(array.dtype, np.floating):
            if not np.all(np.isfinite(array)):
                raise ValueError(f"cannot store non-finite values as {target}")
            array = np.rint(array)
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise ValueError(f"values {array.min()}..{array.max()} do not fit in {target}")
    return array.astype(target, copy=False)
