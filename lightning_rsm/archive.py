"""An archive of every evaluation's RSMs: one file per evaluation, written once, read back exact.

Layout: ``<log_dir>/rsms/step=<step, 10 digits>.pt``, one file per evaluation, each a dict that
``torch.load(path, weights_only=True)`` reads:

================  ==================================================================
key               value
================  ==================================================================
``"format"``      ``"lightning_rsm.archive"``, and ``"version"``: ``1``
``"step"``        global step of the evaluation (int); ``"epoch"`` (int)
``"evaluation"``  its number among the evaluations the run wrote, from 0 (int)
``"n"``           probe size N (int)
``"layers"``      layer names in the monitor's order (list of str)
``"rsms"``        ``{layer: {kind: float32 (N (N + 1) / 2,)}}``: the upper triangle with
                  the diagonal, row by row (``torch.triu_indices(N, N)``)
``"labels"``      the probe's labels ``(N,)`` / ``(N, L)``, or None
``"logits"``      the model's logits on the probe ``(N, K)`` (float32), or None
``"ids"``         sample ids: a list of N str, an int64 ``(N,)`` tensor, or None
``"fingerprint"`` :func:`probe_fingerprint` of the probe (hex str)
``"settings"``    the RSM options (kernel, matcher, ...): str -> str/int/float/bool/None
================  ==================================================================

**Size and precision.** An RSM costs ``4 N (N + 1) / 2`` bytes; labels, logits and the file's
headers add a few KB. 3 layers x 2 kinds with 10-class logits take 184 KB per evaluation at
N = 120 and 3.03 MB at N = 500 (measured). Every entry on and above the diagonal comes back bit
for bit as the float32 RSM the monitor scored; the lower triangle is its mirror (every RSM of
this package is exactly symmetric). :class:`ArchiveWriter`'s ``keep_every`` and ``keep_last``
(``RSMMonitor``'s ``save_every`` and ``save_last``) bound the number of files.

A write goes to a temporary file renamed into place, so a reader never sees half a file; the
file name is the step, so a resumed run that evaluates a step again replaces that file, and an
evaluation at step s removes the files of later steps (the future the resumed run abandoned).
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT = "lightning_rsm.archive"
VERSION = 1
#: The archive's folder inside a run's log dir.
FOLDER = "rsms"
_FILE = re.compile(r"step=(\d+)\.pt")
_TMP_PREFIX = ".tmp-"

Ids = Sequence[str] | Sequence[int] | Tensor
Setting = str | int | float | bool | None
_SETTING_TYPES = (str, int, float, bool, type(None))


def _update_hash(digest: Any, value: Any, where: str) -> None:
    """Feed a tensor, or a dict/tuple/list of tensors, into ``digest`` with its structure."""
    if isinstance(value, Tensor):
        data = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {data.dtype} {tuple(value.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(f"dict {len(value)};".encode())
        for key in sorted(value, key=str):
            digest.update(f"key {key!r};".encode())
            _update_hash(digest, value[key], f"{where}[{key!r}]")
    elif isinstance(value, (tuple, list)):
        digest.update(f"sequence {len(value)};".encode())
        for i, item in enumerate(value):
            _update_hash(digest, item, f"{where}[{i}]")
    else:
        raise TypeError(
            f"Expected {where} to be a tensor or a dict, tuple or list of tensors, "
            f"but got {type(value).__name__}."
        )


def probe_fingerprint(inputs: Any, labels: Tensor | None = None) -> str:
    """A SHA-256 of a probe: every input tensor's dtype, shape and bytes, and the labels.

    Two archives with the same fingerprint were made on the same inputs in the same order (a
    CPU and a CUDA copy of a tensor give the same fingerprint). Compute it once per probe.

    Args:
        inputs: the probe inputs: a tensor ``(N, ...)``, or a dict/tuple/list of tensors.
        labels: the probe labels ``(N,)`` / ``(N, L)``, or None.

    Returns:
        64 hex digits.

    Raises:
        TypeError: If ``inputs`` holds something other than tensors.

    Example:
        >>> x = torch.arange(6.0).reshape(3, 2)
        >>> probe_fingerprint(x) == probe_fingerprint(x.clone())
        True
        >>> probe_fingerprint(x) == probe_fingerprint(x.double())
        False
        >>> probe_fingerprint(x, torch.tensor([0, 1, 1]))[:12]
        '1189f83d87d8'
    """
    digest = hashlib.sha256()
    _update_hash(digest, inputs, "`inputs`")
    digest.update(b"labels;")
    if labels is not None:
        _update_hash(digest, labels, "`labels`")
    return digest.hexdigest()


def _check_ids(ids: Ids | None, n: int) -> list[str] | Tensor | None:
    """Sample ids as stored: a list of str or an int64 tensor ``(N,)``."""
    if ids is None:
        return None
    if isinstance(ids, Tensor):
        if ids.ndim != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise ValueError(
                f"Expected `ids` to be an int tensor of shape ({n},), but got dtype {ids.dtype} "
                f"and shape {tuple(ids.shape)}."
            )
        stored: list[str] | Tensor = ids.detach().cpu().long()
    elif isinstance(ids, Sequence) and not isinstance(ids, str):
        if all(isinstance(i, str) for i in ids):
            stored = list(ids)
        elif all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            stored = torch.tensor(list(ids), dtype=torch.long)
        else:
            raise TypeError("Expected `ids` to hold only str or only int, but got a mix.")
    else:
        raise TypeError(
            f"Expected `ids` to be a sequence of str or int, or an int tensor, "
            f"but got {type(ids).__name__}."
        )
    if len(stored) != n:
        raise ValueError(f"Expected {n} `ids`, one per probe sample, but got {len(stored)}.")
    return stored


def _check_settings(settings: Mapping[str, Setting]) -> dict[str, Setting]:
    bad = [
        f"{key!r}: {type(value).__name__}"
        for key, value in settings.items()
        if not (isinstance(key, str) and isinstance(value, _SETTING_TYPES))
    ]
    if bad:
        raise TypeError(
            f"Expected `settings` to map str to str, int, float, bool or None, but got {bad}."
        )
    return dict(settings)


def _file_name(step: int) -> str:
    return f"step={step:010d}.pt"


def _archive_files(folder: Path) -> dict[int, Path]:
    """The archive files of a folder by step (temporary files are not listed)."""
    files = {}
    for path in folder.iterdir():
        match = _FILE.fullmatch(path.name)
        if match and path.is_file():
            files[int(match.group(1))] = path
    return dict(sorted(files.items()))


def _read(path: Path) -> dict[str, Any]:
    """One archive file's dict (tensors memory-mapped), or ``ValueError`` if it is not one."""
    try:
        with warnings.catch_warnings():  # torch 2.1-2.2 warn of TypedStorage on every load
            warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
            # a str, not a Path: torch 2.1 memory-maps only a file name
            content = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ValueError(
            f"Expected {str(path)!r} to be an RSM archive file, but it could not be loaded "
            f"({type(error).__name__})."
        ) from None
    if not (isinstance(content, dict) and content.get("format") == FORMAT):
        raise ValueError(
            f"Expected {str(path)!r} to be an RSM archive file (format {FORMAT!r}), "
            "but it holds something else."
        )
    if content.get("version") != VERSION:
        raise ValueError(
            f"Expected {str(path)!r} to have archive version {VERSION}, "
            f"but got {content.get('version')!r}; use the lightning_rsm version that wrote it."
        )
    return content


