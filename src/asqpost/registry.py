"""The registries: quantization methods (with their roles and report labels), and the :class:`Registry` that
models and datasets use, all in one style: names are registered once (a second registration of a name is an
error), looked up with an error that lists the choices, and listed by a ``list_*()`` / ``*_names()`` function.

A method is a name bound to a quantizer class by :func:`register_quantizer`. The class declares the roles it
can quantize (``roles``: ``"weight"``, ``"act"`` or both), the scale initialisations it implements (``inits``)
and a short ``label`` for reports (``"LSQ"``, ``"POST"``). Everything that lists methods asks here: config
validation, recipe names (``<weight>-<act>``), the CLI and the compare report, and the tests.

This module sits at the bottom of the package (it imports nothing from it), so :mod:`asqpost.config` can
validate against it while the quantizers, which import the config, register themselves into it. The built-in
methods are registered when :mod:`asqpost` is imported (its ``__init__`` imports :mod:`asqpost.quantizers`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

ROLES = ("weight", "act")
FLOAT = "float"  # in configs and compare grids: no quantizer; so never a method name
_NAME = re.compile(r"[a-z][a-z0-9_]*")

T = TypeVar("T", bound=type)
V = TypeVar("V")


class Registry(Generic[V]):
    """Names bound to objects of one kind (``kind``: ``"model"``, ``"dataset"``), in registration order.

    ``register(name)`` is a decorator (``add(name, item)`` the plain call); a name registered twice raises
    ``ValueError``, as does :meth:`get` of an unknown name (the message lists the registered ones). Read-only
    as a mapping (``registry[name]``, ``name in registry``, iteration over the names).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, V] = {}

    def add(self, name: str, item: V) -> V:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name is a non-empty string, got {name!r}")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[V], V]:
        def wrap(item: V) -> V:
            return self.add(name, item)

        return wrap

    def remove(self, name: str) -> None:
        """Unregister ``name`` (for plugins and tests that register one for a while)."""
        self.get(name)
        del self._items[name]

    def get(self, name: str) -> V:
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {sorted(self._items)}")
        return self._items[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def __getitem__(self, name: str) -> V:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._items))

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class Method:
    """A registered method: its name, its quantizer class and its report label."""

    name: str
    cls: type
    label: str

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.cls.roles)

    @property
    def inits(self) -> tuple[str, ...]:
        return tuple(self.cls.inits)


_METHODS: dict[str, Method] = {}


def _check_name(name: object) -> str:
    if not isinstance(name, str) or "-" in name or not _NAME.fullmatch(name):
        raise ValueError(
            f"quantization method name {name!r} is not allowed: use lower-case letters, digits and '_' "
            "(no '-': recipes are '<weight>-<act>')"
        )
    if name == FLOAT:
        raise ValueError(f"{FLOAT!r} is reserved (it means 'no quantizer'); pick another method name")
    if name in _METHODS:
        raise ValueError(f"quantization method {name!r} is already registered ({_METHODS[name].cls.__name__})")
    return name


def _check_class(cls: type) -> None:
    roles = getattr(cls, "roles", ())
    if not roles or any(role not in ROLES for role in roles):
        raise ValueError(f"{cls.__name__}.roles must name one or more of {ROLES}, got {roles!r}")
    if not getattr(cls, "inits", ()):
        raise ValueError(f"{cls.__name__}.inits must name the scale initialisations it implements")


def register_quantizer(*names: str, label: str | None = None) -> Callable[[T], T]:
    """Class decorator: make a quantizer class buildable under each of ``names``.

    ``label`` (default: the class's ``label``) names the method in reports. Raises ``ValueError`` for a name
    with a ``-`` (recipes split on it), the reserved ``float``, a name already registered, or a class without
    ``roles``/``inits``/a label.
    """
    if not names:
        raise ValueError("register_quantizer needs at least one method name")

    def wrap(cls: T) -> T:
        _check_class(cls)
        text = label or getattr(cls, "label", "")
        if not text:
            raise ValueError(f"{cls.__name__} needs a label (class attribute or register_quantizer(label=...))")
        for name in names:
            _check_name(name)
        for name in names:
            _METHODS[name] = Method(name, cls, text)
        return cls

    return wrap


def unregister_quantizer(name: str) -> None:
    """Remove a method (for plugins and tests that register one for a while)."""
    get_method(name)
    del _METHODS[name]


def get_method(name: str) -> Method:
    """The registered :class:`Method` called ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in _METHODS:
        raise ValueError(f"unknown quantization method {name!r}; choose one of {list(_METHODS)}")
    return _METHODS[name]


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(_METHODS)


def methods_for(role: str) -> tuple[str, ...]:
    """The methods that can quantize ``role`` (``"weight"`` or ``"act"``), in registration order."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {ROLES}")
    return tuple(name for name, method in _METHODS.items() if role in method.roles)
