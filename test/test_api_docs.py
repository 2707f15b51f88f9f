"""The spec as documentation: every error code an enum with a description in all three specs, every operation
with a summary and a description, and docs/errors.md generated from ErrorCode (stale is a failure)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from apiflask import APIFlask

from fractal import errors
from fractal.api_docs import ERRORS_MARKDOWN, main, render_errors_markdown
from fractal.blueprints import BLUEPRINTS_BY_API
from fractal.errors import ERROR_CODE_DOCS, ErrorCode, FractalError
from fractal.gunicorn_errors import CODES as GUNICORN_CODES

ROOT = Path(__file__).resolve().parent.parent
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@pytest.fixture(params=sorted(BLUEPRINTS_BY_API))
def spec(request: pytest.FixtureRequest, make_app: Callable[..., APIFlask]) -> dict[str, Any]:
    answer = make_app(request.param).test_client().get("/openapi.json")
    assert answer.status_code == 200
    document: dict[str, Any] = answer.json
    return document


def all_subclasses(cls: type[FractalError]) -> list[type[FractalError]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *all_subclasses(sub)]
    return found


def test_every_code_is_documented_with_the_statuses_it_is_answered_with() -> None:
    assert set(ERROR_CODE_DOCS) == set(ErrorCode)
    for code, doc in ERROR_CODE_DOCS.items():
        assert doc.statuses and doc.meaning.strip() and doc.meaning.endswith((".", ")")), code
    raised = [(cls.code, cls.status) for cls in all_subclasses(FractalError)]
    mapped = [(code, status) for status, code in errors._HTTP_STATUS_CODES.items()]
    gunicorn = [(code, status) for status, code in GUNICORN_CODES.items()]
    assert len(raised) > 15
    for code, status in [*raised, *mapped, *gunicorn, (ErrorCode.INTERNAL_ERROR, 500)]:
        assert status in ERROR_CODE_DOCS[code].statuses, (code, status)


def test_every_spec_lists_the_codes_as_an_enum_each_described(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    assert schemas["Error"]["properties"]["error"] == {"$ref": "#/components/schemas/ErrorCode"}
    code_schema = schemas["ErrorCode"]
    assert code_schema["type"] == "string"
    assert code_schema["enum"] == [str(code) for code in ErrorCode]
    assert code_schema["x-enum-descriptions"] == [ERROR_CODE_DOCS[code].meaning for code in ErrorCode]
    for code in ErrorCode:
        assert f"- `{code}` (" in code_schema["description"], code


def test_every_operation_of_every_spec_has_a_summary_and_a_description(spec: dict[str, Any]) -> None:
    operations = [
        (method.upper(), path, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    ]
    assert len(operations) >= 5
    for method, path, operation in operations:
        summary, description = operation.get("summary", ""), operation.get("description", "")
        assert summary.strip(), f"{method} {path} has no summary"
        assert len(description.strip()) > len(summary) // 2, f"{method} {path} has no description"
        assert description.strip() != summary.strip(), f"{method} {path}: the description repeats the summary"


def test_docs_errors_md_is_generated_from_error_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert (ROOT / ERRORS_MARKDOWN).read_text() == render_errors_markdown(), "run: python -m fractal.api_docs"
    assert main(["--check"]) == 0
    for code in ErrorCode:
        assert f"| `{code}` |" in render_errors_markdown()


def test_a_stale_errors_md_fails_the_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "errors.md"
    stale.write_text(render_errors_markdown().replace("`NOT_FOUND`", "`GONE`"))
    assert main(["--check", "--output", str(stale)]) == 1
    assert "stale" in capsys.readouterr().err
    assert main(["--output", str(stale)]) == 0
    assert main(["--check", "--output", str(stale)]) == 0
