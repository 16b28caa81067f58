"""Forced tool calls: `tool_choice` naming a function, or "required", becomes a grammar over the
tools' parameter schemas, and the constrained output becomes OpenAI's `tool_calls`.

The tools are described to the model in a system message put first (SmolLM2's chat template, like
many, has no tool syntax of its own). A named function constrains the output to its arguments;
"required" to `{"name": ..., "arguments": ...}` for one of the tools. `tool_choice: "auto"` (the
default when tools are given) would need a parser of the model's own tool-call format, which
radixkv does not have: it is refused, never guessed.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from radixkv.client.core import Message
from radixkv.protocol import ChatMessage

ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolPlan:
    """How one request calls a tool: the output's JSON schema, the system message describing
    the tools, and the forced function's name (None: the output names one, "required")."""

    schema: str
    system: str
    named: str | None


def plan_tools(tools: list[dict[str, Any]], choice: str | dict[str, Any] | None) -> ToolPlan:
    """The plan of a request whose tool_choice is "required" or names a function (checked)."""
    functions = {t["function"]["name"]: t["function"] for t in tools}
    described = [
        {k: f[k] for k in ("name", "description", "parameters") if k in f}
        for f in functions.values()
    ]
    system = (
        "You can call these functions. Answer with a call, as JSON.\n"
        f"Functions: {json.dumps(described)}"
    )
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        return ToolPlan(json.dumps(functions[name].get("parameters") or ANY_OBJECT), system, name)
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": name},
                "arguments": f.get("parameters") or ANY_OBJECT,
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, f in functions.items()
    ]
    return ToolPlan(json.dumps({"anyOf": calls}), system, None)


def with_tools_message(plan: ToolPlan, messages: list[Message]) -> list[Message]:
    return [ChatMessage("system", plan.system), *messages]


def tool_calls(plan: ToolPlan, text: str) -> list[dict[str, Any]] | None:
    """OpenAI's `tool_calls` of a constrained output; None if it is not complete JSON (e.g. it
    ran out of max_tokens)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if plan.named is not None:
        name, arguments = plan.named, value
    else:
        name, arguments = value["name"], value["arguments"]
    call = {"name": name, "arguments": json.dumps(arguments)}
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call}]


class ToolStream:
    """One choice's forced tool call as OpenAI streams it: `delta.tool_calls` entries (index 0;
    the first with the id, type and name). A named function's output is its arguments, streamed
    as they come; under "required" the output names the function first, so the call is sent
    whole at the end. If the output is not a complete call (max_tokens ran out), the finish
    reason is the request's own, as OpenAI's is."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.id = f"call_{uuid.uuid4().hex[:24]}"

    def delta(self, piece: str) -> dict[str, Any] | None:
        """The delta for a piece of output text (None: nothing to send yet)."""
        first = not self.text
        self.text += piece
        if self.plan.named is None:
            return None
        if first:
            function = {"name": self.plan.named, "arguments": piece}
            return {"tool_calls": [{"index": 0, "id": self.id, "type": "function",
                                    "function": function}]}  # fmt: skip
        return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}

    def end(self, result: Any) -> tuple[dict[str, Any] | None, str]:
        """The last delta (if any) and the finish reason, given the final Result."""
        calls = tool_calls(self.plan, self.text)
        if calls is None:
            if self.plan.named is None and self.text:  # not a call: what was written, as text
                return {"content": self.text}, result.finish_reason
            return None, result.finish_reason
        if self.plan.named is not None:
            return None, "tool_calls"
        calls[0]["id"] = self.id
        return {"tool_calls": [{"index": 0, **calls[0]}]}, "tool_calls"


def call_text(call: dict[str, Any]) -> str:
    """An assistant's earlier tool call, as the text the model was made to write for it."""
    function = call.get("function") or {}
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except json.JSONDecodeError:
        arguments = function.get("arguments")
    return json.dumps({"name": function.get("name"), "arguments": arguments})
