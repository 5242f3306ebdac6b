"""The public surface of the ``tether`` package: what it exports, and sync/async symmetry."""

from __future__ import annotations

import inspect

import pytest

import tether


def test_every_name_in_all_is_importable_and_presented_as_tether_x() -> None:
    for name in tether.__all__:
        value = getattr(tether, name)
        module = getattr(value, "__module__", None)
        if inspect.isclass(value):
            assert module == "tether", name


def test_no_private_or_generated_names_leak_into_all() -> None:
    assert not [name for name in tether.__all__ if name.startswith("_") and name != "__version__"]
    assert "v1" not in tether.__all__


def test_every_exception_derives_from_tether_error() -> None:
    exceptions = [
        value
        for value in map(lambda name: getattr(tether, name), tether.__all__)
        if inspect.isclass(value) and issubclass(value, BaseException)
    ]
    assert len(exceptions) > 15
    assert all(issubclass(exc, tether.TetherError) for exc in exceptions)


def test_the_exception_tree_in_the_docstring_names_every_exception() -> None:
    from tether import _exceptions

    documented = _exceptions.__doc__ or ""
    for name in _exceptions.__all__:
        if name != "FieldViolation":
            assert name in documented, name


def _public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and callable(member)
    }


@pytest.mark.parametrize(
    ("sync", "asynchronous", "renamed"),
    [
        (tether.Client, tether.AsyncClient, {}),
        (tether.TaskHandle, tether.AsyncTaskHandle, {}),
        (tether.TaskWatch, tether.AsyncTaskWatch, {"close": "aclose"}),
    ],
)
def test_sync_and_async_twins_offer_the_same_methods_with_the_same_parameters(
    sync: type, asynchronous: type, renamed: dict[str, str]
) -> None:
    sync_methods = _public_methods(sync)
    async_methods = _public_methods(asynchronous)
    assert {renamed.get(name, name) for name in sync_methods} == set(async_methods)
    for name, signature in sync_methods.items():
        other = async_methods[renamed.get(name, name)]
        assert list(signature.parameters) == list(other.parameters), name
        for parameter, twin in zip(
            signature.parameters.values(), other.parameters.values(), strict=True
        ):
            assert (parameter.kind, parameter.default) == (twin.kind, twin.default), name
