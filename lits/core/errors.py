"""The two exception types of failures a user can cause and fix: UserError (stop, one line) and
BadInputError (one input recorded as failed, the rest goes on)."""


class UserError(Exception):
    """A bad file, flag, URI or missing data: the message names the input and the fix.

    Workflows print it as one line and exit non-zero; it never becomes a traceback.
    """


class BadInputError(UserError):
    """One input file is unusable (truncated, not NIfTI, 4-D, NaN, bad labels, undecodable mask).

    Batch stages record it against that input and go on with the rest.
    """
