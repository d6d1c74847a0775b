"""Recipes: the options of ``gcomp optimize`` in a file a team reviews and commits.

``gcomp optimize MODEL -o OUT --config recipe.toml`` reads a TOML (or, by its ``.json``
suffix, JSON) file whose keys are the long option names of ``gcomp optimize`` (``-O`` is
``level``; ``--plugin`` is the list ``plugins``; ``--set`` is the table ``[set]``;
``--input-shape`` the table ``[input-shapes]``). What is guaranteed:

- Every option of ``gcomp optimize`` has its key, except the model, ``-o`` and how the
  command runs (``-q``, ``-v``, ``--json``, ``--dry-run``, ``--config``, ``--save-config``).
- A flag given on the command line overrides the file (click's ParameterSource tells which
  were given); ``--set`` and ``--input-shape`` override the file's entry of the same name
  and keep the others; ``--plugin`` adds to the file's plugins.
- Relative paths in a recipe (``inputs``, ``calibration``, ``report``, ``plugins``) are
  relative to the recipe file's folder.
- A bad recipe (unreadable, an unknown key, a value of the wrong type or out of range) is
  one line naming the file and the key, exit 2, before any work.
- ``--save-config PATH`` writes the recipe the command line (plus any ``--config``) amounts
  to: the options given, not gcomp's defaults; loaded again it gives the same plan.

TOML is read with the standard library's ``tomllib`` (Python 3.11+) or the ``tomli``
package it came from (3.10). Neither writes TOML; the recipe is flat (strings, numbers,
booleans, lists of strings or ints, two tables of them), so :func:`_toml` writes it.
"""

from __future__ import annotations

__all__ = ["Recipe", "config_option", "recipe_keys", "recipe_of", "save_recipe"]

import contextlib
import difflib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from gcomp import __version__
from gcomp.errors import OptionError

SUFFIXES = (".toml", ".json")
# How the command runs, not how it optimizes: never in a recipe.
INVOCATION = {"output", "quiet", "verbose", "as_json", "config", "save_config", "dry_run"}
# Options whose key is not their long flag name.
_KEYS = {"level": "level", "plugins": "plugins", "sets": "set", "input_shapes": "input-shapes"}
# Options merged entry by entry with the command line rather than replaced.
MERGED = ("plugins", "sets", "input_shapes")
_PATHS = {"inputs", "calibration", "report", "plugins"}
_META = "gcomp.recipe"


@dataclass
class Recipe:
    """A read recipe: ``values`` by parameter name, as click would pass them (paths
    already relative to the current folder), and the entries merged with the command line."""

    path: Path
    values: dict[str, Any] = field(default_factory=dict)
    plugins: tuple[Path, ...] = ()
    sets: dict[str, Any] = field(default_factory=dict)  # pass option -> TOML value
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def fail(self, key: str, message: str) -> OptionError:
        return OptionError(f"{self.path}: {key}: {message}")

    def set_entries(self, ctx: click.Context, spec: str, given: tuple[str, ...]) -> tuple[str, ...]:
        """The recipe's ``[set]`` as ``--set`` strings, then ``given`` (later entries win),
        after checking its ``level``/``passes`` (where used) and every ``[set]`` entry
        against the passes of ``spec``, the pipeline with its precision and quantization
        passes (plugins loaded first)."""
        from gcomp.pipeline import registry  # the pipeline module loads the built-in passes

        for name, key in (("level", "level"), ("pass_spec", "passes")):
            if name in self.values and ctx.get_parameter_source(name) is ParameterSource.DEFAULT_MAP:
                try:
                    registry.resolve(self.values[name])
                except OptionError as e:
                    raise self.fail(key, str(e)) from None
        declared = registry.pipeline_options(spec)
        entries = []
        for key, value in self.sets.items():
            name = key.strip().replace("-", "_")
            if name not in declared:
                raise self.fail(f"set.{key}", "no pass in this pipeline has that option"
                                + _did_you_mean(name, declared, ", ".join(sorted(declared)) or "none"))
            text = _option_text(self, key, declared[name], value)
            try:
                declared[name].parse(text)
            except OptionError as e:
                raise self.fail(f"set.{key}", str(e)) from None
            entries.append(f"{name}={text}")
        return (*entries, *given)

    def shape_entries(self, given: tuple[str, ...]) -> tuple[str, ...]:
        """The recipe's ``[input-shapes]`` as ``--input-shape`` strings, then ``given``."""
        return (*(f"{k}={','.join(map(str, v))}" for k, v in self.input_shapes.items()), *given)

    def plugin_paths(self, given: tuple[Path, ...]) -> tuple[Path, ...]:
        """The recipe's plugins, then ``given`` ones not already listed."""
        seen = {p.resolve() for p in self.plugins}
        return (*self.plugins, *(p for p in given if p.resolve() not in seen))


