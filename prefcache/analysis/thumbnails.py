"""Thumbnails of a vision run's images for the report: small JPEGs inlined as ``data:`` URIs, so that report.html
stays one self-contained file (a few KB an image, for the handful of examples the report shows)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

SIZE = 96  # pixels on the longer side


def thumbnail(path: str | None, sha256: str | None = None, size: int = SIZE) -> str:
    """An ``<img>`` of the image file at ``path`` scaled to ``size`` pixels at most, or a short note where there is
    no file to read (images given as bytes in the data), or it is gone or no longer the image of the run (its
    ``sha256`` differs)."""
    if not path:
        return '<span class="empty">(image bytes in the data)</span>'
    from PIL import Image

    try:
        data = Path(path).read_bytes()
        if sha256 is not None:
            import hashlib

            if hashlib.sha256(data).hexdigest() != sha256:
                return f'<span class="empty">({html.escape(Path(path).name)} has changed)</span>'
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=75)
    except (OSError, ValueError):  # gone, unreadable, not an image
        return f'<span class="empty">({html.escape(Path(path).name)} unreadable)</span>'
    uri = base64.b64encode(out.getvalue()).decode("ascii")
    return (f'<img src="data:image/jpeg;base64,{uri}" width="{image.width}" height="{image.height}" '
            f'alt="{html.escape(Path(path).name)}" title="{html.escape(str(path))}">')
