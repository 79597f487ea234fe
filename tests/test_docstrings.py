"""The worked examples in the docstrings are part of the course: run them, so none goes stale."""
import doctest

import pytest

import chat
import diagnose
import grpo
import protocol
import traces


@pytest.mark.parametrize("module", [protocol, traces, grpo, diagnose, chat], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0, f"{module.__name__} has no docstring examples to run"
    assert result.failed == 0