def recipe_keys(command: click.Command) -> dict[str, click.Option]:
    """Every recipe key of ``command``, in its options' order, with its option."""
    keys = {}
    for param in command.params:
        if isinstance(param, click.Option) and param.name not in INVOCATION:
            long = [o for o in param.opts if o.startswith("--")]
            keys[_KEYS.get(param.name) or long[0][2:]] = param
    return keys


def config_option(f):
    """``--config PATH``: read a recipe before the other options, so its values become
    their defaults (``ctx.default_map``) and the command line overrides them."""
    return click.option(
        "--config", type=click.Path(path_type=Path), default=None, is_eager=True, callback=_read_config,
        help="Read options from a recipe (.toml, or .json): keys are the long option names (-O: level, "
             "--set: a [set] table, --input-shape: [input-shapes]); flags given here override it; its "
             "relative paths are relative to its folder.",
    )(f)


def recipe_of(ctx: click.Context) -> Recipe | None:
    """The recipe ``--config`` read for this command, if any."""
    return ctx.meta.get(_META)


def _read_config(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    if value is None:
        return None
    recipe = _load(value, ctx)
    ctx.default_map = {**(ctx.default_map or {}), **recipe.values}
    ctx.meta[_META] = recipe
    return value


def _load(path: Path, ctx: click.Context) -> Recipe:
    doc = _read(path)
    keys = recipe_keys(ctx.command)
    recipe = Recipe(path)
    folder = path.parent
    for key, value in doc.items():
        option = keys.get(key)
        if option is None:
            raise _unknown_key(path, key, keys)
        if option.name == "sets":
            recipe.sets = dict(_table(recipe, key, value))
        elif option.name == "input_shapes":
            recipe.input_shapes = {k: _shape(recipe, f"{key}.{k}", v) for k, v in _table(recipe, key, value).items()}
        elif option.name == "plugins":
            recipe.plugins = tuple(Path(_relative(folder, p)) for p in _strings(recipe, key, value))
        elif option.multiple:  # a repeatable flag (--provider-option): a list of its strings
            recipe.values[option.name] = _provider_checked(recipe, key, option, tuple(_strings(recipe, key, value)))
        else:
            recipe.values[option.name] = _value(recipe, key, option, value, ctx)
    return recipe


def _read(path: Path) -> dict[str, Any]:
    """The recipe file's top-level table; anything unreadable is one line."""
    if path.suffix.lower() not in SUFFIXES:
        raise OptionError(f"--config {path}: a recipe is a .toml or .json file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise OptionError(f"--config {path}: no such file") from None
    except OSError as e:
        raise OptionError(f"--config {path}: cannot read it: {e.strerror}") from None
    try:
        if path.suffix.lower() == ".json":
            doc = json.loads(data)
        else:
            doc = _tomllib().loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise OptionError(f"{path}: not valid {kind}: {e}") from None
    if not isinstance(doc, dict):
        raise OptionError(f"{path}: expected a table of options at the top level")
    return doc


def _tomllib():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the package tomllib came from
        import tomli as tomllib
    return tomllib


def _unknown_key(path: Path, key: str, keys: Mapping[str, click.Option]) -> OptionError:
    if key.replace("-", "_") in INVOCATION | {"model", "json", "o"}:
        return OptionError(f"{path}: {key}: not a recipe option: the model, -o and how the command runs "
                           "(-q, -v, --json, --dry-run) are given on the command line")
    return OptionError(f"{path}: unknown option '{key}'" + _did_you_mean(key, keys, ", ".join(keys)))


def _did_you_mean(key: str, known, listing: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (options: {listing})"


def _value(recipe: Recipe, key: str, option: click.Option, value: Any, ctx: click.Context) -> Any:
    """One scalar option's value, checked for its type and converted by the option's own
    click type (choices, ranges), paths made relative to the current folder."""
    if option.name == "level" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    elif option.name == "pass_spec" and isinstance(value, list):
        value = ",".join(_strings(recipe, key, value))
    want = _expected(option)
    if not _is_a(value, want):
        raise recipe.fail(key, f"expected {want}, got {_shown(value)}")
    try:
        converted = option.type.convert(value, option, ctx)
    except click.BadParameter as e:
        raise recipe.fail(key, e.message) from None
    if option.name == "target":
        from gcomp.backends import capabilities

        try:
            capabilities(converted)
        except OptionError as e:
            raise recipe.fail(key, str(e)) from None
    if option.name == "provider":
        _provider_checked(recipe, key, option, converted)
    if option.name in _PATHS and not _bare_report(option.name, converted):
        return type(converted)(_relative(recipe.path.parent, converted))
    return converted


def _provider_checked(recipe: Recipe, key: str, option: click.Option, value):
    """An execution provider (``provider``) or its options (``provider-option``), checked
    as the command line checks them, the error naming the recipe and key."""
    from gcomp.backends.ort_providers import parse_provider_options, resolve_provider

    try:
        resolve_provider(value) if option.name == "provider" else parse_provider_options(value)
    except OptionError as e:
        raise recipe.fail(key, str(e).removeprefix("--provider-option ").removeprefix("--provider ")) from None
    return value


def _expected(option: click.Option) -> str:
    kind = option.type
    if isinstance(kind, click.types.BoolParamType):
        return "true or false"
    if isinstance(kind, click.types.IntParamType):
        return "an integer"
    if isinstance(kind, click.types.FloatParamType):
        return "a number"
    return "a string"


def _is_a(value: Any, want: str) -> bool:
    if isinstance(value, bool):
        return want == "true or false"
    return {"an integer": isinstance(value, int), "a number": isinstance(value, (int, float)),
            "a string": isinstance(value, str) and value != ""}.get(want, False)


def _shown(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)
    return f"{kind} ({json.dumps(value, default=str)[:40]})"


def _table(recipe: Recipe, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise recipe.fail(key, f"expected a table ([{key}] with NAME = VALUE lines), got {_shown(value)}")
    return value


def _strings(recipe: Recipe, key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise recipe.fail(key, f"expected a list of strings, got {_shown(value)}")
    return value


def _shape(recipe: Recipe, key: str, value: Any) -> tuple[int, ...]:
    """``[1, 128]`` or ``"1,128"``: non-negative integer dims."""
    if isinstance(value, str):
        try:
            value = [int(d) for d in value.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            raise recipe.fail(key, f"dims must be integers, got '{value}'") from None
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise recipe.fail(key, f"expected a list of integer dims such as [1, 128], got {_shown(value)}")
    if any(d < 0 for d in value):
        raise recipe.fail(key, "dims must be non-negative")
    return tuple(value)


def _option_text(recipe: Recipe, key: str, option, value: Any) -> str:
    """A ``[set]`` value as the text ``--set`` would give, refusing a TOML type that
    does not match the pass option's (a boolean for an int, a string for a bool...)."""
    kind = option.type
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool)}.get(kind)
    if ok is None:  # strings, tuples: a string or a list of strings
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    if not ok:
        raise recipe.fail(f"set.{key}", f"expected {getattr(kind, '__name__', kind)}, got {_shown(value)}")
    if isinstance(value, bool):
        return "true" if value else "false"
    return ",".join(value) if isinstance(value, list) else str(value)


def _bare_report(name: str, value: Any) -> bool:
    from gcomp.jobs import report_format

    return name == "report" and report_format(value) is not None


def _relative(folder: Path, value: str | os.PathLike) -> str:
    """A recipe's path, relative to the recipe's folder, as the current folder sees it."""
    return os.path.normpath(os.path.join(folder, os.fspath(value)))


# --- saving ---------------------------------------------------------------------------------


def save_recipe(path: Path, ctx: click.Context, *, model: Path, output: Path, sets: Mapping[str, Any],
                input_shapes: Mapping[str, tuple[int, ...]], plugins: tuple[Path, ...]) -> None:
    """Write the options given (on the command line or by ``--config``) as a recipe at
    ``path``, its paths relative to ``path``'s folder; never over the model or output."""
    _check_destination(path, model, output)
    folder = path.parent
    doc: dict[str, Any] = {}
    for key, option in recipe_keys(ctx.command).items():
        value = ctx.params.get(option.name)
        if option.name in MERGED or value is None:
            continue
        if ctx.get_parameter_source(option.name) in (ParameterSource.COMMANDLINE, ParameterSource.DEFAULT_MAP):
            doc[key] = _saved(option.name, value, folder)
    if plugins:
        doc["plugins"] = [_saved("plugins", p, folder) for p in plugins]
    if sets:
        doc["set"] = {k: list(v) if isinstance(v, tuple) else v for k, v in sets.items()}
    if input_shapes:
        doc["input-shapes"] = {k: list(v) for k, v in input_shapes.items()}
    text = json.dumps(doc, indent=2) + "\n" if path.suffix.lower() == ".json" else _toml(doc)
    _write_atomically(path, text)


def _check_destination(path: Path, model: Path, output: Path) -> None:
    target = path.resolve()
    if target == Path(model).resolve():
        raise OptionError(f"--save-config {path}: refusing to write over the input model")
    if target == Path(output).resolve():
        raise OptionError(f"--save-config {path}: refusing to write over -o's output")
    if path.suffix.lower() not in SUFFIXES:
        raise OptionError(f"--save-config {path}: a recipe is a .toml or .json file")
    if path.is_dir():
        raise OptionError(f"--save-config {path}: is a directory")
    if not target.parent.is_dir():
        raise OptionError(f"--save-config {path}: folder '{target.parent}' does not exist")


def _saved(name: str, value: Any, folder: Path) -> Any:
    """A value as the recipe holds it: a path relative to the recipe's folder (an
    absolute one stays absolute), anything else as it is."""
    if name == "level" and value.isdigit():
        return int(value)
    if name not in _PATHS:
        return value
    text = os.fspath(value)
    if _bare_report(name, text):
        return text
    return text if os.path.isabs(text) else os.path.relpath(os.path.abspath(text), os.path.abspath(folder))


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _toml(doc: Mapping[str, Any]) -> str:
    """``doc`` (scalars and lists at the top, then tables of them) as TOML."""
    lines = [f"# gcomp optimize recipe (gcomp {__version__}): gcomp optimize MODEL -o OUT --config THIS_FILE",
             "# Relative paths are relative to this file's folder; options not listed take gcomp's defaults."]
    tables = {k: v for k, v in doc.items() if isinstance(v, dict)}
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in doc.items() if k not in tables]
    for name, table in tables.items():
        lines += ["", f"[{_toml_key(name)}]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key)
    return key if bare else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return ("-" if value < 0 else "") + ("nan" if math.isnan(value) else "inf")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_string(os.fspath(value) if isinstance(value, os.PathLike) else str(value))


def _toml_string(text: str) -> str:
    # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007F")
