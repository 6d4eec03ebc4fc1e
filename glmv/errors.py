"""Exceptions raised by glmv for bad inputs and checkpoints, all under `GlmvError`.

Bad media must never crash a batch run: every decoding or validation problem with one item surfaces as one
`MediaError` that names the item and the cause, so a pipeline can record it against that row and move on.
`InputError` is about one call's inputs (placeholders that do not match the media); `ConfigError`
(glmv/config.py), `CheckpointError` (glmv/weights.py) and `ProcessorConfigError` are about the checkpoint, so a
pipeline stops on them rather than record every item as failed. Misuse of the API (a wrong argument) stays a
plain ValueError / TypeError, as in transformers.
"""


class GlmvError(Exception):
    """Base class of every error glmv raises on purpose. The message is kept apart from `args`, which frameworks
    that re-raise an error edit (Ray Data appends lines of retry advice to them): str() is the message alone."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):   # Ray ships exceptions between processes by pickling
        return (type(self), (self.message,))


class MediaError(GlmvError, ValueError):
    """An image or video could not be read, decoded or accepted.

    `source` is a short, credential-free description of the input (a path, a URL without its query string, or
    "<bytes: N>"); `cause` says what went wrong. The message is "<source>: <cause>".
    """

    def __init__(self, source: str, cause: str):
        self.source = source
        self.cause = cause
        super().__init__(f"{source}: {cause}")

    def __reduce__(self):
        # Ray ships exceptions between processes by pickling; keep both fields.
        return (type(self), (self.source, self.cause))


class ProcessorConfigError(GlmvError, ValueError):
    """A checkpoint's tokenizer / preprocessor / chat-template files are missing or inconsistent."""


class InputError(GlmvError, ValueError):
    """Model inputs that do not fit together: media placeholders in the prompts that do not match the media given
    (a prompt that holds a literal <|image|> token, say) or the vision tower's output. About those inputs only."""
