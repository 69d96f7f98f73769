"""Imports go down the layers (DESIGN.md): the pure protocol modules touch no socket, thread or
other I/O, so every parser can be tested with plain bytes."""

import ast

import pytest

from conftest import ROOT

PURE = ["errors", "address", "socks5", "socks4", "aead", "aead2022", "replay", "codec", "config", "policy", "session", "hookspecs", "ssurl", "associations", "protocol"]
IO_MODULES = {"socket", "select", "selectors", "socketserver", "urllib.request", "http.client", "subprocess", "asyncio"}
IO_RELAY = {"net", "pump", "server", "udp", "upstream", "runner", "cli", "plugin_manager", "testing", "sip008", "threads", "workers"}


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_import_no_io(name):
    tree = ast.parse((ROOT / "relay" / f"{name}.py").read_text())
    for node in ast.walk(tree):  # annotations only: `if TYPE_CHECKING:` imports do not run
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            imported.add(("." * node.level) + module)
    assert not imported & IO_MODULES, f"relay/{name}.py imports {imported & IO_MODULES}"
    assert not {m.lstrip(".") for m in imported if m.startswith(".")} & IO_RELAY, f"relay/{name}.py imports an I/O module of relay"
