"""The package's modules import one another without a circle, at module level or inside
functions"""
import ast
import pathlib

import dcbg

PACKAGE = pathlib.Path(dcbg.__file__).parent


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def type_checking_block(node) -> bool:
    """``if typing.TYPE_CHECKING:`` (or ``if TYPE_CHECKING:``): never run"""
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
            or isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")


def imported(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere, outside TYPE_CHECKING blocks"""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and type_checking_block(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in known:
                    found.add(target)
                elif base in known and base != "dcbg":
                    found.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle of imports, each as the modules along it"""
    found, state, path = [], {}, []

    def walk(name):
        state[name] = "open"
        path.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                walk(target)
        path.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name)
    return found


def test_the_checker_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []


REGISTRY = ("dcbg.background", "dcbg.rollmed")
"""The one circle kept: :class:`dcbg.Background` finds its built-in methods (a PPID's code,
dcbg.get_available_background_methods) among its subclasses, which the method modules
define by importing it"""


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert "dcbg.engines.cudakernel" in graph["dcbg.devices"], "the checker sees lazy imports"
    assert REGISTRY[1] in graph[REGISTRY[0]] and REGISTRY[0] in graph[REGISTRY[1]]
    graph[REGISTRY[0]].discard(REGISTRY[1])
    assert circles(graph) == []


def test_what_cuda_offers_is_asked_without_the_engines():
    graph = import_graph()
    assert not {name for name in graph["dcbg.cudaprobe"] if name.startswith("dcbg.engines")}
    # errors for its advice; rtdc.hdf5 (inside the function that reads NVML) for as_text,
    # since NVML gives bytes or str as h5py does
    assert graph["dcbg.cudaprobe"] <= {"dcbg.errors", "dcbg.rtdc.hdf5"}
