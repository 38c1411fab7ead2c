"""The gateway's uses of its dependencies' private attributes, each behind one door:
aiohttp's in ``gateway/aiohttp_private.py``, prometheus-client's in ``gateway/metrics.py`` (which
today uses none: it finds series through the public ``collect()``).

``missing()`` says what of aiohttp's internals an installed aiohttp lacks; a static scan says
that no other module reaches into either library.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import importlib
import inspect
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import prometheus_client
import pytest
from aiohttp import base_protocol, http_writer, web
from aiohttp.test_utils import make_mocked_request

from gateway import aiohttp_private
from gateway.aiohttp_private import OneWrite, missing

from ..helpers import PACKAGE, ROOT, gateway_modules

# -- missing() ---------------------------------------------------------------------------------


UPGRADE = (
    "which the gateway relies on: update gateway/aiohttp_private.py (and its _SLOTS) for this "
    "aiohttp before upgrading it (see the README on upgrading one dependency)"
)


def slot_names(cls: type) -> set[str]:
    return {name for klass in cls.__mro__ for name in getattr(klass, "__slots__", ())}


async def example(cls: type, server: web.Server) -> Any:
    """A fresh instance of one of the classes in ``_SLOTS`` (for instance attributes)."""
    loop = asyncio.get_running_loop()
    if issubclass(cls, web.RequestHandler):
        return cls(server, loop=loop)
    if issubclass(cls, base_protocol.BaseProtocol):
        return cls(loop)
    if issubclass(cls, aiohttp.ClientSession):
        return cls()
    if issubclass(cls, web.BaseRequest):
        return make_mocked_request("GET", "/")
    return None


async def _never_called(request: web.BaseRequest) -> web.StreamResponse:
    raise NotImplementedError


async def really_missing(server: web.Server | None = None) -> list[str]:
    """What ``missing()`` should say, found independently: each ``_SLOTS`` attribute looked
    for on the class (attributes, slots) and on a fresh instance (what ``__init__`` sets);
    request handlers are made for ``server`` (default: a new one)."""
    server = server or web.Server(_never_called)
    gone = []
    for cls, name in aiohttp_private._SLOTS:
        if name in slot_names(cls) or hasattr(cls, name):
            continue
        instance = await example(cls, server)
        try:
            if instance is None or not hasattr(instance, name):
                gone.append(f"{cls.__name__}.{name}")
        finally:
            if isinstance(instance, aiohttp.ClientSession):
                await instance.close()
    if "_serialize_headers" not in vars(http_writer):
        gone.append("http_writer._serialize_headers")
    for name in ("_send_headers_immediately", "_prepare_headers"):
        if name not in vars(web.StreamResponse):
            gone.append(f"StreamResponse.{name}")
    return gone


async def test_the_installed_aiohttp_has_every_private_attribute_the_gateway_uses() -> None:
    gone = await really_missing()
    assert gone == [], f"aiohttp {aiohttp.__version__} no longer has {', '.join(gone)}, {UPGRADE}"


def test_missing_finds_nothing_missing_in_the_installed_aiohttp() -> None:
    gone = missing()
    assert gone == [], f"aiohttp {aiohttp.__version__} no longer has {', '.join(gone)}, {UPGRADE}"


async def test_missing_names_what_an_upgrade_took_away(monkeypatch: pytest.MonkeyPatch) -> None:
    before, before_independently = missing(), await really_missing()
    server = web.Server(_never_called)
    monkeypatch.setattr(
        aiohttp_private,
        "_SLOTS",
        (*aiohttp_private._SLOTS, (web.RequestHandler, "_gone_in_a_later_aiohttp")),
    )
    monkeypatch.delattr(web.StreamResponse, "_send_headers_immediately")
    monkeypatch.delattr(web.StreamResponse, "_prepare_headers")
    taken = [
        "RequestHandler._gone_in_a_later_aiohttp",
        "StreamResponse._send_headers_immediately",
        "StreamResponse._prepare_headers",
    ]
    assert [name for name in missing() if name not in before] == taken
    independently = await really_missing(server)
    assert [name for name in independently if name not in before_independently] == taken


def test_the_door_documents_every_attribute_missing_checks() -> None:
    doc = aiohttp_private.__doc__ or ""
    for _, name in aiohttp_private._SLOTS:
        assert f"``{name}``" in doc or f".{name}``" in doc, name


def test_one_write() -> None:
    assert OneWrite._send_headers_immediately is False
    assert web.StreamResponse._send_headers_immediately is True  # what OneWrite changes


# -- the static scan ---------------------------------------------------------------------------

AIOHTTP_DOOR = PACKAGE / "aiohttp_private.py"
PROMETHEUS_DOOR = PACKAGE / "metrics.py"
LIBRARIES: dict[str, Path] = {"aiohttp": AIOHTTP_DOOR, "prometheus_client": PROMETHEUS_DOOR}


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def names_defined(tree: ast.AST) -> set[str]:
    """The private names a library's source defines on its objects: ``self._x =``
    assignments, and methods, class attributes and ``__slots__`` entries of its classes."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            names.add(node.attr)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    names.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    for target in item.targets:
                        if not isinstance(target, ast.Name):
                            continue
                        names.add(target.id)
                        if target.id == "__slots__" and isinstance(
                            item.value, ast.Tuple | ast.List
                        ):
                            names |= {
                                e.value
                                for e in item.value.elts
                                if isinstance(e, ast.Constant) and isinstance(e.value, str)
                            }
    return {name for name in names if private(name)}


