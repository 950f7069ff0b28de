"""Strict dataclass configs and the command-line options generated from them (docs/design.md §10).

A trainer's config is a dataclass deriving from ``RunConfig`` (the loop's knobs: optimizer, schedule,
evaluation cadence, bookkeeping). Every config

- rejects unknown keys, in the constructor and in ``from_dict`` alike, with the list of valid ones
  (a misspelled knob is never silently ignored);
- checks each value against its annotation, read with ``typing.get_type_hints`` (``int``, ``float``
  -- an int is accepted and converted --, ``bool``, ``str``, ``Optional[...]``, ``Literal[...]``
  choices, ``tuple[int, ...]``), then runs the subclass's range checks (``checks()``);
- round-trips through JSON (``to_dict`` / ``from_dict``) and through the command line
  (``add_options`` / ``from_args``: one ``--option`` per field, choices and defaults shown).

Declare a field with ``option(default, "help text")``. Example::

    @dataclass
    class MyConfig(RunConfig):
        width: int = option(64, "model width")
        def checks(self):
            return super().checks() + [("width", self.width >= 1, ">= 1")]
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

Schedule = Literal["cosine", "wsd", "constant"]
SCHEDULES = typing.get_args(Schedule)

# Messages that tell the user how to continue name the command-line flag when the run was started from the
# command line (``--resume``) and the keyword otherwise (``resume=True``).
_CLI_STYLE = contextvars.ContextVar("eqprop_cli_style", default=False)


@contextlib.contextmanager
def cli_style():
    """Within this context, ``knob`` spells options as command-line flags (the CLI enters it)."""
    token = _CLI_STYLE.set(True)
    try:
        yield
    finally:
        _CLI_STYLE.reset(token)


def knob(name: str, value: Any = True) -> str:
    """How the user sets option ``name`` to ``value`` where they are: ``--resume`` on the command line,
    ``resume=True`` in Python. Example: ``knob("overwrite")  # 'overwrite=True'``"""
    if _CLI_STYLE.get():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            return flag if value else "--no-" + name.replace("_", "-")
        return f"{flag} {value}"
    return f"{name}={value!r}"


def option(default, help: str = "", **metadata):
    """A config field with its help text (shown by ``--help``)."""
    return field(default=default, metadata={"help": help, **metadata})


def _unwrap_optional(tp):
    """``Optional[X]`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _describe(tp) -> str:
    base, optional = _unwrap_optional(tp)
    if typing.get_origin(base) is Literal:
        text = "one of " + ", ".join(repr(a) for a in typing.get_args(base))
    elif typing.get_origin(base) is tuple:
        text = "a tuple of " + _describe(typing.get_args(base)[0])
    else:
        text = getattr(base, "__name__", str(base))
    return text + (" or None" if optional else "")


class StrictConfig:
    """Base of every config dataclass: strict keys, typed values, JSON and CLI round trips.

    Subclasses are ``@dataclass``es; they add range checks by overriding ``checks()``, which returns
    ``[(field name, ok, what it needs), ...]``.
    """

    def __new__(cls, *args, **kwargs):
        # The dataclass __init__ would say only "unexpected keyword argument": name the valid keys instead.
        valid = [f.name for f in cls._fields_own_first()]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise TypeError(f"unknown {cls.__name__} key(s) {unknown}; valid keys are: {', '.join(valid)}")
        return super().__new__(cls)

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, self._coerce(f.name, hints[f.name], getattr(self, f.name)))
        for name, ok, need in self.checks():
            if not ok:
                raise ValueError(f"{type(self).__name__}.{name} must be {need}, got {getattr(self, name)!r}")

    def _coerce(self, name: str, tp, value):
        base, optional = _unwrap_optional(tp)
        if value is None and optional:
            return None
        bad = TypeError(f"{type(self).__name__}.{name} must be {_describe(tp)}, got {type(value).__name__} {value!r}")
        origin = typing.get_origin(base)
        if origin is Literal:
            choices = typing.get_args(base)
            if value not in choices or type(value) is not type(choices[0]):
                raise ValueError(f"{type(self).__name__}.{name} must be one of {choices}, got {value!r}")
            return value
        if origin is tuple:
            if not isinstance(value, (tuple, list)):
                raise bad
            (item,) = typing.get_args(base)[:1]
            try:
                return tuple(self._coerce(name, item, v) for v in value)
            except TypeError:
                raise bad from None
        if base is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad
            return float(value)
        if base is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad
            return value
        if base in (bool, str):
            if not isinstance(value, base):
                raise bad
            return value
        raise NotImplementedError(f"{type(self).__name__}.{name}: config fields of type {tp} are not supported")

    @classmethod
    def _fields_own_first(cls) -> list:
        """The dataclass fields, those of the most derived class first (a trainer's own, then the loop's)."""
        mro = list(cls.__mro__)
        return sorted(dataclasses.fields(cls), key=lambda f: mro.index(cls._owner(f.name)))

    @classmethod
    def _owner(cls, name: str) -> type:
        return next(c for c in cls.__mro__ if name in c.__dict__.get("__annotations__", {}))

    def checks(self) -> list:
        """Range checks ``[(field, ok, need), ...]``; subclasses extend the list."""
        return []

    @classmethod
    def from_dict(cls, d: dict):
        """Build from a plain dict (e.g. a ``config.json``); unknown keys are an error listing the valid ones.

        Example: ``TrainConfig.from_dict({"k": 3, "max_steps": 2000})``
        """
        return cls(**d)

    def replace(self, **changes):
        """A copy with some fields changed (unknown keys are an error, as in the constructor)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict:
        """Plain JSON-able data (tuples become lists)."""
        return {
            f.name: (list(v) if isinstance(v, tuple) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }

    # ---- the command line ---------------------------------------------------------------------
    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser, *, skip=(), defaults: Optional[dict] = None) -> None:
        """One ``--option`` per field (``snake_case`` -> ``--kebab-case``; bools get ``--no-...``), with the
        field's help, its choices and the default shown. Options not given keep the value of ``--config``
        or the default: only what is on the line overrides (read back with ``from_args``)."""
        hints = typing.get_type_hints(cls)
        parser.add_argument(
            "--config",
            default=None,
            metavar="JSON",
            help="start from this config.json (e.g. a run's; its out_dir, resume and overwrite are "
            "not taken); options given here override it",
        )
        groups = {}
        for f in cls._fields_own_first():  # the trainer's own options first, the loop's after
            if f.name in skip:
                continue
            owner = cls._owner(f.name)
            title = owner.__dict__.get("options_title") or f"{owner.__name__} options"
            group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
            base, optional = _unwrap_optional(hints[f.name])
            shown = (defaults or {}).get(f.name, f.default)
            help_text = f.metadata.get("help", "") + ("" if shown is None else f" (default: {shown})")
            kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
            flag = "--" + f.name.replace("_", "-")
            origin = typing.get_origin(base)
            if base is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            elif origin is Literal:
                group.add_argument(flag, choices=typing.get_args(base), **kwargs)
            elif origin is tuple:
                item = typing.get_args(base)[0]
                n = f.metadata.get("nargs") or (len(f.default) if isinstance(f.default, tuple) else None)
                group.add_argument(flag, type=item, nargs=n or "+", metavar=f.metadata.get("metavar", "V"), **kwargs)
            elif base in (int, float, str):
                metavar = f.metadata.get("metavar", {int: "N", float: "X", str: "STR"}[base])
                group.add_argument(flag, type=base, metavar=metavar, **kwargs)
            else:  # pragma: no cover - _coerce refuses such fields first
                raise NotImplementedError(f"no command-line option for {f.name}: {hints[f.name]}")

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, skip=(), defaults: Optional[dict] = None):
        """``defaults`` < the ``--config`` file < options given on the command line."""
        base = dict(defaults or {})
        if getattr(args, "config", None):
            with open(args.config) as f:
                saved = json.load(f)
            # a run's config.json names that run's folder: starting from it must not write into that run
            base.update({key: v for key, v in saved.items() if key not in ("out_dir", "resume", "overwrite")})
        names = {f.name for f in dataclasses.fields(cls)} - set(skip)
        given = {n: getattr(args, n) for n in names if hasattr(args, n)}
        return cls.from_dict({**base, **given})


