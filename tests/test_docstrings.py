"""Every public name of bimask_hf has a Google-style docstring (``Args:`` / ``Returns:``), as in transformers.

A public name is one in the ``__all__`` of the package or of one of its submodules (every public module-level
name, for a module without ``__all__``); of a public class defined in the package, every method it defines
itself that does not start with ``_``, plus ``__init__`` (whose ``Args:`` may sit in the class docstring; a
dataclass field with ``metadata={"help": ...}`` is documented by that help, which ``--help`` shows).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import io
import pkgutil
import re
import textwrap
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bimask_hf"

# Modules whose docstrings are converted in a separate change; their objects are skipped by the checks below.

# A header alone on its line; the section runs until the next line indented as little as the header.
SECTION = re.compile(r"^(?P<indent>[ ]*)(?P<name>[A-Z][A-Za-z ]*):[ ]*$")
# An entry of an ``Args:`` section: ``name: ...`` or ``name (type): ...`` at the start of a line.
ARG_ENTRY = re.compile(r"^[ ]+\**(?P<name>\w+)(?: \((?:[^()]|\([^()]*\))*\))?:")
# Sphinx (``:param x:``) and numpy (``Parameters`` over a dashed line) styles.
OTHER_STYLES = re.compile(r":(?:param|type|returns?|rtype|raises?)\b[^:`]*:|^\s*\w+\s*\n\s*-{3,}\s*$", re.M)
# A measured speed: a time ("5.5 ms", "0.55 s"), a ratio of speeds ("10-40x slower", "2.6x as long"), a share of
# a step or of the time ("3.6 % of a b32 step"), a throughput ("900 img/s"), "a speedup of". Shapes ("3x3",
# "64x576"), factors ("2 x lora_r") and shares of weights or data ("20 % of the digits") are not speeds.
SPEED_FIGURE = re.compile(
    r"\b\d+(?:\.\d+)?\s?(?:ms|µs|us|ns)\b"
    r"|\b\d+\.\d+\s?s\b"
    r"|\d(?:\.\d+)?\s?[x×]\s+(?:faster|slower|quicker|longer|shorter|as (?:long|fast|slow)|the time)"
    r"|\b(?:speed-?ups?|slow-?downs?) of\b"
    r"|%\s+of\s+(?:a|an|the|each|one)\s+(?:\S+\s+)?(?:step|steps|time|run|epoch|refresh)\b"
    r"|\d\s?(?:img|images|samples|it|steps|tokens)/s\b",
    re.I,
)


@functools.cache
def _modules() -> dict[str, object]:
    root = importlib.import_module("bimask_hf")
    names = ["bimask_hf", *(info.name for info in pkgutil.walk_packages(root.__path__, "bimask_hf."))]
    return {name: importlib.import_module(name) for name in names}


def _defined_here(obj: object) -> bool:
    return getattr(obj, "__module__", "").startswith("bimask_hf") and (
        inspect.isfunction(obj) or inspect.isclass(obj)
    )


@functools.cache
def _public_objects() -> dict[str, list[tuple[str, object]]]:
    """Defining module -> (qualified name, object) of each public function and class, each object once."""
    seen: set[int] = set()
    found: dict[str, list[tuple[str, object]]] = {}
    for module in _modules().values():
        names = getattr(module, "__all__", None)
        if names is None:
            names = [n for n, v in vars(module).items() if not n.startswith("_") and _defined_here(v)
                     and v.__module__ == module.__name__]
        for name in names:
            obj = getattr(module, name)
            if not _defined_here(obj) or id(obj) in seen:
                continue
            seen.add(id(obj))
            found.setdefault(obj.__module__, []).append((f"{obj.__module__}.{obj.__qualname__}", obj))
    return found


def _sections(doc: str) -> dict[str, list[str]]:
    """Section name -> its body lines (``Args``, ``Returns``, ...) of a cleaned docstring."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    header_indent = 0
    for line in doc.splitlines():
        match = SECTION.match(line)
        if match:
            current = sections.setdefault(match["name"], [])
            header_indent = len(match["indent"])
            continue
        if current is not None and line.strip() and len(line) - len(line.lstrip()) <= header_indent:
            current = None
        if current is not None:
            current.append(line)
    return sections


def _documented_args(sections: dict[str, list[str]]) -> set[str]:
    lines = sections.get("Args", [])
    indent = min((len(x) - len(x.lstrip()) for x in lines if x.strip()), default=0)
    return {m["name"] for x in lines if len(x) - len(x.lstrip()) == indent and (m := ARG_ENTRY.match(x))}


def _parameters(fn) -> list[str]:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in signature.parameters.values() if p.kind not in skip and p.name not in ("self", "cls")]


def _returns_value(fn) -> bool:
    """Whether ``fn`` returns something: by its annotation, else by a ``return <value>`` in its own body."""
    annotation = inspect.signature(fn).return_annotation
    if annotation is not inspect.Signature.empty:
        return annotation not in (None, "None", type(None))
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(fn))))
    except (OSError, TypeError):
        return True
    nodes, found = list(ast.iter_child_nodes(tree.body[0])), False
    while nodes:  # the function's own statements, not those of functions or classes nested in it
        node = nodes.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        found |= isinstance(node, (ast.Yield, ast.YieldFrom)) or (
            isinstance(node, ast.Return) and node.value is not None)
        nodes.extend(ast.iter_child_nodes(node))
    return found


def _help_fields(cls: type | None) -> set[str]:
    """Fields of a dataclass that carry ``metadata={"help": ...}``: the help documents them (``--help``)."""
    if cls is None or not dataclasses.is_dataclass(cls):
        return set()
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("help")}


