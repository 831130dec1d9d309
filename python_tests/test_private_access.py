"""No module reaches into another module's private fields (docs/design.md section 4).

A private name is one a d3kernels module defines with a leading underscore: an attribute it assigns on
self / cls, a method, a module-level function, class or variable. The package, bench/ and
custom_generate/ may use such a name only in the module that defines it (`other._x` and
`from .mod import _x` elsewhere fail). Private modules (`_ops`, `_C`, triton's `_attn`...) are the
package's structure, not fields, so importing them is allowed. Tests may look inside (white-box tests of
one module), and are not scanned.
"""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ["d3kernels/**/*.py", "bench/*.py", "custom_generate/**/*.py"]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _files(patterns) -> list:
    out = []
    for p in patterns:
        out += glob.glob(os.path.join(ROOT, p), recursive=True)
    return sorted(out)


def _defined(tree: ast.AST) -> set:
    """The private names a module defines."""
    names = set()
    for n in ast.walk(tree):
        if (isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and isinstance(n.value, ast.Name)
                and n.value.id in ("self", "cls") and _private(n.attr)):
            names.add(n.attr)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _private(n.name):
            names.add(n.name)
        elif isinstance(n, (ast.Assign, ast.AnnAssign)):
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
                if isinstance(t, ast.Name) and _private(t.id):
                    names.add(t.id)
    return names


def _module_names() -> set:
    """Private module names of the package (importing those is structure, not a reach-in)."""
    return {os.path.splitext(os.path.basename(p))[0].split(".")[0]
            for p in glob.glob(os.path.join(ROOT, "d3kernels", "**", "_*"), recursive=True)}


def _violations(path: str, own: set, private: set, modules: set) -> list:
    tree = ast.parse(open(path).read())
    rel = os.path.relpath(path, ROOT)
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and _private(n.attr) and n.attr in private and n.attr not in own:
            if not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls")) and n.attr not in modules:
                out.append(f"{rel}:{n.lineno}: .{n.attr}")
        elif isinstance(n, ast.ImportFrom):
            for a in n.names:
                if _private(a.name) and a.name in private and a.name not in own and a.name not in modules:
                    out.append(f"{rel}:{n.lineno}: from {n.module} import {a.name}")
    return out


def test_no_module_reaches_into_another_modules_private_fields():
    pkg = {p: _defined(ast.parse(open(p).read())) for p in _files(["d3kernels/**/*.py"])}
    private, modules = set().union(*pkg.values()), _module_names()
    wrong = []
    for path in _files(SCANNED):
        wrong += _violations(path, pkg.get(path, set()), private, modules)
    assert not wrong, "private names used outside the module that defines them:\n" + "\n".join(wrong)


def test_the_checker_catches_a_reach_in(tmp_path):
    """The checker itself: a reach-in through an attribute and through an import are both found; the
    defining module's own use and a private module's import are not."""
    bad = tmp_path / "bad.py"
    bad.write_text("from d3kernels.step import _helper\nfrom d3kernels import _ops\n"
                   "def f(dec):\n    return dec._lengths, dec.core.tokens\n")
    found = _violations(str(bad), set(), {"_lengths", "_helper", "_ops"}, {"_ops"})
    assert len(found) == 2 and "._lengths" in found[1] and "import _helper" in found[0], found
    assert _violations(str(bad), {"_lengths", "_helper"}, {"_lengths", "_helper"}, set()) == []
