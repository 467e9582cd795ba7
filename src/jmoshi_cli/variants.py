"""The variant catalogue: configs/variants.toml (shipped in the wheel) plus an optional user file."""

from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_MOSHI = "model.safetensors"
DEFAULT_TOKENIZER = "tokenizer_spm_32k_3.model"
DEFAULT_MIMI = "tokenizer-e351c8d8-checkpoint125.safetensors"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class WebUI:
    repo: str
    file: str
    revision: str = "main"


@dataclass(frozen=True)
class Variant:
    name: str
    repo: str
    revision: str = "main"
    description: str = ""
    moshi: str = DEFAULT_MOSHI
    tokenizer: str = DEFAULT_TOKENIZER
    mimi: str = DEFAULT_MIMI
    vram_gb: float = 24.0
    vram_min_gb: float = 18.7
    vram_min_int8_gb: float = 11.0  # with --quantize int8 (moshi's QLinear: int8 weights, fp16 compute)
    lm_gb: float = 15.4  # the bf16 LM file: what the MLX backend's memory needs are reckoned from before a download
    license: str = ""
    license_url: str = ""
    # A fine-tune of `repo`, on this machine: a full checkpoint and/or a LoRA adapter (finetune.py).
    moshi_weight: str = ""
    lora: str = ""
    source: str = "built-in"

    @property
    def files(self) -> tuple[str, str, str]:
        return (self.moshi, self.tokenizer, self.mimi)


@dataclass(frozen=True)
class Catalogue:
    variants: dict[str, Variant]
    default: str
    web_ui: WebUI
    sources: tuple[Path, ...]

    def get(self, name: str | None) -> Variant:
        name = name or self.default
        if name in self.variants:
            return self.variants[name]
        choices = ", ".join(sorted(self.variants))
        close = difflib.get_close_matches(name, list(self.variants), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UsageError(f"unknown variant '{name}'", f"{hint}choose one of: {choices}")


def builtin_path() -> Path:
    shipped = Path(__file__).with_name("configs") / "variants.toml"
    if shipped.is_file():
        return shipped
    # Editable installs and source checkouts keep the catalogue at the project root.
    return Path(__file__).resolve().parents[2] / "configs" / "variants.toml"


def user_path() -> Path | None:
    explicit = os.environ.get("JMOSHI_VARIANTS")
    if explicit:
        return Path(explicit).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    path = base / "jmoshi" / "variants.toml"
    return path if path.is_file() else None


def _read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"variant file not found: {path}", "check JMOSHI_VARIANTS") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read variant file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", "fix the file or unset JMOSHI_VARIANTS") from None


_GB_FIELDS = ("vram_gb", "vram_min_gb", "vram_min_int8_gb", "lm_gb")
# File names inside the hub repo, as opposed to moshi_weight and lora: paths on this machine.
_HUB_FILES = ("moshi", "tokenizer", "mimi")
_FIELDS = {f for f in Variant.__dataclass_fields__ if f not in ("name", "source")}
_HINT = "fix the file or unset JMOSHI_VARIANTS"


def _bad(path: Path, key: str, what: str, hint: str = _HINT) -> ConfigError:
    """One line that names the file and the dotted key, as in `FILE: variants.mine.repo must be ...`."""
    return ConfigError(f"{path}: {key} {what}", hint)


def _table(value: object, path: Path, key: str) -> dict:
    if not isinstance(value, dict):
        raise _bad(path, key, f"must be a table, not {_kind(value)}")
    return value


def _string(value: object, path: Path, key: str) -> str:
    if value is None:  # TOML has no null: None is a key left out
        raise _bad(path, key, "is missing")
    if not isinstance(value, str):
        raise _bad(path, key, f"must be a string, not {_kind(value)}")
    return value


def _kind(value: object) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)


def _hub_file(value: object, path: Path, key: str) -> str:
    """A file name inside a hub repo: relative, without `..`, so that it cannot point outside the repo's
    folder in the cache."""
    name = _string(value, path, key)
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise _bad(path, key, f"must be a file name inside the repo, not {name!r}",
                   "use the name relative to the repo's root, without a leading '/' or '..'")
    return name


def _variant(name: str, raw: object, path: Path) -> Variant:
    where = f"variants.{name}"
    raw = _table(raw, path, where)
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise _bad(path, where, f"has unknown key(s) {', '.join(unknown)}", f"known keys: {', '.join(sorted(_FIELDS))}")
    repo = _string(raw.get("repo"), path, f"{where}.repo")
    if not REPO_ID.match(repo):
        raise _bad(path, f"{where}.repo", f"must look like 'org/name', not {repo!r}")
    _check_values(raw, path, where)
    local = {key: str(_beside(path, raw[key])) for key in ("moshi_weight", "lora") if raw.get(key)}
    return Variant(name=name, source=str(path), **{**raw, **local})


def _check_values(raw: dict, path: Path, where: str) -> None:
    for key in _GB_FIELDS:
        value = raw.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise _bad(path, f"{where}.{key}", "must be a number of GB (0 or more)")
    for key in sorted(_FIELDS - set(_GB_FIELDS)):
        if key in raw:
            _string(raw[key], path, f"{where}.{key}")
    for key in _HUB_FILES:
        if key in raw:
            _hub_file(raw[key], path, f"{where}.{key}")


def _beside(toml: Path, value: str) -> Path:
    """A path in a variants file: `~` expanded, relative ones taken from the file's folder."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else toml.parent / path


def _web_ui(value: object, path: Path) -> WebUI:
    web = _table(value, path, "web_ui")
    repo = _string(web.get("repo"), path, "web_ui.repo")
    file = _hub_file(web.get("file"), path, "web_ui.file")
    return WebUI(repo, file, _string(web.get("revision", "main"), path, "web_ui.revision"))


def _merge(data: dict, path: Path, variants: dict[str, Variant], settings: dict) -> None:
    for name, raw in _table(data.get("variants", {}), path, "variants").items():
        if not re.match(r"^[a-z0-9][a-z0-9_.-]*$", name):
            raise _bad(path, f"variants.{name}", "is not a valid name: lower-case letters, digits, '-', '_' or '.'")
        variants[name] = _variant(name, raw, path)
    if "default" in data:
        settings["default"] = _string(data["default"], path, "default")
    if "web_ui" in data:
        settings["web_ui"] = _web_ui(data["web_ui"], path)


def load_catalogue() -> Catalogue:
    variants: dict[str, Variant] = {}
    settings: dict = {}
    sources = [builtin_path()]
    extra = user_path()
    if extra is not None:
        sources.append(extra)
    for path in sources:
        _merge(_read(path), path, variants, settings)
    default = settings.get("default", "ext")
    if default not in variants:
        raise ConfigError(f"default variant '{default}' is not defined", f"defined: {', '.join(sorted(variants))}")
    if "web_ui" not in settings:
        raise ConfigError(f"{sources[0]}: missing [web_ui]")
    return Catalogue(variants, default, settings["web_ui"], tuple(sources))
