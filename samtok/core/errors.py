"""The project's error for bad user input: the CLI prints its message without a traceback."""


class SamtokError(ValueError):
    """Bad input (file, field, config key, generated text...): the message says where and what was expected."""
