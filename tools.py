"""
Tool workers: a forked sub-query may go to a tool instead of the model (`--tools calc,check`).

The organizer names the tool as the sub-query's prefix; the tool's answer comes back at <JOIN-i>
exactly like a worker's takeaway:

    <FORK-3>calc: 12*9+4</FORK-3> ... <JOIN-3>112</JOIN-3>
    <FORK-4>check: 12*2-5</FORK-4> ... <JOIN-4>ok</JOIN-4>          (puzzle: 1 2 5 8 11 12 to 19)
    <FORK-5>check: 12+8-2</FORK-5> ... <JOIN-5>no: equals 18 not 19</JOIN-5>

    calc   the exact value of an expression over integers with + - * / and parentheses
           (tasks.exact_value, never `eval`): "112", "7/2" for a fraction
    check  the episode's own verifier on a proposed answer: a countdown expression (numbers
           available, each once, value the target) or a Sudoku grid; "ok" or "no: <reason>"

A tool answers within protocol.TOOL_STEPS = 1 decode step and takes no cache slot, but it is a
fork like any other: it holds one of the pool's c-1 places until the organizer joins it. Input
longer than MAX_INPUT characters, or a calc value longer than MAX_OUTPUT, gets an error text the
organizer reads ("error: ..."), a check's reason is cut to MAX_OUTPUT; no request, however
malformed, raises.
"""

import tasks

MAX_INPUT = 100   # characters of a tool's argument
MAX_OUTPUT = 60   # characters of a tool's answer (long products would otherwise flood the context)


def calc(expression):
    """The exact value: calc("12*9+4") -> "112", calc("7/2") -> "7/2", calc("1/0") -> "error: ..."."""
    try:
        value = tasks.exact_value(expression)  # a Fraction
    except ValueError as e:
        return f"error: {e}"
    text = str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    return text if len(text) <= MAX_OUTPUT else f"error: value longer than {MAX_OUTPUT} characters"


def check(answer, row):
    """The puzzle's verifier on one answer: "ok", or "no: " and the verifier's reason.

    >>> row = {"task": "countdown", "numbers": [1, 2, 5, 8, 11, 12], "target": 19, "k": 4}
    >>> check("12*2-5", row), check("12+8-2", row)
    ('ok', 'no: equals 18 not 19')
    """
    if row["task"] == "countdown":
        reason = tasks.check_countdown(answer, row["numbers"], row["target"])
    else:
        reason = tasks.check_sudoku(answer, row["puzzle"])
    return "ok" if reason is None else f"no: {reason}"[:MAX_OUTPUT]


def run_tool(name, argument, row):
    """A tool's answer to `argument` for the episode's puzzle `row`, as the text the organizer
    reads. Never raises: an unknown tool, an overlong input or output, a malformed request all
    answer "error: ..."."""
    if len(argument) > MAX_INPUT:
        return f"error: input longer than {MAX_INPUT} characters"
    if name == "calc":
        return calc(argument)
    if name == "check":
        return check(argument, row)
    return f"error: unknown tool {name[:20]!r}"
