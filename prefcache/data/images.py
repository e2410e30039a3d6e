"""The images of vision preference rows, as content-addressed references.

An ``images`` value is a list (TRL's vision format), each item one of:

- a file path, absolute or relative to the data file's folder (a ``datasets`` folder: that folder);
- raw encoded bytes (a Parquet ``binary`` column);
- a ``{"bytes", "path"}`` dict, as a ``datasets.Image`` feature stores an image when it is not decoded (the bytes
  win when both are there: ``save_to_disk`` keeps only the file's base name beside them);
- a PIL image.

Each becomes an :class:`ImageRef`: the sha256 of the encoded file bytes (so one picture has one hash whether a
JSONL file names its path, a Parquet file holds its bytes or a ``datasets`` folder its ``Image`` feature), where
it came from, and :meth:`ImageRef.open` to get the picture back (RGB) for a training batch. A PIL image with no file
behind it is hashed by its mode, size and raw pixels instead, and kept as PNG bytes (lossless).

A reference with a path holds no bytes: the file is read again when the image is opened. One without (bytes, a
PIL image) holds its encoded bytes, so a block of rows holds its own images' bytes until it is dropped.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path


class ImageError(ValueError):
    """An image that cannot be used: a missing file, unreadable bytes, a value of another type."""


@dataclass(frozen=True)
class ImageRef:
    """One image of a row. ``sha256``: hex digest of its encoded bytes (a PIL image without a file: of
    ``mode``, ``size`` and raw pixels); ``path``: the absolute file it is read from, else None, and then
    ``data`` holds its encoded bytes."""

    sha256: str
    path: str | None = None
    data: bytes | None = field(default=None, repr=False)

    def open(self):
        """The image as a PIL RGB image, decoded now (raises :class:`ImageError` naming what is wrong)."""
        from PIL import Image

        where = self.path or f"{len(self.data or b'')} bytes"
        data = self.data or b""
        if self.path is not None:
            data = _read(Path(self.path))
            if _digest(data) != self.sha256:  # the hash is in the pair's id and the cache: a new picture is not it
                raise ImageError(f"image file {self.path!r} has changed since it was read (sha256 {_digest(data)[:12]}, "
                                 f"was {self.sha256[:12]})")
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")  # convert() loads the pixels, so a truncated file fails here
        except Exception as e:  # PIL raises several types for a damaged or unknown file
            raise ImageError(f"{where} cannot be read as an image ({type(e).__name__}: {e})") from None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _from_file(path: str, base: Path | None) -> ImageRef:
    file = Path(os.path.expanduser(path))
    if not file.is_absolute():
        if base is None:
            raise ImageError(f"relative image path {path!r}, and the data has no folder to resolve it against")
        file = base / file
    data = _read(file)
    return ImageRef(_digest(data), str(file.resolve()))


def _read(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"no such image file {str(file)!r}") from None
    except OSError as e:
        raise ImageError(f"image file {str(file)!r} cannot be read ({e.strerror or e})") from None


def _from_pil(image) -> ImageRef:
    filename = getattr(image, "filename", None)
    if filename and Path(filename).is_file():  # opened from a file: the file's bytes, as a path would give
        return _from_file(filename, None)
    header = f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode()
    png = io.BytesIO()
    image.save(png, format="PNG")
    return ImageRef(_digest(header + image.tobytes()), None, png.getvalue())


def image_ref(value, base: Path | None = None) -> ImageRef:
    """One item of an ``images`` list as an :class:`ImageRef` (see the module's docstring for what it may be).
    Reads a file's bytes (for its hash) but does not decode them: :meth:`ImageRef.open` does."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            value = data
        elif path is not None:
            value = path
        else:
            raise ImageError("an image object with neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if not data:
            raise ImageError("empty image bytes")
        return ImageRef(_digest(data), None, data)
    if isinstance(value, str):
        if not value:
            raise ImageError("an empty image path")
        return _from_file(value, base)
    if isinstance(value, os.PathLike):
        return _from_file(os.fspath(value), base)
    if type(value).__module__.startswith("PIL."):
        return _from_pil(value)
    raise ImageError(f"an image must be a file path, bytes, a {{bytes, path}} object or a PIL image, "
                     f"got {type(value).__name__}")


def image_refs(value, base: Path | None = None) -> tuple[ImageRef, ...]:
    """A row's ``images`` value as references, in order (None: no images). Raises :class:`ImageError` saying
    which image is wrong."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
        raise ImageError(f"'images' must be a list of images, got a {type(value).__name__}")
    refs = []
    for i, item in enumerate(value):
        try:
            refs.append(image_ref(item, base))
        except ImageError as e:
            raise ImageError(f"image {i}: {e}") from None
    return tuple(refs)


def open_images(refs) -> list:
    """The PIL RGB images of ``refs``, in order (a training batch's pictures)."""
    images = []
    for i, ref in enumerate(refs):
        try:
            images.append(ref.open())
        except ImageError as e:
            raise ImageError(f"image {i}: {e}") from None
    return images


def data_folder(path: str | os.PathLike) -> Path | None:
    """The folder relative image paths of ``path``'s rows are resolved against: a data file's folder, a
    ``datasets`` folder itself; None for a Hub id."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.resolve().parent
    return p.resolve() if p.is_dir() else None
