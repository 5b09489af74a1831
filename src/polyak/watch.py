"""Scoped change detection: an averager hears about changes to its own model, and to nothing else.

torch has no per-module event for most ways a model changes. While at least one :class:`Watcher` lives, polyak
installs torch's global registration hooks (parameter, buffer and submodule set or registered: added, replaced,
tied, ``load_state_dict(assign=True)``) and thin wrappers of the calls that have no hook: ``Module._apply``
(``to``, ``half``, ``to_empty``, ...), ``Module.__delattr__``, ``register_parameter`` / ``register_buffer`` with
None (``m.bias = None``), the ``Tensor.data`` and ``requires_grad`` setters, ``requires_grad_`` and
``torch.utils.swap_tensors``. Each event looks up the module it touched (by identity, in a weak map) or the tensor
(by ``id``: tensors must not be weakly referenced, ``swap_tensors`` refuses them) and marks the watchers of that
module or tensor only. A change to any other module costs one failed lookup and no re-check.

Installation is counted: the last watcher closed (or garbage-collected) removes the hooks and restores torch's
own functions (those still ours). The registry changes under a lock, and an event reads an immutable tuple of
watchers, so watching is thread-safe. An averager built with ``watch=False`` installs nothing: then call its
``check()`` after changing the model.

Not seen (private or storage-level): writes into a module's ``_parameters`` / ``_buffers`` dicts, and ``set_`` /
``resize_`` of a tensor's storage.
"""

from __future__ import annotations

import functools
import operator
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["Watcher", "installed"]

_LOCK = threading.RLock()  # re-entrant: a finalizer may release a watcher while the lock is held
_MODULES: WeakIdKeyDictionary = WeakIdKeyDictionary()  # module -> tuple of weak references to watchers
_TENSORS: dict[int, tuple[weakref.ref[Watcher], ...]] = {}  # id(tensor) -> watchers; a reused id: one re-check
_USERS = [0]  # live watchers; the hooks are installed while it is above 0
_UNDO: list[Callable[[], None]] = []


def _mark(refs: tuple[weakref.ref[Watcher], ...] | None) -> None:
    if refs:
        for ref in refs:
            watcher = ref()
            if watcher is not None:
                watcher.dirty = True


def _module_changed(module: nn.Module, *_: Any) -> None:
    _mark(_MODULES.get(module))


def _tensor_changed(tensor: Tensor) -> None:
    _mark(_TENSORS.get(id(tensor)))


class Watcher:
    """Marked ``dirty`` when a module or tensor it watches changes; the owner re-checks, then :meth:`watch` again."""

    __slots__ = ("__weakref__", "_registered", "dirty")

    def __init__(self) -> None:
        self.dirty = True
        self._registered = _Registration()
        with _LOCK:
            if not _USERS[0]:
                _install()
            _USERS[0] += 1
        weakref.finalize(self, _release, self._registered)

    def watch(self, modules: Iterable[nn.Module], tensors: Iterable[Tensor]) -> None:
        """Watch exactly these modules and tensors from now on, and clear the mark."""
        registration = self._registered
        me = weakref.ref(self)
        with _LOCK:
            registration.drop()
            registration.modules = [weakref.ref(m) for m in modules]
            registration.ids = list({id(t) for t in tensors})
            for module in registration.modules:
                target = module()
                if target is not None:
                    _MODULES[target] = (*_MODULES.get(target, ()), me)
            for key in registration.ids:
                _TENSORS[key] = (*_TENSORS.get(key, ()), me)
            registration.me = me
            self.dirty = False

    def close(self) -> None:
        """Stop watching; the hooks go when the last watcher closes (also done when the watcher is collected)."""
        _release(self._registered)


class _Registration:
    """What one watcher registered, kept apart from it so that its finalizer can undo it."""

    __slots__ = ("closed", "ids", "me", "modules")

    def __init__(self) -> None:
        self.modules: list[weakref.ref[nn.Module]] = []
        self.ids: list[int] = []
        self.me: weakref.ref[Watcher] | None = None
        self.closed = False

    def drop(self) -> None:
        """Remove this watcher's entries from the registry (under the lock)."""
        me = self.me
        for module in self.modules:
            target = module()
            if target is None:
                continue
            rest = tuple(r for r in _MODULES.get(target, ()) if r is not me and r() is not None)
            if rest:
                _MODULES[target] = rest
            else:
                _MODULES.pop(target, None)
        for key in self.ids:
            rest = tuple(r for r in _TENSORS.get(key, ()) if r is not me and r() is not None)
            if rest:
                _TENSORS[key] = rest
            else:
                _TENSORS.pop(key, None)
        self.modules, self.ids = [], []


