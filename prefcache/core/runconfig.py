"""A run's options as YAML: written next to what a run makes (``RUN/config.yaml``, ``CACHE/config.yaml``)
and read back by ``--config`` on any command, so ``prefcache train --config RUN/config.yaml`` runs it again.

Keys are the option names (``max_length`` or ``max-length``); values as YAML types. Templates are stored as
the command line meant them (real newlines; a literal backslash stays one): a config file's strings are never
unescaped again, so a replay gives byte-identical templates (write a newline in YAML as ``"\\n"`` in double
quotes). One-off actions (``resume``) are not saved. Only PyYAML's safe loader and dumper are used.
"""

from __future__ import annotations

import os
from dataclasses import is_dataclass
from pathlib import Path

from prefcache.core.atomic import write_text_atomic
from prefcache.core.options import replayed


class ConfigFileError(ValueError):
    """A config file that cannot be read or names options the command does not have."""


def to_yaml(config) -> str:
    """The options as YAML, one-off actions (``resume``) left out: what replays the run. Strings are written
    as they are (a template's real newlines and literal backslashes), and YAML reads them back byte for byte."""
    import yaml

    data = replayed(config) if is_dataclass(config) else dict(config)
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)


def write_config(config, path: str | os.PathLike) -> Path:
    """Write ``config`` (an options dataclass) as YAML, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# prefcache options; rerun with: prefcache COMMAND --config {path.name}\n"
    write_text_atomic(path, header + to_yaml(config), prefix=".tmp-config-")
    return path


def read_config(path: str | os.PathLike) -> dict:
    """A YAML mapping of option names (``-`` or ``_``) to values; one-line errors."""
    import yaml

    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigFileError(f"config file {path}: cannot read it ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigFileError(f"config file {path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path}: expected a mapping of option names to values, "
                              f"got a {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
