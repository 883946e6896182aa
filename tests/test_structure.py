"""The package's shape: no import cycles, the fast path and the use side out of the core, parsing without
side effects, no sys.path edits."""

import ast
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "glmtune"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported(path: Path) -> set:
    """glmtune modules a file imports anywhere (inside functions too), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = node.module
            if node.level:  # relative: from the file's package
                package = module_name(path).split(".")[: -node.level or None]
                module = ".".join([*package, module])
            found |= {
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module for alias in node.names
            }
    return {name for name in found if name in MODULES}


def find_cycle(graph: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_inside_glmtune():
    graph = {name: imported(path) - {name} for name, path in MODULES.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_finds_one_hidden_inside_a_function(tmp_path):
    """The check itself: a cycle through an import inside a function is found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from glmtune import model\n", encoding="utf-8")
    assert imported(source) == {"glmtune.model"}


def test_core_modules_import_neither_the_fast_path_nor_the_use_side():
    core = [
        "glmtune.arguments",
        "glmtune.parsing",
        "glmtune.prompt",
        "glmtune.files",
        "glmtune.records",
        "glmtune.encoding",
        "glmtune.data",
        "glmtune.model",
        "glmtune.ptuning",
        "glmtune.lora",
        "glmtune.adapter_config",
        "glmtune.vocabulary",
        "glmtune.finetune",
        "glmtune.trainer",
        "glmtune.metrics",
        "glmtune.errors",
        "glmtune.generation",
    ]
    for name in core:
        outside = {m for m in imported(MODULES[name]) if m.startswith(("glmtune.speed", "glmtune.serve"))}
        assert not outside, f"{name} imports {outside}"


def python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_loading_a_base_model_does_not_import_the_fast_path(tiny_model_dir):
    out = python(
        "import sys\n"
        "from glmtune.arguments import ModelArguments\n"
        "from glmtune.model import load_base_model, load_tokenizer\n"
        f"args = ModelArguments(model_name_or_path={str(tiny_model_dir)!r})\n"
        "load_tokenizer(args); load_base_model(args)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('glmtune.speed', 'glmtune.serve'))))\n"
    )
    assert out.strip() == "[]"


def test_parsing_arguments_leaves_the_environment_alone(tiny_model_dir, tmp_path):
    out = python(
        "import os\n"
        "before = dict(os.environ)\n"
        "from glmtune.parsing import parse_args\n"
        f"parse_args('lora', ['--do_train', '--train_file', {str(REPO / 'data/adgen-toy/train.json')!r},\n"
        f"    '--model_name_or_path', {str(tiny_model_dir)!r}, '--output_dir', {str(tmp_path / 'out')!r}])\n"
        "print({k: v for k, v in os.environ.items() if before.get(k) != v})\n"
    )
    assert out.strip() == "{}"


def test_no_sys_path_edits_in_the_repository():
    """glmtune is installed (scripts/setup.sh: pip install -e .); scripts set PYTHONPATH (scripts/common.sh)."""
    edits = []
    for path in REPO.rglob("*.py"):
        if any(part.startswith(".") or part in ("models", "output") for part in path.relative_to(REPO).parts):
            continue
        if "sys.path.insert" in path.read_text(encoding="utf-8") and path.name != os.path.basename(__file__):
            edits.append(str(path.relative_to(REPO)))
    assert not edits
