"""Loading experiment configs: YAML read with a safe loader that refuses repeated keys, ``base:``
inheritance, ``--set`` overrides, then the schema and the model/loss registries' checks.

``--set key=value`` overrides any key (the value is parsed as YAML, so ``[32,32,32]`` and
``1.0e-3`` work). Switching ``loss.name`` alone works: parameters that the new loss does not take
are dropped (with a note), the rest come from SPEC defaults, and data-given ones
(``num_classes``) are filled from the manifest at run time.

Relative paths in a YAML file are relative to that file's folder; in ``--set`` to the working
directory. A file may start from another with ``base: other.yaml`` and change only what differs
(sections merge key by key; a ``model`` or ``loss`` section naming another model/loss replaces
the base's section). Every error names the file (and, for ``base:``, the file that refers to it)
and the dotted key.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from segcalib.config.schema import ExperimentConfig
from segcalib.errors import ConfigError
from segcalib.utils.names import unknown_name_message
from segcalib.losses import check_loss_params, loss_parameters
from segcalib.models import check_model_params, size_divisor

log = logging.getLogger("segcalib")


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key repeated in one mapping (YAML keeps only the last)."""


def _mapping_without_repeats(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"key {key!r} appears twice (lines {seen[key]} and {line}); YAML would keep only the last")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader (no Python objects, no code)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file does not exist")
    if not path.is_file():
        raise ConfigError(f"{path}: is not a file (give the path of a YAML config)")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from exc
    if raw is None:
        raise ConfigError(f"{path}: config file is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping of keys, got {type(raw).__name__}")
    return raw


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["train.epochs=3", "loss.name=mbls"]`` -> ``{"train.epochs": 3, "loss.name": "mbls"}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. train.epochs=10")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested mapping (a new copy; intermediate mappings are created)."""
    result = json.loads(json.dumps(raw, default=str))
    for key, value in overrides.items():
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] | dict[str, Any] = (),
    raw: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Load, override and validate an experiment config; errors name the file and dotted key."""
    source = Path(path) if path is not None else None
    if raw is None:
        if source is None:
            raise ConfigError("no config given")
        raw = read_yaml(source)
    label = str(source) if source is not None else "config"
    raw = _with_base(raw, source.parent if source is not None else Path.cwd(), seen=(source,))
    items = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    items = {k: (_absolute(v) if k == "data.manifest" and isinstance(v, str) else v) for k, v in items.items()}
    merged = apply_overrides(raw, items)
    if "loss.name" in items:
        merged = _drop_foreign_loss_params(merged)
    try:
        cfg = ExperimentConfig.model_validate(merged)
        _check_registered_params(cfg)
    except ValidationError as exc:
        raise ConfigError(f"{label}: " + _format_validation_error(exc)) from None
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    return cfg


def _check_registered_params(cfg: ExperimentConfig) -> None:
    """The model and loss registries check their own parameters (the one place they are checked)."""
    check_model_params(cfg.model.name, cfg.data.spatial_dims, cfg.model.params)
    divisor = size_divisor(cfg.model.name, cfg.model.params)
    for key, size in (("data.patch_size", cfg.data.patch_size), ("inference.roi_size", cfg.inference.roi_size or [])):
        if any(s % divisor for s in size):
            raise ConfigError(f"{key}: {size} must be a multiple of {divisor} for model {cfg.model.name!r}")
    check_loss_params(cfg.loss.name, cfg.loss.params, allow_missing=True)


def _with_base(raw: dict[str, Any], folder: Path, seen: tuple[Path | None, ...]) -> dict[str, Any]:
    """Resolve relative paths of ``raw`` (a file in ``folder``) and merge it onto its ``base``."""
    raw = _resolve_paths(dict(raw), folder)
    base_name = raw.pop("base", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str):
        raise ConfigError(f"{seen[-1] if seen and seen[-1] is not None else 'config'}: base: must be a path to another YAML config, got {base_name!r}")
    base_path = (folder / base_name).resolve()
    referrer = seen[-1] if seen and seen[-1] is not None else "config"
    if base_path in seen:
        raise ConfigError(f"{referrer}: base: {base_path} includes itself")
    try:
        base_raw = read_yaml(base_path)
    except ConfigError as exc:
        raise ConfigError(f"{referrer}: base: {exc}") from None
    base = _with_base(base_raw, base_path.parent, seen + (base_path,))
    return _merge(base, raw)


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in child.items():
        old = out.get(key)
        replaces_named = key in ("model", "loss") and isinstance(old, dict) and isinstance(value, dict) and (
            value.get("name", old.get("name")) != old.get("name")
        )
        if isinstance(old, dict) and isinstance(value, dict) and not replaces_named:
            out[key] = _merge(old, value)
        else:
            out[key] = value
    return out


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("manifest"), str):
        manifest = Path(data["manifest"]).expanduser()
        if not manifest.is_absolute():
            manifest = (base / manifest).resolve()
        raw = {**raw, "data": {**data, "manifest": str(manifest)}}
    return raw


def _absolute(value: str) -> str:
    return str(Path(value).expanduser().resolve())


def _drop_foreign_loss_params(merged: dict[str, Any]) -> dict[str, Any]:
    loss = merged.get("loss")
    if not isinstance(loss, dict) or not isinstance(loss.get("name"), str):
        return merged
    try:
        allowed = loss_parameters(loss["name"])
    except ConfigError:
        return merged
    kept = {k: v for k, v in loss.items() if k == "name" or k in allowed}
    dropped = sorted(set(loss) - set(kept))
    if dropped:
        log.info(
            "loss.name=%s: dropping parameters of the previous loss: %s", loss["name"], ", ".join(dropped)
        )
    return {**merged, "loss": kept}


def _keys_beside(loc: Sequence[Any]) -> list[str]:
    """The valid keys of the section that holds ``loc`` (empty when it is not a config section)."""
    section: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        field = section.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        section = annotation
    return list(section.model_fields)


def _format_validation_error(exc: ValidationError) -> str:
    messages = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            valid = _keys_beside(error["loc"])
            messages.append(f"{key}: " + unknown_name_message("key", error["loc"][-1], valid) if valid
                            else f"{key}: unknown key")
        elif error["type"] == "missing":
            messages.append(f"{key}: required key is missing")
        else:
            msg = error["msg"].removeprefix("Value error, ")
            if key and not msg.startswith(key.split(".")[0]):
                msg = f"{key}: {msg}"
            given = error.get("input")
            if error["type"] not in ("value_error", "assertion_error") and not isinstance(given, dict):
                msg += f" (got {given!r})"
            messages.append(msg)
    return "; ".join(messages)