@dataclass
class RunConfig(StrictConfig):
    """The loop's knobs, shared by every trainer (docs/design.md §10).

    ``batch_size`` is the GLOBAL number of sequences per micro-step (split evenly over data-parallel
    ranks); one optimizer step sees ``batch_size * grad_accum_steps`` sequences.
    """

    options_title = "training loop options"

    # optimization
    batch_size: int = option(32, "global sequences per micro-step")
    grad_accum_steps: int = option(1, "micro-steps per optimizer step")
    lr: float = option(3e-3, "peak learning rate (AdamW)")
    min_lr: float = option(3e-4, "final learning rate of cosine / wsd")
    warmup_steps: int = option(50, "linear warmup steps")
    schedule: Schedule = option("cosine", "lr schedule")
    wsd_decay_frac: float = option(0.2, "fraction of steps the wsd schedule decays over")
    weight_decay: float = option(0.01, "AdamW weight decay (matrices only)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "max global gradient norm (0 = off)")
    max_steps: int = option(400, "optimizer steps")
    # memory / speed
    bf16: bool = option(False, "bf16 autocast for the forward pass")
    device: str = option(
        "auto", "auto | cpu | cuda | cuda:N (under torchrun each rank takes cuda:LOCAL_RANK)", metavar="DEVICE"
    )
    # evaluation
    eval_every: int = option(50, "steps between evaluations")
    early_stop: bool = option(True, "end the run when the trainer's target is reached (see its stop rule)")
    # bookkeeping
    seed: int = option(0, "seed of the model init and the training stream")
    out_dir: str = option("runs/run", "where artifacts go", metavar="DIR")
    resume: bool = option(False, "continue from out_dir/last.pt")
    overwrite: bool = option(False, "move a run already in out_dir aside (to OUT_DIR.old-<time>) and start afresh")
    log_every: int = option(10, "steps between history rows")
    progress: bool = option(True, "show a tqdm bar")

    def checks(self) -> list:
        return super().checks() + [
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum_steps", self.grad_accum_steps >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"),
            ("min_lr", 0 <= self.min_lr <= self.lr, f"in [0, lr={self.lr}]"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("wsd_decay_frac", 0 < self.wsd_decay_frac <= 1, "in (0, 1]"),
            ("max_steps", self.max_steps >= 1, ">= 1"),
            ("eval_every", self.eval_every >= 1, ">= 1"),
            ("grad_clip", self.grad_clip >= 0, ">= 0"),
            ("log_every", self.log_every >= 1, ">= 1"),
            (
                "overwrite",
                not (self.overwrite and self.resume),
                "False when resume is True (resume continues the run in out_dir; overwrite moves it aside)",
            ),
        ]
