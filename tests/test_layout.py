"""The layering the README promises: every module is in its layout table, and imports only
point down (the cores know nothing of torch, trio or libp2p; only the host adapter imports
libp2p; the simulator needs no network)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "peerlearn"

# package (or module) -> top-level names its modules must not import
FORBIDDEN = {
    "peerlearn/gossip": {"torch", "trio", "libp2p", "peerlearn.node", "peerlearn.learning"},
    "peerlearn/learning": {"trio", "libp2p", "peerlearn.node", "peerlearn.sim"},
    "peerlearn/sim": {"trio", "libp2p", "peerlearn.node"},
    "peerlearn/nat/policy.py": {"trio", "libp2p", "peerlearn.node"},
    "peerlearn/node": {"peerlearn.cli", "peerlearn.testnet", "peerlearn.sim"},
}
LIBP2P_ADAPTER = "peerlearn/node/host.py"


def _modules() -> list[str]:
    return sorted(
        str(p.relative_to(ROOT))
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py" or p.parent == PACKAGE
    )


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _layout_paths() -> set[str]:
    """Paths in the README's layout table: a full path, then names in the same folder."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    paths: set[str] = set()
    for row in table.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        for cell in cells:
            folder = ""
            for name in re.findall(r"`([^`]+)`", cell):
                if "/" in name:
                    folder = name.rsplit("/", 1)[0]
                    paths.add(name)
                elif folder and name.endswith(".py"):
                    paths.add(f"{folder}/{name}")
    return paths


def test_the_readme_layout_table_lists_every_module() -> None:
    listed = _layout_paths()
    missing = [m for m in _modules() if m not in listed]
    assert not missing, f"modules missing from README's layout table: {missing}"
    gone = [p for p in listed if p.endswith(".py") and not (ROOT / p).exists()]
    assert not gone, f"README's layout table lists modules that do not exist: {gone}"


@pytest.mark.parametrize("module", _modules())
def test_imports_point_down(module: str) -> None:
    imported = _imports(ROOT / module)
    for scope, forbidden in FORBIDDEN.items():
        if module == scope or module.startswith(scope + "/"):
            bad = {n for n in imported for f in forbidden if n == f or n.startswith(f + ".")}
            assert not bad, f"{module} imports {sorted(bad)}"
    if module != LIBP2P_ADAPTER:
        assert not any(n == "libp2p" or n.startswith("libp2p.") for n in imported), module
