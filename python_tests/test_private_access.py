"""No module reaches into another module's private fields (docs/design.md section 4).

A private name is one a d3kernels module defines with a leading underscore: an attribute a class assigns
on self / cls, a method, a class attribute, a module-level function, class or variable. Each is matched to
where it is defined, a class or a module:

- `self._x` / `cls._x` inside class C: C, or a base of C in the same file, defines _x;
- `obj._x` and `getattr(obj, "_x")` (also setattr, hasattr, delattr): obj's class, when the file says it
  (a parameter annotation, `C(...)._x`, `obj = C(...)`, or `obj = f(...)` with f's return annotation
  naming C), is a class of this file that defines _x; otherwise this module defines _x and no other
  module does (a name several modules define is ambiguous: access it through self or say obj's class);
- `mod._x` on an imported package module, and `from mod import _x`: never (a reach-in).

ALLOWED lists the exceptions, each with its reason.

The package, bench/ and custom_generate/ are scanned. Private modules (`_ops`, `_C`, triton's `_attn`...)
are the package's structure, not fields, so importing them is allowed. Tests may look inside (white-box
tests of one module), and are not scanned.
"""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ["d3kernels/**/*.py", "bench/*.py", "custom_generate/**/*.py"]
ATTR_FUNCTIONS = ("getattr", "setattr", "hasattr", "delattr")
# (file, access): why it is allowed
ALLOWED = {
    ("d3kernels/_ops.py", "self._launch"): "launcher_method builds methods of the kernels classes (CudaKernels "
                                           "here, cpu.CpuKernels), and each of them defines _launch",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _files(patterns) -> list:
    out = []
    for p in patterns:
        out += glob.glob(os.path.join(ROOT, p), recursive=True)
    return sorted(out)


class _Defs:
    """What one file defines: by class (self / cls attributes, methods, class attributes), the classes'
    bases, module-level private names, and functions' return annotations (the names in them)."""

    def __init__(self, tree: ast.AST):
        self.by_class, self.bases, self.module, self.returns = {}, {}, set(), {}
        for n in ast.walk(tree):
            if isinstance(n, ast.ClassDef):
                names = self.by_class.setdefault(n.name, set())
                self.bases[n.name] = {b.id for b in n.bases if isinstance(b, ast.Name)}
                for item in n.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(item.name):
                        names.add(item.name)
                    for t in _targets(item):
                        if isinstance(t, ast.Name) and _private(t.id):
                            names.add(t.id)
                for m in ast.walk(n):
                    if (isinstance(m, ast.Attribute) and isinstance(m.ctx, ast.Store) and isinstance(m.value, ast.Name)
                            and m.value.id in ("self", "cls") and _private(m.attr)):
                        names.add(m.attr)
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if n.returns is not None:
                    self.returns[n.name] = _names_in(n.returns)
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _private(n.name):
                self.module.add(n.name)
            for t in _targets(n):
                if isinstance(t, ast.Name) and _private(t.id):
                    self.module.add(t.id)

    def all(self) -> set:
        return self.module.union(*self.by_class.values())

    def class_defines(self, cls: str, name: str, seen=()) -> bool:
        """Whether class `cls` of this file, or a base of it in this file, defines `name`."""
        if cls not in self.by_class or cls in seen:
            return False
        return name in self.by_class[cls] or any(self.class_defines(b, name, seen + (cls,)) for b in self.bases[cls])


def _targets(n: ast.AST) -> list:
    if isinstance(n, ast.Assign):
        return n.targets
    if isinstance(n, ast.AnnAssign):
        return [n.target]
    return []


def _names_in(annotation: ast.AST) -> set:
    """The names an annotation mentions (Optional[C], "C", C | None)."""
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        try:
            annotation = ast.parse(annotation.value, mode="eval")
        except SyntaxError:
            return set()
    return {n.id for n in ast.walk(annotation) if isinstance(n, ast.Name)}


def _module_names() -> set:
    """Private module names of the package (importing those is structure, not a reach-in)."""
    return {os.path.splitext(os.path.basename(p))[0].split(".")[0]
            for p in glob.glob(os.path.join(ROOT, "d3kernels", "**", "_*"), recursive=True)}


def _package_modules(tree: ast.AST) -> set:
    """The names this file binds to d3kernels modules (import d3kernels.x as y, from . import x, ...)."""
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out |= {(a.asname or a.name).split(".")[0] for a in n.names if a.name.startswith("d3kernels")}
        elif isinstance(n, ast.ImportFrom) and (n.level > 0 or (n.module or "").startswith("d3kernels")):
            out |= {a.asname or a.name for a in n.names}
    return out


def _variable_types(func: ast.AST, defs: _Defs) -> dict:
    """{variable: class names} inside one function: from parameter annotations, `v = C(...)` and
    `v = f(...)` where f's return annotation names C."""
    types = {}
    args = func.args
    for a in args.posonlyargs + args.args + args.kwonlyargs:
        if a.annotation is not None:
            types.setdefault(a.arg, set()).update(_names_in(a.annotation))
    for n in ast.walk(func):
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call) and isinstance(n.value.func, ast.Name):
            f = n.value.func.id
            classes = {f} if f in defs.by_class else defs.returns.get(f, set())
            for t in n.targets:
                if isinstance(t, ast.Name):
                    types.setdefault(t.id, set()).update(classes)
    return types


