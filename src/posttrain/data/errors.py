"""The one error type of `posttrain.data`: a bad file, row or field, named where it is."""


class DataError(ValueError):
    """An input problem, with its place in the message: `"<file> line 3: field 'label': ..."`.

    `reason` is a short stable key ("missing field", "wrong type", ...) under which a skipped row is
    counted in `LoadReport.skipped`.
    """

    def __init__(self, message: str, *, reason: str = "unreadable"):
        super().__init__(message)
        self.reason = reason
