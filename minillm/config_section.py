"""The base of every config section: typed dataclass fields checked once, when a section is built.

A section (``GPTConfig``, ``TrainConfig``, ...) is a dataclass that subclasses ``Section`` and
declares, instead of writing a check per field:

- the field's type: ``int``, ``float``, ``bool``, ``str``, or a ``Literal`` from
  ``minillm.choices`` (the allowed values; the one list there is the only list anywhere);
- ``_rules``: a range rule followed by the keys it covers, e.g. ``(AT_LEAST_1, "n_layer", ...)``;
- ``_validate()``: the rules that involve several fields.

Every failure is a ``ConfigError`` of one line that names ``section.key`` and what to change.
``parse_override`` turns the text of ``--section.key=value`` into the field's type.
"""
import dataclasses
import functools
import math
import typing

from minillm.errors import ConfigError


def show(v) -> str:
    return f"{v:g}" if isinstance(v, float) else repr(v)


def require(ok: bool, message: str) -> None:
    # Written as "fail unless ok" so that NaN, which fails every comparison, is rejected too.
    if not ok:
        raise ConfigError(message)


# Range rules shared by the sections: (test, how the message states it).
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
POSITIVE = (lambda v: v > 0, "> 0")
POSITIVE_INT = (lambda v: v >= 1, "a positive integer")
BELOW_1 = (lambda v: 0 <= v < 1, "in [0, 1)")
UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")
OPEN_UNIT = (lambda v: 0 < v < 1, "in (0, 1)")

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@functools.lru_cache(maxsize=None)
def field_types(cls) -> dict:
    """Field name -> type for a section class (get_type_hints resolves string annotations too)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def choices_of(typ) -> tuple | None:
    """The allowed values of a ``Literal`` field type, else None."""
    return typing.get_args(typ) if typing.get_origin(typ) is typing.Literal else None


def _base(typ):
    """The plain type behind a field type: ``Literal["a", "b"]`` -> str, ``Literal[0, 1]`` -> int."""
    options = choices_of(typ)
    return typ if options is None else type(options[0])


def typed(key: str, value, typ):
    """Check a value from TOML or a dict against its field type; int -> float is the one widening."""
    typ = _base(typ)
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        value = value.item()          # numpy scalars (e.g. read back from HDF5) -> Python scalars
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str)}.get(typ)
    if ok is None:
        return value                  # a type this module does not know: the section checks it
    require(ok, f"{key}={value!r} must be {_TYPE_NAMES[typ]}")
    if typ is float:
        value = float(value)
        require(math.isfinite(value), f"{key}={value} must be a finite number")
    return value


def parse_override(key: str, text: str, typ):
    """Turn the text of a command-line override into the field's type."""
    typ = _base(typ)
    try:
        if typ is bool:
            low = text.strip().lower()
            if low in _TRUE or low in _FALSE:
                return low in _TRUE
            raise ValueError
        if typ is int:
            return int(text)
        if typ is float:
            value = float(text)
    except ValueError:
        raise ConfigError(f"{key}={text!r} must be {_TYPE_NAMES[typ]}") from None
    if typ is float:
        return typed(key, value, float)     # outside the try: ConfigError is itself a ValueError
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]             # --train.out_dir='"runs/x"' when a shell kept the quotes
    return text


class Section:
    """Check field types, choices and ranges, then the cross-field rules (see the module doc)."""
    _name, _rules = "", ()

    def __post_init__(self):
        for name, typ in field_types(type(self)).items():
            value = typed(f"{self._name}.{name}", getattr(self, name), typ)
            setattr(self, name, value)
            options = choices_of(typ)
            require(options is None or value in options,
                    f"{self._name}.{name}={value!r} is not one of {', '.join(map(repr, options or ()))}")
        for (test, text), *keys in self._rules:
            for key in keys:
                value = getattr(self, key)
                require(test(value), f"{self._name}.{key}={show(value)} must be {text}")
        self._validate()

    def _validate(self):
        """Rules that involve several fields."""


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(key: str, text: str) -> int:
    """Bytes in a size written like ``"80GB"``, ``"16 GiB"``, ``"512MiB"`` or ``"1e9"``."""
    t = text.strip().lower().replace(" ", "")
    number = t.rstrip("kmgtib")
    unit = t[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    require(unit in _SIZE_UNITS and value > 0 and math.isfinite(value),
            f"{key}={text!r} is not a size; write e.g. '16GiB', '80GB' or '512MiB'")
    return int(value * _SIZE_UNITS[unit])
