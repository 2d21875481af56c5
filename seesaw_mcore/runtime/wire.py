"""Dataclasses as msgpack-able lists and back, by their fields and type hints (what step
messages are written in, ``step_codec.py``). Each class gets a packer and an unpacker made
once from its fields' type hints: plain fields (numbers, strings, lists of ints, optionals of
those) pass as they are; enums, dataclasses and lists or optionals of them are converted. A
field added to a dataclass travels with no change here."""

from __future__ import annotations

import dataclasses
import enum
import operator
import types
import typing

_PACKERS: dict[type, typing.Callable] = {}
_UNPACKERS: dict[type, typing.Callable] = {}


def wire_pack(x) -> list:
    """A dataclass as a msgpack-able list of its field values (nested ones too)."""
    return _packer(type(x))(x)


def wire_unpack(v: list, cls: type):
    """The ``cls`` that ``wire_pack`` wrote as ``v`` (``v`` is reused)."""
    return _unpacker(cls)(v)


def _packer(cls: type) -> typing.Callable:
    fn = _PACKERS.get(cls)
    if fn is None:
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        get = operator.attrgetter(*names)
        convs = [(i, c) for i, n in enumerate(names)
                 if (c := _convert(hints[n], True)) is not None]
        single = len(names) == 1  # (attrgetter of one name returns the value itself)

        def fn(x, get=get, convs=convs, single=single):
            vals = [get(x)] if single else list(get(x))
            for i, c in convs:
                vals[i] = c(vals[i])
            return vals
        _PACKERS[cls] = fn
    return fn


def _unpacker(cls: type) -> typing.Callable:
    fn = _UNPACKERS.get(cls)
    if fn is None:
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        convs = [(i, c) for i, n in enumerate(names)
                 if (c := _convert(hints[n], False)) is not None]

        def fn(v, cls=cls, convs=convs):
            for i, c in convs:
                v[i] = c(v[i])
            return cls(*v)
        _UNPACKERS[cls] = fn
    return fn


def _optional(hint):
    """``X`` of ``X | None`` (``None``: not an optional)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


def _convert(hint, pack: bool) -> typing.Callable | None:
    """How a field of type ``hint`` is packed (``pack``) or unpacked (``None``: as it is)."""
    inner = _optional(hint)
    if inner is not None:
        c = _convert(inner, pack)
        return None if c is None else (lambda v, c=c: None if v is None else c(v))
    if isinstance(hint, type):
        if dataclasses.is_dataclass(hint):
            return wire_pack if pack else _unpacker(hint)
        if issubclass(hint, enum.Enum):
            return operator.attrgetter("value") if pack else hint
        return None
    if typing.get_origin(hint) is list:
        c = _convert(typing.get_args(hint)[0], pack)
        return None if c is None else (lambda v, c=c: [c(x) for x in v])
    return None
