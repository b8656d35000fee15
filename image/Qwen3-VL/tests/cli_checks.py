# Copied from image/LLaVA/tests/cli_checks.py
"""What a command-line tool's stderr must look like on bad input and on Ctrl-C: one line, never a traceback.

Copied byte-identically into every fork's tests (scripts/check_copies.py), imported by the demo tests.
"""


def one_error_line(err: str, prog: str) -> str:
    """The single `PROG: error: ...` line, last on stderr, with no traceback anywhere."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and errors[0].startswith(f"{prog}: error: ")
    return errors[0]


def assert_interrupted(err: str) -> None:
    """Ctrl-C before anything ran: one line, no traceback."""
    assert "Traceback" not in err and err.rstrip().endswith("interrupted (Ctrl-C); nothing more was run")
