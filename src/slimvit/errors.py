"""Errors that the CLI turns into one clear line and exit code 2."""


class SlimvitError(Exception):
    """A problem the user can fix: the message names it and says how."""


class ConfigError(SlimvitError):
    """A bad preset, config file, or override."""


class DataError(SlimvitError):
    """A dataset that is missing, empty, in an unknown layout, or has unreadable images."""


class ModelError(SlimvitError):
    """An unknown model name, an artifact that does not fit, a missing checkpoint."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (at most `limit` characters), else its type name.

    Third-party errors (ONNX Runtime, the exporter, the hub) can span pages; one line goes into ours.
    """
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(e).__name__
