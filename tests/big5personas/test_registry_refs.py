"""Adapter references (``name`` or ``name@version``) from clients: bad ones are refused, never a 500."""

from __future__ import annotations

import pytest

from big5personas.registry import AdapterRef, RegistryError


@pytest.mark.parametrize(("text", "name", "version"), [("sft-unified", "sft-unified", None), ("a@3", "a", 3)])
def test_good_references(text: str, name: str, version: int | None) -> None:
    ref = AdapterRef.parse(text)
    assert (ref.name, ref.version) == (name, version)
    assert str(ref) == text


@pytest.mark.parametrize("text", ["x@\u00b2", "x@\u0663", "x@99999999999", "x@2147483648", "@1", "x@", "x@-1", "x@1.0"])
def test_bad_references_are_refused(text: str) -> None:
    with pytest.raises(RegistryError, match="bad adapter reference"):
        AdapterRef.parse(text)