@functools.cache
def library_private_names(library: str) -> frozenset[str]:
    """Every private attribute name ``library``'s own source defines anywhere."""
    package = importlib.import_module(library)
    assert package.__file__ is not None
    names: set[str] = set()
    for path in Path(package.__file__).parent.rglob("*.py"):
        names |= names_defined(ast.parse(path.read_text(encoding="utf-8")))
    return frozenset(names)


@functools.cache
def class_private_names(cls: type) -> frozenset[str]:
    """The private names ``cls`` and its bases define (attributes, slots, ``self._x``)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object:
            continue
        names |= {name for name in vars(klass) if private(name)}
        names |= {name for name in getattr(klass, "__slots__", ()) if private(name)}
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue  # a class without Python source (a C extension's)
        names |= names_defined(ast.parse(source))
    return frozenset(names)


@dataclass(frozen=True)
class Reach:
    """One place a module reaches into a library's privates."""

    library: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.what} ({self.library})"


def resolve(dotted: str) -> object | None:
    """The object a dotted name denotes (a module or an attribute of one), or None."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj
    return None


def library_of(obj: object) -> str | None:
    module = obj.__name__ if isinstance(obj, ModuleType) else getattr(obj, "__module__", None)
    if not isinstance(module, str):
        return None
    top = module.partition(".")[0]
    return top if top in LIBRARIES else None


def aliases(tree: ast.Module) -> dict[str, str]:
    """Local names bound by imports of the libraries: ``web`` -> ``aiohttp.web``."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    top = alias.name.partition(".")[0]
                    bound[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return {name: target for name, target in bound.items() if target.partition(".")[0] in LIBRARIES}


def dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def reaches(source: str, skip: frozenset[str] = frozenset()) -> list[Reach]:
    """Where ``source`` touches a private attribute of aiohttp or prometheus-client (libraries
    in ``skip`` not checked): a private name of the library on any object but ``self``/``cls``,
    through ``getattr``-like calls too; ``self._x`` or a class attribute in a subclass of one
    of the library's classes, where that class defines ``_x``; a private name or module
    imported from the library."""
    tree = ast.parse(source)
    bound = aliases(tree)
    local = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    found: list[Reach] = []

    def check_name(name: str, line: int, what: str) -> None:
        if any(name in library_private_names(library) for library in skip):
            return  # in a door, a name its library has is that library's (``_kwargs``: both)
        for library in LIBRARIES:
            if name in library_private_names(library):
                found.append(Reach(library, line, what))

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                check_name(node.attr, node.lineno, f"{ast.unparse(node)}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and private(node.args[1].value)
        ):
            check_name(node.args[1].value, node.lineno, ast.unparse(node))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            library = node.module.partition(".")[0]
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                if (
                    library in LIBRARIES
                    and library not in skip
                    and any(map(private, dotted.split(".")))
                ):
                    found.append(
                        Reach(library, node.lineno, f"from {node.module} import {alias.name}")
                    )
        elif isinstance(node, ast.Import):
            for alias in node.names:
                library = alias.name.partition(".")[0]
                if (
                    library in LIBRARIES
                    and library not in skip
                    and any(map(private, alias.name.split(".")))
                ):
                    found.append(Reach(library, node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ClassDef):
            found += subclass_reaches(node, bound, skip, local)
    return sorted(found, key=lambda r: (r.line, r.what))


def library_bases(
    node: ast.ClassDef,
    bound: dict[str, str],
    local: dict[str, ast.ClassDef],
    seen: frozenset[str] = frozenset(),
) -> Iterator[type]:
    """The library classes ``node`` derives from: its bases imported from a library, and
    theirs of its bases defined in the same module (``class B(A)`` with ``class
    A(web.StreamResponse)``)."""
    seen |= {node.name}  # (a cycle is not Python anyway)
    for base in node.bases:
        dotted = dotted_name(base)
        if dotted is None:
            continue
        if dotted in local:
            if dotted not in seen:
                yield from library_bases(local[dotted], bound, local, seen)
            continue
        head, _, rest = dotted.partition(".")
        if head in bound:
            cls = resolve(bound[head] + (f".{rest}" if rest else ""))
            if isinstance(cls, type):
                yield cls


def subclass_reaches(
    node: ast.ClassDef, bound: dict[str, str], skip: frozenset[str], local: dict[str, ast.ClassDef]
) -> list[Reach]:
    found = []
    for cls in library_bases(node, bound, local):
        library = library_of(cls)
        if library is None or library in skip:
            continue
        inherited = class_private_names(cls)
        for item in ast.walk(node):
            if (
                isinstance(item, ast.Attribute)
                and isinstance(item.value, ast.Name)
                and item.value.id in ("self", "cls")
                and item.attr in inherited
            ):
                found.append(Reach(library, item.lineno, f"{node.name}: {ast.unparse(item)}"))
        for item in node.body:
            targets: list[ast.expr] = []
            if isinstance(item, ast.Assign):
                targets = item.targets
            elif isinstance(item, ast.AnnAssign):
                targets = [item.target]
            elif (
                isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name in inherited
            ):
                found.append(Reach(library, item.lineno, f"{node.name}.{item.name}()"))
            for target in targets:
                if isinstance(target, ast.Name) and target.id in inherited:
                    found.append(Reach(library, item.lineno, f"{node.name}.{target.id} ="))
    return found


def doors_closed(path: Path) -> frozenset[str]:
    """The libraries whose privates ``path`` may touch: the one whose door it is."""
    return frozenset(library for library, door in LIBRARIES.items() if door == path)


def all_reaches() -> Iterator[tuple[Path, list[Reach]]]:
    for path in gateway_modules().values():
        found = reaches(path.read_text(encoding="utf-8"), doors_closed(path))
        if found:
            yield path, found


def test_the_scan_knows_the_libraries_private_names() -> None:
    aiohttp_names = library_private_names("aiohttp")
    relied_on = {"_send_headers_immediately", "_prepare_headers", "_loop"}
    relied_on |= {name for _, name in aiohttp_private._SLOTS if name.startswith("_")}
    assert relied_on <= aiohttp_names
    assert {"_parser", "_buffer_paused"} <= relied_on
    assert {"_metrics", "_lock", "_value", "_labelnames"} <= library_private_names(
        "prometheus_client"
    )
    assert "_message_tail" in class_private_names(web.RequestHandler)
    assert "_send_headers_immediately" in class_private_names(web.StreamResponse)
    assert "_metrics" in class_private_names(prometheus_client.Counter)


def test_no_module_but_the_doors_touches_aiohttp_or_prometheus_privates() -> None:
    found = {str(path.relative_to(ROOT)): [str(r) for r in reach] for path, reach in all_reaches()}
    assert found == {}, (
        "private attributes of aiohttp or prometheus-client used outside their one module "
        "(move each use into gateway/aiohttp_private.py, or gateway/metrics.py for "
        f"prometheus-client): {found}"
    )


def test_metrics_uses_no_private_attribute_of_prometheus_client() -> None:
    """Today's door for prometheus-client has nothing behind it; a use added there needs a
    check like ``aiohttp_private.missing()`` (and a test) so that an upgrade cannot break it
    unseen."""
    found = [str(r) for r in reaches(PROMETHEUS_DOOR.read_text(encoding="utf-8"))]
    assert found == [], (
        f"gateway/metrics.py uses prometheus-client's private attributes: {found}; list them "
        "with a missing() check that a unit test runs, as gateway/aiohttp_private.py does"
    )


def test_the_scan_finds_what_the_aiohttp_door_uses() -> None:
    """The door itself, scanned as any other module: every use it documents is found."""
    found = {r.what for r in reaches(AIOHTTP_DOOR.read_text(encoding="utf-8"))}
    for what in (
        "ParsingProtocol: self._parser",
        "ParsingProtocol: self._upgraded",
        "ParsingProtocol: self._buffer_paused",
        "ParsingProtocol: self._pause_reading_for_buffer",
        "site._server",
        "OneWrite._send_headers_immediately =",
        "Relayed._prepare_headers()",
    ):
        assert what in found, what


WEB = "from aiohttp import web"
SCANNED = [  # (the lines of a module, what the scan reports)
    (["def f(metric):", "    return metric._metrics"],
     ["line 2: metric._metrics (prometheus_client)"]),
    (["def f(r):", "    r._message_tail = b''"], ["line 2: r._message_tail (aiohttp)"]),
    (["def f(s):", "    return getattr(s, '_retry_connection')"],
     ["line 2: getattr(s, '_retry_connection') (aiohttp)"]),
    (["from aiohttp.web_protocol import _RequestFactory"],
     ["line 1: from aiohttp.web_protocol import _RequestFactory (aiohttp)"]),
    ([WEB, "class R(web.StreamResponse):", "    _send_headers_immediately = False"],
     ["line 3: R._send_headers_immediately = (aiohttp)"]),
    ([WEB, "class P(web.RequestHandler):", "    def f(self):", "        self._force_close = 1"],
     ["line 4: P: self._force_close (aiohttp)"]),
    # A subclass of a subclass defined beside it reaches its library class all the same.
    ([WEB, "class A(web.StreamResponse):", "    pass", "class B(A):",
      "    _send_headers_immediately = False"],
     ["line 5: B._send_headers_immediately = (aiohttp)"]),
    # The gateway's own private names on its own objects, or on subclasses whose library
    # class has no such name, are no business of the scan; nor are other libraries'.
    (["class Book:", "    def f(self):", "        return self._metrics"], []),
    ([WEB, "class P(web.RequestHandler):", "    def f(self):", "        self._gateway_own = 1"],
     []),
    (["import os", "os._exit(0)"], []),
]  # fmt: skip


@pytest.mark.parametrize(("lines", "expected"), SCANNED)
def test_the_scan_itself(lines: list[str], expected: list[str]) -> None:
    assert [str(r) for r in reaches("\n".join(lines) + "\n")] == expected
