"""Errors that the CLI turns into one clear line and exit code 2."""


class SlimvitError(Exception):
    """A problem the user can fix: the message names it and says how."""


class ConfigError(SlimvitError):
    """A bad preset, config file, or override."""


class DataError(SlimvitError):
    """A dataset that is missing, empty, in an unknown layout, or has unreadable images."""


class ModelError(SlimvitError):
    """An unknown model name, an artifact that does not fit, a missing checkpoint."""
