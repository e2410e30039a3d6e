"""What a cache's Parquet metadata records about the pass that made it (model, tokenizer, settings, versions)."""

from __future__ import annotations

from datetime import datetime, timezone

from prefcache import __version__
from prefcache.cache.store import SCHEMA_VERSION
from prefcache.core.hub import resolve_adapter
from prefcache.data.columns import RowMapping
from prefcache.model.load import (
    chat_template_hash,
    file_fingerprint,
    model_fingerprint,
    tokenizer_fingerprint,
)
from prefcache.reference.config import PrecomputeConfig


def cache_metadata(config: PrecomputeConfig, source, tokenizer, quantize: str, dtype: str, world_size: int) -> dict:
    """The metadata every kind of cache records; a kind adds its own keys (``kind``, ``kl_group_size``)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "prefcache_version": __version__,
        "model_name": source.name,
        "model_path": str(source.path / source.gguf_file) if source.gguf_file else str(source.path),
        "model_fingerprint": model_fingerprint(source),
        "model_id": source.hub_id,  # a Hub id and the commit it resolved to; None for a local model
        "model_revision": source.revision,
        "adapter": config.adapter,
        "adapter_fingerprint": model_fingerprint_of_adapter(config.adapter),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "chat_template_hash": chat_template_hash(tokenizer),
        "max_length": config.max_length,
        "truncation": config.truncation,
        "quantization": quantize,
        "dtype": dtype,
        "per_token": config.per_token,
        "prefix_sharing": config.prefix_sharing,  # packed rows: each prompt computed once (prefcache.model.packing)
        "data_mapping": RowMapping.of(config).record(),  # columns and templates; None = the data's own
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "world_size": world_size,
        # Informational (not compared on extend): 4-bit values depend on the bitsandbytes build and kernel.
        "library_versions": library_versions(),
    }


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def model_fingerprint_of_adapter(adapter: str | None) -> str | None:
    if not adapter:
        return None
    files = sorted(p for p in resolve_adapter(adapter).iterdir() if p.suffix in (".safetensors", ".bin"))
    return file_fingerprint(files)
