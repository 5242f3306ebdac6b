"""The task registry: which names a client may submit, and how JSON arguments bind to them.

A task is a plain function registered under a dotted name::

    from tether_server.runtime import TaskContext, task

    @task("demo.sleep")
    def sleep(ctx: TaskContext, seconds: float) -> float: ...

Arguments arrive as JSON (a ``google.protobuf.Struct`` on the wire). :func:`bind_args`
checks them against the function's signature before anything runs, both in the
controller (to refuse a bad request with a clear message) and again on the engine. Only
*simple* annotations are enforced (``int``, ``float``, ``str``, ``bool``, ``list``,
``dict``, each optionally ``| None``); anything richer is passed through untouched.

JSON numbers from a protobuf ``Struct`` always arrive as floats, so an integral float is
accepted for an ``int`` parameter and converted (``3.0`` -> ``3``); ``3.5`` is refused.

A task may also declare a *validator* (``@task("llm.generate", validator=check)``): the
controller calls it with the bound arguments at submit time, so a request that could only
fail on an engine (an unknown model, a prompt longer than the model's context) is refused
before it is queued. It raises :class:`ArgumentError`, whose violations name the fields.
Operator settings that tasks read (``--model NAME=PATH`` for ``llm.generate``) travel with
:func:`configure` / :func:`settings`: the controller hands them to every engine at setup.

Registration happens at import time of the task module, so task modules must be free of
other import-time side effects: engines import them by reference (DESIGN.md section 11).
"""

from __future__ import annotations

import importlib
import inspect
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar, Union, get_args, get_origin

__all__ = [
    "ArgumentError",
    "RegisteredTask",
    "UnknownTaskError",
    "Validator",
    "Violation",
    "bind_args",
    "configure",
    "get",
    "load_modules",
    "names",
    "settings",
    "task",
    "unregister",
    "validate_args",
]

F = TypeVar("F", bound=Callable[..., Any])
Validator = Callable[[Mapping[str, Any]], None]
"""Checks bound arguments at submit time; raises :class:`ArgumentError`."""

CONTEXT_PARAMETER: Final = "ctx"
"""A first parameter with this name receives the :class:`~.context.TaskContext`."""

_NAME_PATTERN: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*$")
_SIMPLE_TYPES: Final[tuple[type, ...]] = (int, float, str, bool, list, dict)
_JSON_TYPE_NAMES: Final[dict[type, str]] = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "a boolean",
    list: "a list",
    dict: "an object",
}


class UnknownTaskError(KeyError):
    """No task is registered under this name."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        known = ", ".join(names()) or "none"
        return f"unknown task {self.name!r} (registered: {known})"


@dataclass(frozen=True, slots=True)
class Violation:
    """One wrong field of a request: ``field`` is a path such as ``args.max_tokens``."""

    field: str
    description: str
    reason: str = "INVALID_ARGUMENTS"
    """The ErrorInfo reason this violation stands for (UPPER_SNAKE_CASE)."""


class ArgumentError(TypeError):
    """Arguments that do not fit a task: its signature or its validator's rules.

    A ``TypeError`` (what :func:`bind_args` always raised), carrying one
    :class:`Violation` per wrong field so the API can answer with a ``BadRequest`` that
    names them. ``reason`` is the first violation's, ``metadata`` extra ErrorInfo data.
    """

    def __init__(
        self,
        task: str,
        violations: list[Violation],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if not violations:
            raise ValueError("an ArgumentError needs at least one violation")
        super().__init__(f"{task}: " + "; ".join(v.description for v in violations))
        self.task = task
        self.violations = list(violations)
        self.metadata: dict[str, str] = dict(metadata or {})

    @property
    def reason(self) -> str:
        return self.violations[0].reason


@dataclass(frozen=True, slots=True)
class _Parameter:
    name: str
    required: bool
    expected: type | None
    """The simple JSON type enforced for this parameter, or None when not checked."""
    optional: bool
    """``None`` is accepted (the annotation was ``X | None``)."""


@dataclass(frozen=True, slots=True)
class RegisteredTask:
    """A registered task function and what the runtime needs to know to call it."""

    name: str
    function: Callable[..., Any]
    cooperative: bool
    """SIGINT only sets ``ctx.interrupted``; the task stops itself (``ctx.check()``)."""
    takes_context: bool
    """The function's first parameter is ``ctx``: it receives a TaskContext."""
    parameters: tuple[_Parameter, ...]
    accepts_any_keyword: bool
    """The function has ``**kwargs``: unknown argument names are passed through."""
    validator: Validator | None = None
    """Submit-time checks beyond the signature (see the module docstring)."""

    @property
    def module(self) -> str:
        return str(getattr(self.function, "__module__", ""))

    @property
    def argument_names(self) -> list[str]:
        return [p.name for p in self.parameters]


