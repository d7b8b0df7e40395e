"""The one error a corpus builder raises when its source cannot be fetched."""


class CorpusUnavailable(RuntimeError):
    """A corpus's source could not be fetched (no network, no apt-get); the message says what
    to do instead. The CLI prints it in one line."""
