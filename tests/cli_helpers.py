"""Shared assertions for tests that run launch.py as a user would."""


def assert_one_line_error(result, *fragments):
    """Bad input: exit code 2, one line on stderr holding every fragment, nothing on stdout."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""
