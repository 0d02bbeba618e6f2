"""One line of a third-party error goes into slimvit's own messages."""

from slimvit.errors import first_line


def test_first_line():
    assert first_line(RuntimeError("\n\n  first  \nsecond")) == "first"
    assert first_line(RuntimeError("x" * 500)) == "x" * 300
    assert first_line(RuntimeError("x" * 500), 10) == "x" * 10
    assert first_line(RuntimeError("")) == "RuntimeError"  # no IndexError on an empty message
    assert first_line(ValueError("  \n ")) == "ValueError"
