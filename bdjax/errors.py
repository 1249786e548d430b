"""Errors a user can cause. The CLI prints them on one line and exits with code 2."""


class BdjaxError(Exception):
    """Base class: the message names the offending value and how to fix it."""


class ConfigError(BdjaxError):
    """A recipe or model config is invalid (unknown key, value out of range, unsupported option)."""


class CheckpointError(BdjaxError):
    """A checkpoint is missing, unsafe (pickle), truncated, or disagrees with its config."""


class AssetError(BdjaxError):
    """An embedded default asset could not be fetched or failed its checksum."""


class TokenizerError(BdjaxError):
    """A tokenizer cannot be built or does not fit the model."""
