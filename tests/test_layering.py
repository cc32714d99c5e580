"""The package's imports point down its layers, with no cycle; ``import bimask_hf`` loads the core only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bimask_hf"

# Lower layers first; a module may import modules of its own layer or below, never above.
LAYERS = [
    {"modes", "errors", "version", "progress"},
    {"config"},
    {"kernels", "search", "distributed", "families", "metrics", "data", "checks"},
    {"masks", "compression", "storage"},
    {"functional"},
    {"layers"},
    {"inspection"},
    {"patching"},
    {"models", "modeling", "hub", "lora", "registration"},
    {"callback", "image_classification", "compat"},
    {"trainer"},
    {"train", "evaluation"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
# Known imports against the layers, each with why it is still there; the tests fail on any other one.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the bimask_hf modules it imports (at any depth of its code, function bodies included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                submodules = [f"{base}.{alias.name}" for alias in node.names]
                # `from . import kernels` imports the submodule; `from .. import __version__` the package itself
                targets = [t for t in submodules if t in modules] or [base]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = {t for t in edges if (name, t) not in KNOWN_UPWARD}
    return graph


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_imports_have_no_cycle():
    graph = _imports()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_imports_point_down_the_layers():
    upward = []
    for module, targets in _imports().items():
        if module == "bimask_hf":  # the public API re-exports every layer
            continue
        own = RANK.get(_top(module))
        assert own is not None, f"{module} is in no layer of this test: add it to LAYERS"
        for target in targets:
            if _top(target) != _top(module) and RANK[_top(target)] > own:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that point up a layer: " + ", ".join(sorted(upward))


def test_config_is_a_leaf():
    graph = _imports()
    assert graph["bimask_hf.modes"] == set()
    assert graph["bimask_hf.config"] <= {"bimask_hf.modes"}


def test_importing_the_package_loads_no_hf_integration():
    code = (
        "import sys, bimask_hf\n"
        "heavy = sorted(m for m in ('transformers', 'timm', 'accelerate', 'datasets', 'peft') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
        "import timm\n"  # the CIFAR models register as soon as timm is imported
        "print(type(timm.create_model('resnet8_cifar', num_classes=3)).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["", "CifarResNet"] or out == ["CifarResNet"], out


def test_the_cifar_models_are_registered_when_timm_came_first():
    code = "import timm, bimask_hf\nprint(type(timm.create_model('resnet8_cifar', num_classes=3)).__name__)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["CifarResNet"], out


def test_the_cifar_models_are_registered_when_transformers_came_first():
    # bimask-hf's transformers registrar loads timm itself (the TimmWrapper image processor imports it);
    # that load must register the CIFAR models too, or a saved resnet8_cifar folder does not load.
    code = ("from transformers import AutoModelForImageClassification\nimport bimask_hf, timm\n"
            "print(timm.is_model('resnet8_cifar'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True"], out


def test_save_pretrained_of_a_sparsified_transformers_model_publishes_in_either_import_order():
    """patching never imports the Hub layer: hub.save registers the save routes when transformers loads."""
    model = ("from transformers import ViTConfig, ViTForImageClassification\n"
             "m = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, "
             "intermediate_size=64, image_size=16, patch_size=4))\n"
             "bimask_hf.sparsify(m, bimask_hf.BiMaskConfig())\n"
             "print(m.save_pretrained.func.__name__, m.push_to_hub.func.__name__)\n")
    for first in ("import bimask_hf, transformers\n", "import transformers, bimask_hf\n"):
        out = subprocess.run([sys.executable, "-c", first + model], capture_output=True, text=True,
                             check=True).stdout.split()
        assert out == ["sparse_save_pretrained", "sparse_push_to_hub"], (first, out)