class ArchiveWriter:
    """Writes one file per evaluation into an archive folder (see the module docstring).

    A plain object: the caller makes sure only one process (rank 0) writes. The probe's
    labels, sample ids, fingerprint and the RSM settings are fixed at construction; each
    :meth:`write` adds one evaluation.

    Retention: an evaluation is kept if its number (from 0, in writing order) is a multiple of
    ``keep_every``, or it is one of the last ``keep_last``; the newest is always kept.
    ``keep_every=1`` (the default) keeps every evaluation; ``keep_every=None`` only the last
    ``keep_last``. A resumed run continues the numbering from the files it finds.

    Args:
        folder: the archive folder, e.g. ``Path(log_dir) / "rsms"``; created if missing.
        fingerprint: :func:`probe_fingerprint` of the probe.
        labels: the probe's labels ``(N,)`` or ``(N, L)``, or None.
        ids: sample ids (N str or int), or None.
        settings: the RSM options to record (kernel, matcher, max_positions, ...).
        keep_every: keep every k-th evaluation (a positive int), or None.
        keep_last: keep the last m evaluations (a positive int).

    Raises:
        ValueError: If ``keep_every``/``keep_last`` is not a positive int, or ``folder`` holds
            files that are not archive files of this format.
        TypeError: If ``settings`` or ``ids`` have the wrong types.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp()) / "rsms"
        >>> writer = ArchiveWriter(folder, fingerprint="ab12", labels=torch.tensor([0, 1, 1]))
        >>> writer.write(step=10, epoch=0, rsms={"fc": {"semantic": torch.eye(3)}}).name
        'step=0000000010.pt'
        >>> load_rsms(folder)[0].rsms["fc"]["semantic"]
        tensor([[1., 0., 0.],
                [0., 1., 0.],
                [0., 0., 1.]])
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        fingerprint: str,
        labels: Tensor | None = None,
        ids: Ids | None = None,
        settings: Mapping[str, Setting] | None = None,
        keep_every: int | None = 1,
        keep_last: int = 1,
    ) -> None:
        for name, value in {"keep_every": keep_every, "keep_last": keep_last}.items():
            positive = isinstance(value, int) and not isinstance(value, bool) and value > 0
            if not (positive or (name == "keep_every" and value is None)):
                allowed = "a positive int or None" if name == "keep_every" else "a positive int"
                raise ValueError(f"Expected `{name}` to be {allowed}, but got {value!r}.")
        if not (isinstance(fingerprint, str) and fingerprint):
            raise TypeError(
                f"Expected `fingerprint` to be a non-empty str, but got {fingerprint!r}."
            )
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.labels = None if labels is None else labels.detach().cpu()
        self._ids = ids
        self.settings = _check_settings(settings or {})
        self.keep_every = keep_every
        self.keep_last = keep_last
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(f"{_TMP_PREFIX}*"):  # left by a crash mid-write
            stale.unlink(missing_ok=True)
        # Each kept evaluation's number, read from the files a previous run left.
        self._numbers = {
            step: int(_read(path)["evaluation"])
            for step, path in _archive_files(self.folder).items()
        }

    def write(
        self,
        *,
        step: int,
        epoch: int,
        rsms: Mapping[str, Mapping[str, Tensor]],
        logits: Tensor | None = None,
    ) -> Path:
        """Write one evaluation (replacing one of the same step), then apply the retention.

        Args:
            step: the global step the evaluation belongs to.
            epoch: its epoch.
            rsms: ``{layer: {kind: (N, N) symmetric RSM}}``, layers in the monitor's order.
            logits: the model's logits on the probe ``(N, K)``, or None.

        Returns:
            the path of the file written.

        Raises:
            ValueError: If an RSM is not a finite symmetric ``(N, N)`` float matrix, N differs
                from the labels' or ids', or ``step``/``epoch`` is negative.
        """
        for name, value in {"step": step, "epoch": epoch}.items():
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f"Expected `{name}` to be an int >= 0, but got {value!r}.")
        n, triangles = self._triangles(rsms)
        ids = _check_ids(self._ids, n)
        if self.labels is not None and self.labels.shape[0] != n:
            raise ValueError(
                f"Expected RSMs of the {self.labels.shape[0]} labelled probe samples, "
                f"but got N = {n}."
            )
        if logits is not None and not (logits.ndim == 2 and logits.shape[0] == n):
            raise ValueError(f"Expected `logits` of shape ({n}, K), but got {tuple(logits.shape)}.")
        for later in [s for s in self._numbers if s > step]:  # a resumed run's abandoned future
            (self.folder / _file_name(later)).unlink(missing_ok=True)
            del self._numbers[later]
        self._numbers.pop(step, None)
        earlier = [s for s in self._numbers if s < step]
        number = self._numbers[max(earlier)] + 1 if earlier else 0
        content = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "epoch": epoch,
            "evaluation": number,
            "n": n,
            "layers": list(rsms),
            "rsms": triangles,
            "labels": self.labels,
            "logits": None if logits is None else logits.detach().float().cpu(),
            "ids": ids,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
        }
        path = self.folder / _file_name(step)
        tmp = self.folder / f"{_TMP_PREFIX}{os.getpid()}-{path.name}"
        torch.save(content, tmp)
        os.replace(tmp, path)
        self._numbers[step] = number
        self._prune(number)
        return path

    def _triangles(self, rsms: Mapping[str, Mapping[str, Tensor]]) -> tuple[int, dict]:
        """Check the RSMs and take their upper triangles (float32, CPU)."""
        if not rsms or not all(kinds for kinds in rsms.values()):
            raise ValueError("Expected `rsms` to map each layer to at least one kind's RSM.")
        n = next(iter(next(iter(rsms.values())).values())).shape[0]
        rows, cols = torch.triu_indices(n, n)
        triangles: dict[str, dict[str, Tensor]] = {}
        for layer, kinds in rsms.items():
            triangles[layer] = {}
            for kind, rsm in kinds.items():
                where = f"`rsms[{layer!r}][{kind!r}]`"
                if not (isinstance(rsm, Tensor) and rsm.is_floating_point()):
                    raise ValueError(f"Expected {where} to be a float tensor, but got {rsm!r}.")
                if rsm.shape != (n, n):
                    raise ValueError(
                        f"Expected {where} to have shape ({n}, {n}) like the first RSM, "
                        f"but got {tuple(rsm.shape)}."
                    )
                rsm = rsm.detach().float().cpu()
                upper, lower = rsm[rows, cols], rsm[cols, rows]
                if not bool(torch.isfinite(upper).all() and torch.isfinite(lower).all()):
                    raise ValueError(f"Expected {where} to be finite, but it has NaN or Inf.")
                tolerance = 1e-5 * max(float(upper.abs().max()), 1e-30)
                if float((upper - lower).abs().max()) > tolerance:
                    raise ValueError(f"Expected {where} to be symmetric, but it is not.")
                triangles[layer][kind] = upper
        return n, triangles

    def _prune(self, newest: int) -> None:
        """Delete the evaluations that the retention no longer keeps."""
        for step, number in list(self._numbers.items()):
            kept_as_every = self.keep_every is not None and number % self.keep_every == 0
            if kept_as_every or number > newest - self.keep_last:
                continue
            (self.folder / _file_name(step)).unlink(missing_ok=True)
            del self._numbers[step]


@dataclass(frozen=True)
class ArchivedEvaluation:
    """One evaluation read back from an archive.

    Attributes:
        step: global step of the evaluation.
        epoch: its epoch.
        evaluation: its number among the run's evaluations, from 0.
        rsms: ``{layer: {kind: symmetric float32 (N, N) RSM}}``, layers in the monitor's order.
        labels: the probe's labels ``(N,)`` / ``(N, L)``, or None.
        logits: the model's logits on the probe ``(N, K)``, or None.
        ids: sample ids (a list of str or an int64 ``(N,)`` tensor), or None.
        fingerprint: :func:`probe_fingerprint` of the probe.
        settings: the RSM options the run used.
        path: the file it was read from.
    """

    step: int
    epoch: int
    evaluation: int
    rsms: dict[str, dict[str, Tensor]]
    labels: Tensor | None
    logits: Tensor | None
    ids: list[str] | Tensor | None
    fingerprint: str
    settings: dict[str, Setting] = field(default_factory=dict)
    path: Path | None = None

    @property
    def layers(self) -> list[str]:
        """The layer names, in the monitor's order."""
        return list(self.rsms)

    @property
    def n(self) -> int:
        """The probe size N."""
        return next(iter(next(iter(self.rsms.values())).values())).shape[0]


