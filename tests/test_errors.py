"""One line of a third-party error goes into slimvit's own messages."""

from slimvit.errors import first_line


def test_first_line():
    assert first_line(RuntimeError("\n\n  first  \nsecond")) == "first"
    assert first_line(RuntimeError("x" * 500)) == "x" * 300
    assert first_line(RuntimeError("x" * 500), 10) == "x" * 10
    assert first_line(RuntimeError("")) == "RuntimeError"  # no IndexError on an empty message
    assert first_line(ValueError("  \n ")) == "ValueError"


def test_openvino_errors_name_the_innermost_reason():
    from slimvit.openvino_runtime import ov_reason

    said = (  # what compile_model raised under ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 machine (2026-11-28)
        "Exception from src/inference/src/cpp/core.cpp:132:\nException from src/inference/src/dev/plugin.cpp:59:\n"
        "Check '!getSupportedPrimitiveDescriptors().empty()' failed at src/plugins/intel_cpu/src/node.cpp:345:\n"
        "Supported primitive descriptors list is empty for node: Softmax_227 type: Softmax\n\n"
    )
    assert ov_reason(RuntimeError(said)) == (
        "Supported primitive descriptors list is empty for node: Softmax_227 type: Softmax"
    )
    assert ov_reason(RuntimeError("Exception from a.cpp:1:\n")) == "Exception from a.cpp:1:"  # nothing else
    assert ov_reason(RuntimeError("")) == "RuntimeError"


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


def test_library_info_lines_are_quiet_and_slimvit_lines_stay():
    """ONNX Runtime's optimizer and quantizer log INFO lines to the root logger and to loggers named after
    their modules; the user's log keeps slimvit's own lines and real library warnings only."""
    import logging

    from slimvit.cli import _library_noise

    def rec(name, level, msg):
        return logging.LogRecord(name, level, __file__, 1, msg, (), None)

    assert not _library_noise(
        rec("root", logging.INFO, 'Quantization parameters for tensor:"ln" not specified')
    )
    assert not _library_noise(rec("onnx_model_bert", logging.INFO, "Optimized operators: {'Attention': 12}"))
    assert not _library_noise(
        rec("root", logging.WARNING, "Please check if the model is already quantized. ...")
    )
    assert _library_noise(rec("slimvit.quantize", logging.INFO, "quantize: kept"))
    assert _library_noise(rec("slimvit", logging.INFO, "deployed: ..."))
    assert _library_noise(rec("onnxruntime", logging.WARNING, "a real warning"))
