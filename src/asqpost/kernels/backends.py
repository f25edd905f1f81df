"""Kernel backends for packed layers: one ordered registry, one selection rule, one plan cache per layer.

A backend reads a layer only as a :class:`~asqpost.packed.LayerSpec`. It says whether it takes an input's device
and dtype (:meth:`Backend.takes`) and the layer (:meth:`Backend.eligible`, a reason or ``None``), builds a frozen
plan once per ``(backend, device, dtype)`` (:meth:`Backend.prepare`) and runs it on the folded input and its
activation step (:meth:`Backend.run`; ``None`` hands that one input to the next backend). For each call the
layer's :class:`PlanCache` tries the registered backends in order and runs the first that takes the input and
the layer.

The kernel selection (``auto``, ``native``, ``triton``, ``reference`` or ``onnx``: ONNX's standard operators, the
form ONNX export traces) says which backends are tried: an
explicit ``kernel=`` argument, else the innermost :func:`use_kernel` block, else ``ASQPOST_KERNEL`` as read
when :mod:`asqpost.kernels` is imported (default ``auto``). Naming ``native`` or ``triton`` makes a layer with an
integer form fail where that kernel cannot run, instead of falling back.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..packed import LayerSpec

KERNELS = ("auto", "native", "triton", "reference", "onnx")


def check_kernel(name: str, source: str = "kernel") -> str:
    if name not in KERNELS:
        raise ValueError(f"{source} must be one of {', '.join(KERNELS)}, got {name!r}")
    return name


DEFAULT_KERNEL = check_kernel(os.environ.get("ASQPOST_KERNEL", "auto"), "ASQPOST_KERNEL")
_SELECTED: list[str] = []  # the open use_kernel blocks, innermost last (a plain list: torch.compile reads it)


@contextmanager
def use_kernel(name: str) -> Iterator[None]:
    """Run packed layers inside the block with the kernel selection ``name`` (see the module docstring). The
    selection holds for the whole process while the block is open."""
    _SELECTED.append(check_kernel(name))
    try:
        yield
    finally:
        _SELECTED.pop()


def current_kernel() -> str:
    """The selection in force: the innermost :func:`use_kernel`, else ``ASQPOST_KERNEL`` at import."""
    return _SELECTED[-1] if _SELECTED else DEFAULT_KERNEL


def grouped_reason(spec: LayerSpec) -> str | None:
    """Why a kernel that runs convolutions as one product per output pixel cannot take ``spec``: a grouped conv."""
    groups = getattr(spec.geometry, "groups", 1)
    return None if groups == 1 else f"grouped conv (groups={groups})"


def integer_reason(spec: LayerSpec) -> str | None:
    """Why ``spec`` has no integer form (every integer backend's first rule), or ``None``."""
    if spec.input is None:
        return "input not quantized"
    if spec.weight is None:
        return "float weight"
    if spec.weight.lut is None:
        return "level table has no small-integer form"
    return None


class Backend(abc.ABC):
    """One way to compute a packed layer. ``modes``: the selections that try it."""

    name: str
    modes: frozenset[str]

    def takes(self, device: torch.device, dtype: torch.dtype, kernel: str) -> bool:
        """Whether inputs of ``dtype`` on ``device`` can run here under the selection ``kernel``."""
        return True

    def missing(self, device: torch.device) -> str | None:
        """Why this backend cannot run at all here (raised when the selection names it), or ``None``."""
        return None

    @abc.abstractmethod
    def eligible(self, spec: LayerSpec) -> str | None:
        """Why this backend cannot compute ``spec``, or ``None`` when it can."""

    @abc.abstractmethod
    def prepare(self, spec: LayerSpec, device: torch.device, dtype: torch.dtype) -> Any:
        """The layer's frozen plan for inputs of ``dtype`` on ``device`` (built once, kept by a :class:`PlanCache`)."""

    @abc.abstractmethod
    def run(self, plan: Any, x: torch.Tensor, step: torch.Tensor | None) -> torch.Tensor | None:
        """The layer's output for the folded input ``x`` and its activation step, or ``None`` for an input this
        backend leaves to the next one."""

    def describe(self, plan: Any, spec: LayerSpec) -> tuple[str, str]:
        """``(path, reason)`` for the kernel report, where this backend takes the layer."""
        return self.name, ""


_REGISTRY: list[Backend] = []
_GENERATION = [0]  # bumped by each registration: the layers' remembered routes are then stale


def register_backend(backend: Backend, before: str | None = None) -> Backend:
    """Add ``backend`` to the registry (at the end, or just before the backend named ``before``); refuses a name
    that is already registered."""
    if any(b.name == backend.name for b in _REGISTRY):
        raise ValueError(f"kernel backend {backend.name!r} is already registered")
    names = list_backends()
    if before is not None and before not in names:
        raise ValueError(f"unknown kernel backend {before!r}; registered: {names}")
    _REGISTRY.insert(len(_REGISTRY) if before is None else names.index(before), backend)
    _GENERATION[0] += 1
    return backend


def list_backends() -> list[str]:
    """The registered backends' names, in the order they are tried."""
    return [b.name for b in _REGISTRY]


def get_backend(name: str) -> Backend:
    for backend in _REGISTRY:
        if backend.name == name:
            return backend
    raise ValueError(f"unknown kernel backend {name!r}; registered: {list_backends()}")


@dataclass(frozen=True)
class PlanKey:
    backend: str
    device: torch.device
    dtype: torch.dtype


@dataclass(frozen=True)
class Ineligible:
    """A cache entry for a backend that does not take the layer, and why."""

    reason: str


class PlanCache:
    """A packed layer's spec (built on first use from ``build_spec``) and its plans by :class:`PlanKey`. The layer
    clears it whenever its tensors change (``_apply``: ``.to()``, ``.cuda()``, ``.double()``; state loading)."""

    def __init__(self, build_spec: Callable[[], LayerSpec]):
        self._build_spec = build_spec
        self._spec: LayerSpec | None = None
        self._plans: dict[PlanKey, Any] = {}
        # (selection, device, dtype) -> (backend, plan) that the selection reached first: one lookup per call
        self._routes: dict[tuple[str, torch.device, torch.dtype], tuple[Backend, Any]] = {}
        self._generation = _GENERATION[0]

    def clear(self) -> None:
        self._spec = None
        self._plans.clear()
        self._routes.clear()

    @property
    def spec(self) -> LayerSpec:
        if self._spec is None:
            self._spec = self._build_spec()
        return self._spec

    def plan(
        self, backend: Backend | str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Any:
        """The backend's plan (or :class:`Ineligible`) for this layer, built on first use."""
        backend = get_backend(backend) if isinstance(backend, str) else backend
        key = PlanKey(backend.name, torch.device(device), dtype)
        entry = self._plans.get(key)
        return self._build(backend, key) if entry is None else entry

    def _build(self, backend: Backend, key: PlanKey) -> Any:
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "a packed model builds its kernel plans on its first forward: run it once (eagerly, on inputs of "
                "the dtype and device it will see) before torch.compile"
            )
        reason = backend.eligible(self.spec)
        entry = Ineligible(reason) if reason else backend.prepare(self.spec, key.device, key.dtype)
        self._plans[key] = entry
        return entry

    def run(self, x: torch.Tensor, step: torch.Tensor | None, kernel: str | None = None) -> torch.Tensor:
        """The layer's output on the first backend that takes ``x`` and the layer."""
        kernel = current_kernel() if kernel is None else check_kernel(kernel)
        if self._generation != _GENERATION[0]:
            self._routes.clear()
            self._generation = _GENERATION[0]
        route = self._routes.get((kernel, x.device, x.dtype))
        if route is not None:  # at batch 1 every Python step of a layer shows
            y = route[0].run(route[1], x, step)
            if y is not None:
                return y
        device, dtype = x.device, x.dtype
        for backend in _REGISTRY:
            if kernel not in backend.modes or not backend.takes(device, dtype, kernel):
                continue
            if backend.name == kernel and self.spec.lut is not None and (why := backend.missing(device)):
                raise RuntimeError(why)
            plan = self.plan(backend, device, dtype)
            if not isinstance(plan, Ineligible):
                self._routes.setdefault((kernel, device, dtype), (backend, plan))
                y = backend.run(plan, x, step)
                if y is not None:
                    return y
        raise RuntimeError(f"no kernel backend takes this layer under kernel={kernel!r}")

    def describe(self, device: torch.device, kernel: str | None = None) -> tuple[str, str]:
        """``(path, reason)``: the backend a float32 input on ``device`` runs on, and why (the first refusal of a
        backend tried before it, or what the backend says)."""
        kernel = current_kernel() if kernel is None else check_kernel(kernel)
        refusals: list[str] = []
        for backend in _REGISTRY:
            if kernel not in backend.modes or not backend.takes(device, torch.float32, kernel):
                continue
            why = backend.missing(device)
            plan = Ineligible(why) if why else self.plan(backend, device, torch.float32)
            if isinstance(plan, Ineligible):
                refusals.append(plan.reason)
                continue
            path, reason = backend.describe(plan, self.spec)
            return path, reason or (refusals[0] if refusals else f"kernel={kernel}")
        raise RuntimeError(f"no kernel backend takes this layer under kernel={kernel!r}")
