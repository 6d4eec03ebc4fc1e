"""Exceptions raised by glmv for bad inputs.

Bad media must never crash a batch run: every decoding or validation problem with one item surfaces as one
`MediaError` that names the item and the cause, so a pipeline can record it against that row and move on.
"""


class GlmvError(Exception):
    """Base class of every error glmv raises on purpose."""


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
