"""The self-contained modeling code of an export folder, generated from mhmoe's own modules.

An export folder loads without mhmoe installed through transformers' remote-code convention:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("exported/h3", trust_remote_code=True)

config.json's ``auto_map`` names ``configuration_mhmoe.MHMoEConfig`` and
``modeling_mhmoe.MHMoEModel`` / ``modeling_mhmoe.MHMoEForCausalLM``; transformers copies those
files and every sibling they import relatively (``from .name import ...``) into its module cache
and imports them from there. There is one source of truth, as with transformers' modular
converter: ``remote_code_files`` copies ``mhmoe.hf.configuration`` / ``mhmoe.hf.modeling`` and
the closure of the mhmoe modules they import (found from their ``import`` statements) into flat
files, with every ``mhmoe.x.y`` import rewritten to the sibling ``mhmoe_x_y.py``; nothing else
in the text changes. ``tests/test_hf_remote_code.py`` regenerates the files and compares them
byte for byte with an export's, and loads the folder in a Python that cannot import mhmoe.

Rewrites (``ast`` locates the statements; the rest of each line is kept)::

    from mhmoe.model import TransformerLM        ->  from .mhmoe_model import TransformerLM
    from mhmoe import checks                     ->  from . import mhmoe_checks as checks
                                                     from .mhmoe_checks import __name__ as _...

The second line of a module import is there only because transformers finds the sibling files
with the pattern ``from .name import``; ``from . import name`` alone would not be copied.

Importing names from a package's ``__init__`` (``from mhmoe import MoEConfig``), ``import
mhmoe.x`` without ``as`` and relative imports are refused (``RemoteCodeError``): a new import
of such a form in the closure fails the export and its test rather than the user's load. So
is a string constant that starts with ``mhmoe.`` (``importlib.import_module("mhmoe.x")``,
``patch("mhmoe.x.y")``): a module named by a string is not rewritten and would not be copied.
The one place for such strings is a ``__name__`` guard (``if __name__ == "mhmoe.hf.modeling":``,
its test and body), code that runs only in the package, never in a folder's copy.

``save_pretrained`` of the package's models writes these files too (``write_remote_code``), so a
folder saved by transformers from a model of the package loads where mhmoe is not installed.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from pathlib import Path

from mhmoe.hf.naming import ExportError
from mhmoe.runs.atomic import atomic_write_json, atomic_write_text
from mhmoe.version import __version__

PACKAGE = "mhmoe"
# Package module -> file name in the export folder (transformers' naming for the entry points).
ENTRY_FILES: dict[str, str] = {
    "mhmoe.hf.configuration": "configuration_mhmoe.py",
    "mhmoe.hf.modeling": "modeling_mhmoe.py",
}
# config.json "auto_map": Auto class -> "<file stem>.<class>".
AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_mhmoe.MHMoEConfig",
    "AutoModel": "modeling_mhmoe.MHMoEModel",
    "AutoModelForCausalLM": "modeling_mhmoe.MHMoEForCausalLM",
}


class RemoteCodeError(ExportError):
    """The package source uses an import form that the flat remote-code copy cannot carry
    (an ``ExportError``, so a ValueError: the CLI prints it as one line)."""


def flat_file_name(module: str) -> str:
    """The file of package module ``module`` in an export folder (``mhmoe.layers.moe`` -> ``mhmoe_layers_moe.py``)."""
    return ENTRY_FILES.get(module, module.replace(".", "_") + ".py")


def _source_path(module: str) -> Path | None:
    """The .py file of ``module`` (None when it is not a module of mhmoe)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _is_package(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.submodule_search_locations is not None


def _is_module(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _mhmoe_imports(module: str, tree: ast.Module) -> list[tuple[ast.stmt, list[tuple[str, str | None, str | None]]]]:
    """The mhmoe import statements of ``module``: (node, [(target module, imported name, alias)]).

    ``imported name`` is None when the statement binds the module itself.
    """
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                raise RemoteCodeError(f"{module}: relative import 'from {'.' * node.level}{node.module or ''} "
                                      "import ...': use absolute mhmoe imports (the remote-code copy rewrites them)")
            if node.module != PACKAGE and not (node.module or "").startswith(PACKAGE + "."):
                continue
            targets = []
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if _is_module(submodule):
                    targets.append((submodule, None, alias.asname or alias.name))
                elif _is_package(node.module):
                    raise RemoteCodeError(
                        f"{module}: 'from {node.module} import {alias.name}' imports from a package's "
                        "__init__: import it from the module that defines it"
                    )
                else:
                    targets.append((node.module, alias.name, alias.asname))
            found.append((node, targets))
        elif isinstance(node, ast.Import):
            names = [a for a in node.names if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")]
            if not names:
                continue
            if len(names) != len(node.names) or any(a.asname is None for a in names):
                raise RemoteCodeError(
                    f"{module}: 'import {', '.join(a.name for a in node.names)}': write "
                    "'from mhmoe.x import y' or 'import mhmoe.x.y as z' for mhmoe modules"
                )
            found.append((node, [(a.name, None, a.asname) for a in names]))
    return found


def _is_name_guard(node: ast.AST) -> bool:
    """Whether ``node`` is ``if __name__ == "...":`` (code for the package or the copy only)."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _check_module_strings(path: Path, tree: ast.Module) -> None:
    """Refuse string constants naming mhmoe modules outside ``__name__`` guards (module docstring)."""
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if _is_name_guard(node):
            guarded.update(id(inner) for inner in ast.walk(node))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):  # a docstring: inert
            guarded.add(id(node.value))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and node.value.startswith(PACKAGE + ".") and id(node) not in guarded):
            raise RemoteCodeError(
                f"{path}:{node.lineno}: the string {node.value[:60]!r} names an mhmoe module, which the "
                "export's flat copy of this file would not rewrite: import the module with a "
                "'from mhmoe.x import y' statement, or keep the string inside an 'if __name__ == ...' guard"
            )


def _rewritten(node: ast.stmt, targets: list[tuple[str, str | None, str | None]], indent: str) -> list[str]:
    lines = []
    names = [f"{name} as {alias}" if alias else name for target, name, alias in targets if name is not None]
    if names:
        lines.append(f"{indent}from .{flat_file_name(targets[0][0])[:-3]} import {', '.join(names)}")
    for target, name, alias in targets:
        if name is None:
            stem = flat_file_name(target)[:-3]
            lines.append(f"{indent}from . import {stem} as {alias}")
            lines.append(f"{indent}from .{stem} import __name__ as _{stem}_name  # for transformers' file copier")
    return lines


def _generate(module: str) -> tuple[str, list[str]]:
    """(flat source of ``module``, the mhmoe modules it imports)."""
    path = _source_path(module)
    if path is None:
        raise RemoteCodeError(f"{module}: no Python source file to copy into an export")
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, filename=str(path))
    _check_module_strings(path, tree)
    lines = text.splitlines(keepends=True)
    replacements: dict[int, tuple[int, list[str]]] = {}
    needed: list[str] = []
    for node, targets in _mhmoe_imports(module, tree):
        first, last = node.lineno - 1, node.end_lineno - 1
        indent = lines[first][: node.col_offset]
        if lines[first][: node.col_offset].strip() or lines[last][node.end_col_offset:].strip(" \t\r\n").split("#")[0]:
            raise RemoteCodeError(f"{path}:{node.lineno}: put the mhmoe import on lines of its own")
        replacements[first] = (last, _rewritten(node, targets, indent))
        needed.extend(target for target, _, _ in targets)
    out: list[str] = [
        (f"# Generated from {PACKAGE}/{path.relative_to(_package_root()).as_posix()} by mhmoe.hf.remote_code "
         f"(mhmoe {__version__}).\n"),
        "# Imports of mhmoe modules point to the sibling files of this folder; do not edit, re-export.\n",
    ]
    index = 0
    while index < len(lines):
        if index in replacements:
            last, new = replacements[index]
            out.extend(line + "\n" for line in new)
            index = last + 1
        else:
            out.append(lines[index])
            index += 1
    return "".join(out), needed


def _package_root() -> Path:
    path = _source_path(PACKAGE)
    assert path is not None  # mhmoe/__init__.py
    return path.parent


def remote_code_files() -> dict[str, str]:
    """{file name: source} of the export folder's modeling code (module docstring), sorted by name."""
    files: dict[str, str] = {}
    pending = list(ENTRY_FILES)
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        source, needed = _generate(module)
        files[flat_file_name(module)] = source
        pending.extend(needed)
    return dict(sorted(files.items()))


def write_remote_code(folder: str | os.PathLike, files: dict[str, str] | None = None) -> list[str]:
    """Write the generated modeling files (``remote_code_files()``, or ``files``) into ``folder``
    and set ``AUTO_MAP`` as config.json's "auto_map" (other keys kept), each file atomically.

    The code files come first, config.json last, so a folder whose config names the code holds
    it. Returns the names written. RemoteCodeError (before writing) when the files cannot be
    generated; ExportError when config.json is missing or not a JSON object.
    """
    folder = Path(folder)
    files = remote_code_files() if files is None else files
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ExportError(f"{config_path}: cannot add the auto_map of the modeling code ({err})") from err
    if not isinstance(config, dict):
        raise ExportError(f"{config_path}: not a JSON object, cannot add the auto_map of the modeling code")
    for name, source in files.items():
        atomic_write_text(folder / name, source)
    config["auto_map"] = {**config.get("auto_map", {}), **AUTO_MAP}
    atomic_write_json(config_path, config)
    return [*files, config_path.name]