def archive_folder(folder: str | os.PathLike) -> Path:
    """The archive folder of a run's log dir, or ``folder`` itself if it is the archive.

    Raises:
        ValueError: If ``folder`` does not exist, or neither it nor its ``rsms`` folder holds
            archive files.

    Example:
        >>> archive_folder("no/such/run")
        Traceback (most recent call last):
        ...
        ValueError: Expected a run's log dir or its rsms folder, but got 'no/such/run' (not found).
    """
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(
            f"Expected a run's log dir or its {FOLDER} folder, but got {str(folder)!r} (not found)."
        )
    for candidate in (path / FOLDER, path):
        if candidate.is_dir() and _archive_files(candidate):
            return candidate
    raise ValueError(
        f"Expected {str(folder)!r} to be a run's log dir with an RSM archive ({FOLDER}/step=*.pt "
        "files, written by RSMMonitor(save_rsms=True)) or that folder itself, but it holds none."
    )


def archive_steps(folder: str | os.PathLike) -> list[int]:
    """The steps of an archive's evaluations, in order (no file is loaded).

    Args:
        folder: a run's log dir or its ``rsms`` folder.

    Raises:
        ValueError: As :func:`archive_folder`.
    """
    return list(_archive_files(archive_folder(folder)))


def load_evaluation(folder: str | os.PathLike, step: int) -> ArchivedEvaluation:
    """The evaluation of one step of an archive, with full ``(N, N)`` RSMs.

    Args:
        folder: a run's log dir or its ``rsms`` folder.
        step: one of :func:`archive_steps`.

    Raises:
        ValueError: As :func:`archive_folder`, if no evaluation has that step, or the file is
            not an archive file.
    """
    files = _archive_files(archive_folder(folder))
    if step not in files:
        raise ValueError(
            f"Expected `step` to be one of the archived steps {list(files)}, but got {step!r}."
        )
    path = files[step]
    content = _read(path)
    n = int(content["n"])
    rows, cols = torch.triu_indices(n, n)
    rsms = {}
    for layer in content["layers"]:
        rsms[layer] = {}
        for kind, triangle in content["rsms"][layer].items():
            rsm = torch.empty(n, n, dtype=torch.float32)
            rsm[rows, cols] = triangle
            rsm[cols, rows] = triangle
            rsms[layer][kind] = rsm
    logits, labels = content["logits"], content["labels"]
    ids = content["ids"]
    return ArchivedEvaluation(
        step=int(content["step"]),
        epoch=int(content["epoch"]),
        evaluation=int(content["evaluation"]),
        rsms=rsms,
        labels=None if labels is None else labels.clone(),
        logits=None if logits is None else logits.clone(),
        ids=ids.clone() if isinstance(ids, Tensor) else ids,
        fingerprint=str(content["fingerprint"]),
        settings=dict(content["settings"]),
        path=path,
    )


def load_rsms(folder: str | os.PathLike) -> list[ArchivedEvaluation]:
    """Every evaluation of an archive, in step order, with full ``(N, N)`` RSMs.

    Memory: ``4 N^2`` bytes per RSM of every evaluation; for long archives of large probes,
    read one step at a time with :func:`archive_steps` and :func:`load_evaluation`.

    Args:
        folder: a run's log dir (holding ``rsms/``) or the ``rsms`` folder itself.

    Returns:
        a list of :class:`ArchivedEvaluation`, by increasing step.

    Raises:
        ValueError: If the folder is missing, holds no archive, or a file is not an archive
            file of this version.

    Example:
        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp())
        >>> writer = ArchiveWriter(run / "rsms", fingerprint="ab12")
        >>> rsm = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
        >>> for step in (10, 20):
        ...     _ = writer.write(step=step, epoch=step // 10, rsms={"fc": {"semantic": rsm}})
        >>> [(e.step, e.epoch, e.layers) for e in load_rsms(run)]
        [(10, 1, ['fc']), (20, 2, ['fc'])]
    """
    folder = archive_folder(folder)
    return [load_evaluation(folder, step) for step in _archive_files(folder)]
