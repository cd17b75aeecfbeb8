"""The error the command line reports as one line: input the user can fix (files, keys, annotations, devices)."""


class UserError(Exception):
    """Raised for bad input; its message names the file, key or annotation at fault."""
