"""Exact arithmetic from text, without eval.

Python's `ast` parses the expression; only numbers, + - * / // % ** and parentheses are
evaluated. Written here because the libraries that do this (simpleeval, asteval) evaluate far
more than arithmetic, which is exactly what a tool reachable by a model must not do.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from decimal import Decimal, DivisionByZero, InvalidOperation, localcontext
from fractions import Fraction

MAX_EXPONENT = 1_000
MAX_DIGITS = 4_000

_BINARY: dict[type[ast.operator], Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: lambda a, b: Fraction(a // b),
    ast.Mod: operator.mod,
}


class CalculatorError(ValueError):
    """The text is not plain arithmetic, or it cannot be computed safely."""


def evaluate(expression: str) -> str:
    """The value of `expression` as text: an integer, or a decimal rounded to 12 places."""
    source = expression.replace("^", "**").strip()
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from exc
    try:
        value = _eval(tree.body)
    except ZeroDivisionError as exc:
        raise CalculatorError("division by zero") from exc
    return _format(value)


def _eval(node: ast.expr) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        operand = _eval(node.operand)
        return operand if isinstance(node.op, ast.UAdd) else -operand
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        op = _BINARY.get(type(node.op))
        if op is not None:
            return op(left, right)
    raise CalculatorError(f"only numbers and + - * / // % ^ ( ) are allowed, not {type(node).__name__}")


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise CalculatorError("only whole-number exponents are supported")
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent larger than {MAX_EXPONENT}")
    if base == 0 and exponent < 0:
        raise ZeroDivisionError
    # Refuse before computing: the result has about |exponent| * digits(base) digits.
    size = max(base.numerator.bit_length(), base.denominator.bit_length()) * abs(int(exponent)) * 0.30103
    if size > MAX_DIGITS:
        raise CalculatorError("result too large")
    return base ** int(exponent)


def _format(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    with localcontext() as ctx:
        ctx.prec = 40
        try:
            decimal = (Decimal(value.numerator) / Decimal(value.denominator)).quantize(Decimal("1e-12"))
        except (InvalidOperation, DivisionByZero) as exc:
            raise CalculatorError("result cannot be shown as a decimal") from exc
    return format(decimal.normalize(), "f")