_REGISTRY: dict[str, RegisteredTask] = {}
_SETTINGS: dict[str, Any] = {}


def task(
    name: str, *, cooperative: bool = False, validator: Validator | None = None
) -> Callable[[F], F]:
    """Register the decorated function as task ``name``; the function is returned unchanged.

    ``cooperative=True`` means SIGINT never raises inside the task: it sets
    ``ctx.interrupted`` and the task ends itself, e.g. with ``ctx.check()``. SIGTERM still
    raises ``TaskTerminated``.

    Registering a different function under a name already taken raises ``ValueError``;
    re-registering the same function (a module imported again) replaces the entry.
    ``validator`` runs in the controller at submit time, after the arguments bound.
    """
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ValueError(f"invalid task name {name!r}: use dotted identifiers like 'demo.sleep'")

    def register(function: F) -> F:
        registered = _describe(name, function, cooperative, validator)
        existing = _REGISTRY.get(name)
        if existing is not None and _identity(existing.function) != _identity(function):
            raise ValueError(
                f"task {name!r} is already registered by "
                f"{existing.module}.{existing.function.__qualname__}"
            )
        _REGISTRY[name] = registered
        return function

    return register


def unregister(name: str) -> None:
    """Forget task ``name`` if it is registered (tests that register throwaway tasks)."""
    _REGISTRY.pop(name, None)


def get(name: str) -> RegisteredTask:
    """The task registered as ``name``; raises :class:`UnknownTaskError` (a KeyError)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownTaskError(name) from None


def names() -> list[str]:
    """Every registered task name, sorted."""
    return sorted(_REGISTRY)


def validate_args(name: str, args: Mapping[str, Any]) -> None:
    """Raise :class:`ArgumentError` (a ``TypeError``) unless ``args`` suit task ``name``.

    The arguments must bind to the signature, then pass the task's validator if it has
    one. Raises :class:`UnknownTaskError` when no such task is registered.
    """
    registered = get(name)
    bound = bind_args(registered, args)
    if registered.validator is not None:
        registered.validator(bound)


def configure(values: Mapping[str, Any]) -> None:
    """Replace the operator settings tasks read (JSON data, keyed by task family)."""
    _SETTINGS.clear()
    _SETTINGS.update(values)


def settings() -> dict[str, Any]:
    """The operator settings (a copy): what the controller hands to engines at setup."""
    return dict(_SETTINGS)


def bind_args(registered: RegisteredTask, args: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``args`` against the task's signature and return the keyword arguments to call with.

    Integral floats given for ``int`` parameters come back as ints. Raises
    :class:`ArgumentError` (a ``TypeError``) with one violation per wrong argument.
    """
    if not isinstance(args, Mapping):
        problem = Violation("args", f"arguments must be a JSON object, not {_kind(args)}")
        raise ArgumentError(registered.name, [problem])
    problems: list[str] = []
    bound: dict[str, Any] = {}
    known = {p.name: p for p in registered.parameters}
    for key in args:
        if registered.takes_context and key == CONTEXT_PARAMETER:
            problems.append(f"{CONTEXT_PARAMETER!r} is reserved for the task context")
        elif not isinstance(key, str):
            problems.append(f"argument names must be strings, got {key!r}")
        elif key not in known and not registered.accepts_any_keyword:
            accepted = ", ".join(registered.argument_names) or "none"
            problems.append(f"unexpected argument {key!r} (accepted: {accepted})")
    for parameter in registered.parameters:
        if parameter.name not in args:
            if parameter.required:
                problems.append(f"missing required argument {parameter.name!r}")
            continue
        value = args[parameter.name]
        try:
            bound[parameter.name] = _convert(parameter, value)
        except TypeError as exc:
            problems.append(str(exc))
    if problems:
        # One violation on the field "args" as a whole (as it always was); validators
        # name the argument at fault (``args.max_tokens``).
        raise ArgumentError(registered.name, [Violation("args", "; ".join(problems))])
    for key, value in args.items():
        if key not in known:
            bound[key] = value
    return bound


