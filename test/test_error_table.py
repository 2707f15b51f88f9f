"""The README's error table lists every ErrorCode in fractal/errors.py, each with the status its error class answers."""

from __future__ import annotations

import re

from fractal import errors
from fractal.errors import ErrorCode, FractalError
from test.processes import ROOT

ROW = re.compile(r"^\| (?P<statuses>[\d, ]+) \| `(?P<code>[A-Z_]+)` \| (?P<when>.+) \|$")


def readme_error_table() -> dict[str, set[int]]:
    """code → the statuses its row names, from the table under '## Error codes'."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Error codes\n", 1)[1].split("\n## ", 1)[0]
    table: dict[str, set[int]] = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            assert match["code"] not in table, f"{match['code']} listed twice"
            table[match["code"]] = {int(status) for status in match["statuses"].split(",")}
    return table


def test_the_readme_lists_every_error_code_and_nothing_else() -> None:
    listed = set(readme_error_table())
    defined = {code.value for code in ErrorCode}
    assert defined - listed == set(), f"missing from the README's error table: {sorted(defined - listed)}"
    assert listed - defined == set(), f"listed in the README but not in ErrorCode: {sorted(listed - defined)}"


def test_each_row_names_the_status_its_error_classes_answer() -> None:
    table = readme_error_table()
    classes = [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, FractalError) and value is not FractalError
    ]
    assert len(classes) > 10
    for cls in classes:
        assert cls.status in table[cls.code.value], f"{cls.__name__}: {cls.status} not in the {cls.code} row"
