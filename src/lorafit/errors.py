"""Errors meant for the user: the CLI prints their message (which names the file, line or field) and exits 2."""


class LorafitError(Exception):
    """Base of every error whose message is written for the person running lorafit."""


class DataError(LorafitError, ValueError):
    """Bad training or evaluation data; the message starts with `file:line:` (or `file: field ...`)."""


class ModelError(LorafitError, ValueError):
    """A model folder lorafit cannot load, with the reason."""