def load_modules(modules: list[str]) -> None:
    """Import each task module; its ``@task`` decorators register its tasks.

    Raises ``ImportError`` naming the module that failed.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(f"cannot import task module {module!r}: {exc}") from exc


# --------------------------------------------------------------------------- internals
def _identity(function: Callable[..., Any]) -> tuple[str, str]:
    return (str(getattr(function, "__module__", "")), function.__qualname__)


def _describe(
    name: str, function: Callable[..., Any], cooperative: bool, validator: Validator | None
) -> RegisteredTask:
    if not callable(function):
        raise TypeError(f"task {name!r}: {function!r} is not callable")
    try:
        signature = inspect.signature(function, eval_str=True)
    except (NameError, TypeError, SyntaxError):
        signature = inspect.signature(function)
    parameters = list(signature.parameters.values())
    takes_context = bool(parameters) and parameters[0].name == CONTEXT_PARAMETER
    if takes_context:
        parameters = parameters[1:]
    described: list[_Parameter] = []
    accepts_any_keyword = False
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            accepts_any_keyword = True
            continue
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
            if parameter.default is inspect.Parameter.empty:
                raise TypeError(
                    f"task {name!r}: positional-only parameter {parameter.name!r} "
                    "cannot be given from JSON arguments"
                )
            continue
        expected, optional = _simple_annotation(parameter.annotation)
        described.append(
            _Parameter(
                name=parameter.name,
                required=parameter.default is inspect.Parameter.empty,
                expected=expected,
                optional=optional or parameter.default is None,
            )
        )
    return RegisteredTask(
        name=name,
        function=function,
        cooperative=cooperative,
        takes_context=takes_context,
        parameters=tuple(described),
        accepts_any_keyword=accepts_any_keyword,
        validator=validator,
    )


def _simple_annotation(annotation: Any) -> tuple[type | None, bool]:
    """(simple type, accepts None) for ``int``, ``int | None``, ``Optional[int]``; else (None, _)."""
    if annotation in _SIMPLE_TYPES:
        return annotation, False
    origin = get_origin(annotation)
    if origin in (list, dict):  # list[str], dict[str, int]: check the container only
        return origin, False
    if origin in (Union, types.UnionType):
        members = [m for m in get_args(annotation) if m is not type(None)]
        if len(members) == 1 and len(get_args(annotation)) == 2:
            inner, _ = _simple_annotation(members[0])
            return inner, True
    return None, False


def _convert(parameter: _Parameter, value: Any) -> Any:
    expected = parameter.expected
    if expected is None or (value is None and parameter.optional):
        return value
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, expected):
        return value
    wanted = _JSON_TYPE_NAMES[expected]
    if parameter.optional:
        wanted += " or null"
    raise TypeError(f"argument {parameter.name!r} must be {wanted}, got {_kind(value)}")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value!r}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
