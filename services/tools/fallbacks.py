"""Python functions registered as tools for goal types' deterministic fallbacks.

A goal type names one (`[fallback] function = "..."`, services/runtime/goal_types.py); the
orchestrator calls it through this executor when the agent path fails, so it is allowlisted,
limited and audited like any tool. It is called with the goal's text and why the agents failed.
"""

from __future__ import annotations

from schemas.tools import FallbackFunctionArgs, ToolArgs
from services.runtime.offline_model import find_expressions
from services.tools.calculator import CalculatorError, evaluate
from services.tools.registry import CallContext, Tool, ToolUsageError


def arithmetic_answer() -> Tool:
    """Computes every arithmetic expression in the goal's text with the calculator. Text with no
    expression is a usage error: the fallback cannot answer it, so the goal escalates or fails."""

    async def run(args: ToolArgs, _: CallContext) -> str:
        assert isinstance(args, FallbackFunctionArgs)
        # A full stop that ends the sentence is not the expression's.
        found = [e.rstrip(".").strip() for e in find_expressions(args.goal_text)]
        if not found:
            raise ToolUsageError("no arithmetic expression in the goal's text")
        lines = []
        for expression in found:
            try:
                lines.append(f"{expression} = {evaluate(expression)}")
            except CalculatorError as exc:
                lines.append(f"{expression}: {exc}")
        return "\n".join(lines)

    return Tool(run)


FALLBACK_FUNCTIONS = {"arithmetic_answer": arithmetic_answer}
"""Every registered fallback function by tool name; each has its ToolSpec in schemas.tools."""
