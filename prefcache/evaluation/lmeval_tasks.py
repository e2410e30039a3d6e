"""lm-eval tasks for ``prefcache eval``: find them by name (local YAML folders first) and make the relative
data paths in local task YAMLs relative to the YAML, not to the working directory."""

from __future__ import annotations

import glob
import os
from collections import namedtuple
from pathlib import Path

import yaml


class TaskError(ValueError):
    """An unknown task, or one whose data cannot be read; the message says what to do."""


def task_manager(names: tuple[str, ...], include: list[str]):
    """(a TaskManager that knows every name (globs allowed), the task names to run, {name: lm-eval Task} of
    every task they run, groups expanded). Local folders are indexed first, alone: lm-eval's own index (~15k
    YAMLs) takes seconds and is built only when needed."""
    from lm_eval.tasks import TaskManager

    unknown = lambda m: [n for n in names if n not in m.all_tasks and not m.match_tasks([n])]  # noqa: E731
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or unknown(manager):
        manager = TaskManager(include_path=include or None)
    if missing := unknown(manager):
        import difflib

        close = sorted({m for u in missing for m in difflib.get_close_matches(u, manager.all_tasks, n=3)})
        raise TaskError(
            f"unknown lm-eval task{'s' if len(missing) > 1 else ''}: {', '.join(missing)}"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + ". `lm-eval ls tasks` lists lm-eval's own tasks; for a task of your own, give the folder of its "
            "YAML with --include-path (e.g. examples/lm_eval_task, made by examples/make_lm_eval_task.py)")
    tasks = [t for n in names for t in ([n] if n in manager.all_tasks else manager.match_tasks([n]))]
    try:
        leaves = manager.load(tasks)["tasks"]  # reads each task's data now, before any model is loaded
    except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise many kinds; all mean "no data"
        raise TaskError(f"could not load the data of {', '.join(tasks)}: {type(e).__name__}: {e}. lm-eval's own "
                        "tasks download their data from the Hugging Face hub; offline, use a local task "
                        "(--include-path)") from e
    return manager, tasks, leaves


def localise_include_paths(paths, work: Path) -> list[str]:
    """Task folders with each relative ``data_files`` (and ``data_dir``) made absolute, relative to the
    YAML that names it when the file is there. lm-eval would resolve them against the working directory.

    A folder needing no change is used as it is; otherwise it is mirrored under ``work``: rewritten YAMLs,
    and symlinks to everything else (so ``include:`` and ``!function`` references still resolve)."""
    out = []
    for i, p in enumerate(paths):
        root = Path(p).expanduser().resolve()
        if not root.is_dir():
            raise TaskError(f"--include-path {p}: not a folder")
        rewritten = {}
        for y in sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")]):
            try:
                cfg = yaml.load(y.read_text(), Loader=_TagKeepingLoader)  # a SafeLoader subclass
            except yaml.YAMLError:
                continue  # lm-eval will report it, or skip it as it does
            if _absolutise(cfg, y.parent):
                rewritten[y] = cfg
        if not rewritten:
            out.append(str(root))
            continue
        mirror = work / f"include-{i}"
        for folder, _, files in os.walk(root):
            target = mirror / Path(folder).relative_to(root)
            target.mkdir(parents=True, exist_ok=True)
            for f in files:
                src = Path(folder) / f
                if src in rewritten:
                    (target / f).write_text(yaml.dump(rewritten[src], Dumper=_TagKeepingDumper, sort_keys=False))
                else:
                    (target / f).symlink_to(src)
        out.append(str(mirror))
    return out


# A YAML loader and dumper that keep custom tags (lm-eval's ``!function``) verbatim through a rewrite.
_Tagged = namedtuple("_Tagged", "tag value")


class _TagKeepingLoader(yaml.SafeLoader):
    pass


class _TagKeepingDumper(yaml.SafeDumper):
    pass


_TagKeepingLoader.add_multi_constructor("!", lambda loader, _, node: _Tagged(node.tag, loader.construct_scalar(node)))
_TagKeepingDumper.add_representer(_Tagged, lambda dumper, t: dumper.represent_scalar(t.tag, t.value))


def _absolutise(cfg, base: Path) -> bool:
    """Rewrite, in place, the relative ``dataset_kwargs`` data paths of a task config that exist next to
    its YAML (``base``); a URL, an absolute path or a path not found there keeps lm-eval's meaning."""
    def fix(value):
        if isinstance(value, (list, dict)):
            return [fix(v) for v in value] if isinstance(value, list) else {k: fix(v) for k, v in value.items()}
        if not isinstance(value, str) or "://" in value or Path(value).is_absolute() or not glob.glob(str(base / value)):
            return value
        return os.path.normpath(base / value)

    kwargs = cfg.get("dataset_kwargs") if isinstance(cfg, dict) else None
    if not isinstance(kwargs, dict):
        return False
    before = dict(kwargs)
    kwargs.update({k: fix(kwargs[k]) for k in ("data_files", "data_dir") if k in kwargs})
    return kwargs != before