def _release(registration: _Registration) -> None:
    with _LOCK:
        if registration.closed:
            return
        registration.closed = True
        registration.drop()
        _USERS[0] -= 1
        if not _USERS[0]:
            while _UNDO:
                _UNDO.pop()()


def _layout(tensor: Tensor) -> tuple[Any, ...] | None:
    """Where and how a tensor's data lies, to tell a real change from a no-op (None when it cannot be read)."""
    try:
        return tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride(), tensor.device
    except Exception:  # tensors without storage (fake, functional, some subclasses): count as changed
        return None


def installed() -> bool:
    """True while polyak's hooks and wrappers are in torch (some watcher lives)."""
    return bool(_UNDO)


def _replace(owner: Any, name: str, wrapper: Any) -> None:
    """Set ``owner.name`` to ``wrapper``, and remember how to put the original back (if still ours then)."""
    own = name in owner.__dict__
    original = owner.__dict__.get(name)
    setattr(owner, name, wrapper)

    def undo() -> None:
        if owner.__dict__.get(name) is wrapper:
            if own:
                setattr(owner, name, original)
            else:  # inherited (``Tensor.data`` lives on ``TensorBase``): uncover it again
                delattr(owner, name)

    _UNDO.append(undo)


def _install() -> None:
    """Install the hooks and wrappers (under the lock, when the first watcher is made)."""
    hooks = torch.nn.modules.module
    for register in (
        hooks.register_module_parameter_registration_hook,
        hooks.register_module_buffer_registration_hook,
        hooks.register_module_module_registration_hook,
    ):
        _UNDO.append(register(_module_changed).remove)
    module: Any = nn.Module
    apply, delattr_ = module._apply, module.__delattr__
    register_parameter, register_buffer = module.register_parameter, module.register_buffer

    @functools.wraps(apply)
    def _apply(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # Buffers (and, with overwrite_module_params_on_conversion, parameters) are replaced in their dicts.
        before = [*self._parameters.values(), *self._buffers.values()]
        result = apply(self, *args, **kwargs)
        if any(map(operator.is_not, before, [*self._parameters.values(), *self._buffers.values()])):
            _module_changed(self)
        return result

    @functools.wraps(delattr_)
    def __delattr__(self: nn.Module, name: str) -> None:
        delattr_(self, name)
        _module_changed(self)

    @functools.wraps(register_parameter)
    def _register_parameter(self: nn.Module, name: str, param: Any) -> None:
        register_parameter(self, name, param)
        if param is None:  # set to None (``m.bias = None``): torch's hooks see only tensors
            _module_changed(self)

    @functools.wraps(register_buffer)
    def _register_buffer(self: nn.Module, name: str, tensor: Any, persistent: bool = True) -> None:
        register_buffer(self, name, tensor, persistent)
        if tensor is None:
            _module_changed(self)

    _replace(module, "_apply", _apply)
    _replace(module, "__delattr__", __delattr__)
    _replace(module, "register_parameter", _register_parameter)
    _replace(module, "register_buffer", _register_buffer)

    base: Any = torch._C.TensorBase
    data, grad_flag, requires_grad_ = base.data, base.requires_grad, base.requires_grad_

    def set_data(tensor: Tensor, value: Tensor) -> None:
        refs = _TENSORS.get(id(tensor))
        if refs is None:  # not a watched tensor: torch's own setter, and nothing else
            data.__set__(tensor, value)
            return
        before = _layout(tensor)
        data.__set__(tensor, value)
        if before is None or _layout(tensor) != before:  # ``model.to(device)`` re-sets the same data every step
            _mark(refs)

    def set_requires_grad(tensor: Tensor, value: bool) -> None:
        before = grad_flag.__get__(tensor)
        grad_flag.__set__(tensor, value)
        if grad_flag.__get__(tensor) != before:
            _tensor_changed(tensor)

    @functools.wraps(requires_grad_)
    def _requires_grad_(tensor: Tensor, requires_grad: bool = True) -> Tensor:
        before = grad_flag.__get__(tensor)
        result = requires_grad_(tensor, requires_grad)
        if grad_flag.__get__(tensor) != before:
            _tensor_changed(tensor)
        return result

    swap_tensors = torch.utils.swap_tensors

    @functools.wraps(swap_tensors)
    def _swap_tensors(t1: Tensor, t2: Tensor) -> None:
        swap_tensors(t1, t2)
        _tensor_changed(t1)
        _tensor_changed(t2)

    tensor_class: Any = torch.Tensor
    _replace(tensor_class, "data", property(data.__get__, set_data, doc=data.__doc__))
    _replace(tensor_class, "requires_grad", property(grad_flag.__get__, set_requires_grad, doc=grad_flag.__doc__))
    _replace(tensor_class, "requires_grad_", _requires_grad_)
    _replace(torch.utils, "swap_tensors", _swap_tensors)
