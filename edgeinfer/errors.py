"""The project's exception hierarchy: caught once at the CLI edge and printed as one line."""


class EdgeInferError(Exception):
    """Base of every error edgeinfer raises on purpose (bad input, missing model, ...)."""


class GGUFError(EdgeInferError):
    """A GGUF file is malformed or unsupported; the message names the file, the field and the byte offset."""

    def __init__(self, path, field: str, offset: int | None, problem: str):
        self.path, self.field, self.offset, self.problem = str(path), field, offset, problem
        where = f" at offset {offset}" if offset is not None else ""
        super().__init__(f"{self.path}: {_printable(field)}{where}: {problem}")


def _printable(text: str, limit: int = 200) -> str:
    """Text from a file made safe for a one-line message: control characters escaped ("a\\nb"), long text cut."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class ModelNotFound(EdgeInferError):
    """A model name is neither in the catalogue nor an existing file."""


class FetchError(EdgeInferError):
    """Fetching or assembling a catalogue model failed."""


class TokenizerError(EdgeInferError):
    """The GGUF tokenizer metadata cannot be turned into a working tokenizer."""


class UnsupportedError(EdgeInferError):
    """A valid file uses something edgeinfer does not implement (an architecture, a tensor type)."""


class BudgetError(EdgeInferError):
    """The requested configuration does not fit in the machine's memory."""


class TemplateError(EdgeInferError):
    """A chat template failed to render or tried something the sandbox forbids."""


class InvalidArgument(EdgeInferError, ValueError):
    """An argument of the Python API (or a CLI option) is out of range or of the wrong kind; the message names it.

    A ValueError too, so callers that catch ValueError for bad arguments keep working."""


class ModelClosed(EdgeInferError, ValueError):
    """A method was called on a `Model` after `close()` (like I/O on a closed file, a ValueError)."""


class ModelError(EdgeInferError):
    """The model computed something unusable (NaN or infinite logits: damaged weights or hyper-parameters); the
    message names the model file and the position."""
