"""One line of a third-party error goes into slimvit's own messages."""

from slimvit.errors import first_line


def test_first_line():
    assert first_line(RuntimeError("\n\n  first  \nsecond")) == "first"
    assert first_line(RuntimeError("x" * 500)) == "x" * 300
    assert first_line(RuntimeError("x" * 500), 10) == "x" * 10
    assert first_line(RuntimeError("")) == "RuntimeError"  # no IndexError on an empty message
    assert first_line(ValueError("  \n ")) == "ValueError"


def test_the_import_graph_of_slimvit_has_no_circle():
    """Every `from slimvit... import` edge between modules, module-level or inside a function: no cycle."""
    import ast
    from pathlib import Path

    import slimvit

    root = Path(slimvit.__file__).parent
    names = {p.stem for p in root.glob("*.py")}
    edges: dict[str, set[str]] = {}
    for p in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slimvit"):
                sub = node.module.split(".")[1:]
                if sub:
                    deps.add(sub[0])
                else:  # from slimvit import a, b
                    deps |= {a.name for a in node.names if a.name in names}
        edges[p.stem] = deps - {p.stem}

    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in sorted(edges.get(n, ())):
            assert state.get(d) != 1, "import circle: " + " -> ".join([*path[path.index(d) :], d])
            if d not in state:
                visit(d, [*path, d])
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n, [n])
