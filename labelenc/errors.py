"""The error the command line reports as one line: input the user can fix (files, keys, annotations, devices)."""


class UserError(Exception):
    """Raised for bad input; its message names the file, key or annotation at fault."""


def error_text(err: BaseException) -> str:
    """The error's own message: a DataLoader worker re-raises it with the worker's traceback appended; drop that."""
    message = str(err)
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last