def _accesses(tree: ast.AST):
    """(node, object expression, private name, enclosing class, enclosing function) of every `obj._x` and
    getattr-like call with a constant private name."""
    def visit(node, cls, func):
        for child in ast.iter_child_nodes(node):
            c, f = cls, func
            if isinstance(child, ast.ClassDef):
                c = child.name
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                f = child
            if isinstance(child, ast.Attribute) and _private(child.attr):
                yield child, child.value, child.attr, c, f
            elif (isinstance(child, ast.Call) and isinstance(child.func, ast.Name) and child.func.id in ATTR_FUNCTIONS
                    and len(child.args) >= 2 and isinstance(child.args[1], ast.Constant)
                    and isinstance(child.args[1].value, str) and _private(child.args[1].value)):
                yield child, child.args[0], child.args[1].value, c, f
            yield from visit(child, c, f)
    yield from visit(tree, None, None)


def _violations(path: str, owners: dict, modules: set) -> list:
    """owners: {private name: the package files that define it}; modules: private module names."""
    tree = ast.parse(open(path).read())
    rel = os.path.relpath(path, ROOT)
    defs, here = _Defs(tree), os.path.abspath(path)
    imported = _package_modules(tree)
    out = []
    for n, obj, name, cls, func in _accesses(tree):
        if name not in owners or name in modules:          # not ours (torch._C, vLLM's internals), or a module
            continue
        if isinstance(obj, ast.Name) and obj.id in ("self", "cls") and cls is not None:
            ok = defs.class_defines(cls, name)
        elif isinstance(obj, ast.Name) and obj.id in imported:
            ok = False
        else:
            known = set()
            if isinstance(obj, ast.Name) and func is not None and not isinstance(func, ast.Lambda):
                known = _variable_types(func, defs).get(obj.id, set()) & set(defs.by_class)
            elif isinstance(obj, ast.Call) and isinstance(obj.func, ast.Name) and obj.func.id in defs.by_class:
                known = {obj.func.id}
            ok = (any(defs.class_defines(k, name) for k in known) if known else
                  name in defs.all() and owners[name] == {here})
        if not ok and (rel, ast.unparse(n)) not in ALLOWED:
            out.append(f"{rel}:{n.lineno}: {ast.unparse(n)}")
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            for a in n.names:
                if a.name in owners and a.name not in modules:
                    out.append(f"{rel}:{n.lineno}: from {n.module} import {a.name}")
    return out


def _owners() -> dict:
    owners = {}
    for p in _files(["d3kernels/**/*.py"]):
        for name in _Defs(ast.parse(open(p).read())).all():
            owners.setdefault(name, set()).add(os.path.abspath(p))
    return owners


def test_no_module_reaches_into_another_modules_private_fields():
    owners, modules = _owners(), _module_names()
    wrong = []
    for path in _files(SCANNED):
        wrong += _violations(path, owners, modules)
    assert not wrong, "private names used outside the class or module that defines them:\n" + "\n".join(wrong)


def test_the_checker_catches_a_reach_in(tmp_path):
    """The checker itself: reach-ins through an attribute of an object of unknown class whose name another
    module also defines, through getattr, through an imported module and through an import are found; the
    defining class's own use, an object of a class this file defines, and a private module's import are
    not."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from d3kernels.step import _helper\n"
        "from d3kernels import _ops, step\n"
        "class Handle:\n"
        "    def __init__(self):\n"
        "        self._conv = None\n"
        "    def turns(self):\n"
        "        return len(self._conv)\n"
        "def make() -> 'Handle':\n"
        "    return Handle()\n"
        "def mine(h: Handle, k):\n"
        "    g = make()\n"
        "    return h._conv, Handle()._conv, g._conv, getattr(g, '_conv'), k._conv\n"
        "def theirs(dec):\n"
        "    return dec._conv, getattr(dec, '_lengths'), step._helper, dec.core.tokens\n")
    here, other = str(bad), os.path.join(ROOT, "d3kernels", "decoder.py")
    owners = {"_conv": {here, other}, "_lengths": {other}, "_helper": {other}, "_ops": {other}}
    found = _violations(here, owners, {"_ops"})
    lines = sorted(f.split(": ", 1)[1] for f in found)
    assert lines == ["dec._conv", "from d3kernels.step import _helper", "getattr(dec, '_lengths')",
                     "k._conv", "step._helper"], found
    assert _violations(here, {"_conv": {here}}, set()) == []      # a name only this module defines
