"""Prompt sets from files: plain text, JSON, JSONL, CSV, a Hugging Face dataset, or a named set.

Named sets: `spo:4k` (the paper's 4k training prompts), and those of plug-ins (`spo.plugins`): the
embedded world's `world:train`, `world:validation`, `world:test` (`test` holds compositions never
used in training).
"""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path

from spo import plugins
from spo.errors import SPOError


def _from_json_items(items, source) -> list[str]:
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict) and isinstance(item.get("caption"), str):
            out.append(item["caption"])
        else:
            raise SPOError(f"{source}: entry {i} is neither a string nor an object with a 'caption' string")
    return out


def load_prompts(source: str | Path, column: str = "caption") -> list[str]:
    """A list of prompts; raises SPOError with the reason when the source is missing, empty or malformed."""
    name = str(source)
    if name == "spo:4k":
        path = Path(str(resources.files("spo") / "data" / "spo_4k_training_prompts.json"))
        return _from_json_items(json.loads(path.read_text()), name)
    named = plugins.named_prompts(name)
    if named is not None:
        return named
    path = Path(name)
    if not path.exists():
        if "/" in name and not name.startswith((".", "/")) and path.suffix == "":
            return _from_hub(name, column)
        raise SPOError(f"prompt file {path} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SPOError(f"cannot read prompt file {path}: {exc}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, list):
                raise SPOError(f"{path}: expected a JSON list of strings or of objects with a 'caption' key")
            prompts = _from_json_items(data, path)
        elif suffix == ".jsonl":
            prompts = _from_json_items([json.loads(line) for line in text.splitlines() if line.strip()], path)
        elif suffix == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
            if rows and column not in rows[0]:
                raise SPOError(f"{path}: no {column!r} column (columns: {', '.join(rows[0])})")
            prompts = [r[column] for r in rows]
        else:
            prompts = [line.strip() for line in text.splitlines()]
    except json.JSONDecodeError as exc:
        raise SPOError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise SPOError(f"prompt file {path} holds no prompts")
    return prompts


def _from_hub(name: str, column: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as exc:
        raise SPOError(f"could not load prompts from dataset {name!r}: {str(exc).splitlines()[0][:200]}") from None
    if column not in ds.column_names:
        raise SPOError(f"dataset {name!r} has no {column!r} column")
    return [p for p in ds[column] if p]