def _problems(qualname: str, fn, *, fallback_doc: str | None = None, is_init: bool = False,
              owner: type | None = None) -> list[str]:
    """What the docstring of ``fn`` lacks, as messages naming ``qualname``."""
    doc = inspect.getdoc(fn) if fn.__doc__ else None
    if is_init and not doc:
        doc = fallback_doc
    if not doc:
        return [f"{qualname}: no docstring"]
    sections = _sections(doc)
    problems = []
    documented = _documented_args(sections) | (_help_fields(owner) if is_init else set())
    missing = [p for p in _parameters(fn) if p not in documented]
    if missing:
        problems.append(f"{qualname}: `Args:` does not name {', '.join(missing)}")
    if not is_init and _returns_value(fn):
        generator = inspect.isgeneratorfunction(inspect.unwrap(fn))
        if "Returns" not in sections and not (generator and "Yields" in sections):
            problems.append(f"{qualname}: no `{'Yields' if generator else 'Returns'}:` section")
    return problems


def _class_problems(qualname: str, cls: type) -> list[str]:
    class_doc = inspect.getdoc(cls) if cls.__doc__ else None
    problems = [] if class_doc else [f"{qualname}: no docstring"]
    for name, member in vars(cls).items():
        if name.startswith("_") and name != "__init__":
            continue
        where = f"{qualname}.{name}"
        if isinstance(member, property):
            if not member.__doc__:
                problems.append(f"{where}: no docstring")
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if not inspect.isfunction(member) or not member.__qualname__.startswith(f"{cls.__qualname__}."):
            continue  # not a method: e.g. a function as a dataclass field's default
        if name != "__init__" and any(name in vars(base) for base in cls.__mro__[1:]
                                      if not base.__module__.startswith("bimask_hf")):
            continue  # an override of another library's documented hook (TrainerCallback.on_save, ...)
        if name == "__init__":
            problems += _problems(where, member, fallback_doc=class_doc, is_init=True, owner=cls)
        else:
            problems += _problems(where, member)
    return problems


def _module_names() -> list[str]:
    return sorted(_modules())


@pytest.mark.parametrize("module_name", _module_names())
def test_public_names_have_google_docstrings(module_name):
    module = _modules()[module_name]
    problems = [] if module.__doc__ else [f"{module_name}: no module docstring"]
    for qualname, obj in _public_objects().get(module_name, []):
        problems += _class_problems(qualname, obj) if inspect.isclass(obj) else _problems(qualname, obj)
    assert not problems, "\n".join(problems)


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_no_sphinx_or_numpy_docstrings():
    found = [f"{p.relative_to(PACKAGE.parent)}: {m.group().strip()!r}"
             for p in _sources() for m in OTHER_STYLES.finditer(p.read_text())]
    assert not found, "use Google style (Args: / Returns: / Raises:):\n" + "\n".join(found)


def _comments_and_docstrings(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of each comment and each module, class and function docstring of a source file."""
    source = path.read_text()
    found = [(token.start[0], token.string) for token in tokenize.generate_tokens(io.StringIO(source).readline)
             if token.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body[0] if node.body else None
            if isinstance(body, ast.Expr) and isinstance(body.value, ast.Constant) and isinstance(
                    body.value.value, str):
                found += [(body.lineno + i, line) for i, line in enumerate(body.value.value.splitlines())]
    return found


def test_no_speed_figures_in_comments_or_docstrings():
    found = [f"{path.relative_to(PACKAGE.parent)}:{number}: {text.strip()}"
             for path in _sources() for number, text in _comments_and_docstrings(path) if SPEED_FIGURE.search(text)]
    assert not found, "benchmark figures belong in docs/benchmarks.md; say why instead:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "text, flagged",
    [  # the first ones were in this package's comments once
        ("along the kernel positions (ResNet-50's 3x3 convs, 2 threads: 5.5 ms for Mf + W*Mf; 35 ms", True),
        ("ranking across the kernel positions in place made inductor's kernel 4-5x slower (3x3 convs).", True),
        ("(ResNet-32's whole refresh from the identity, 2 threads: 0.55 s, 0.29 s so).", True),
        ("pass they take 4 bytes per weight instead of 1 (ResNet-50: +90 MB, 3.6 % of a b32 step's saved", True),
        ("inductor's CPU kernels load, store and convert 1-byte masks 10-40x slower than floats", True),
        ("a small layer: ResNet-32's mask work takes 2.6x as long on 2 threads as on 1.", True),
        ("brought 1-2 % of the gain on the benchmark's layers, for 15-30 % of the time.", True),
        ("a speedup of 1.3 over the dense step", True),
        ("trains at 900 img/s on one GPU", True),
        ("bound the work per round (``O x 256 x K`` instead of ``O x O x K``)", False),
        ("LoRA alpha (default: 2 x lora_r).", False),
        ("last 20 % of sklearn's 1,797 digits", False),
        ("which ``rand-m9-mstd0.5`` draws for about 2% of its posterize calls.", False),
        ("3x3 convs keep 2 of every 4 weights; a 64x576 matrix", False),
        ("it runs tens of times slower than the float matmul of the same 0/1 operands", False),
        ("Takes the layer's weight in ``(O, I, kH, kW)`` order, each 2:4 group along I.", False),
    ],
)
def test_speed_figure_pattern(text, flagged):
    assert bool(SPEED_FIGURE.search(text)) is flagged


def test_checker_sees_a_missing_argument():
    def documented(alpha: int, beta: int = 0) -> int:
        """Add.

        Args:
            alpha (`int`): The first term.

        Returns:
            `int`: The sum.
        """
        return alpha + beta

    assert _problems("documented", documented) == ["documented: `Args:` does not name beta"]
