"""The OpenAI Agents SDK (``openai-agents``, a client nobody here wrote) runs an agent with two
tools to a final answer over a live ``arlm serve``, streamed and not.

What this proves, honestly: a random-weight model does not choose tools sensibly, so the agent
runs with ``tool_choice="required"``, and its requests bias the quote token (``logit_bias``, a
sampling setting any client may send) so that the random model's JSON strings close within
``max_tokens`` (unbiased, a string runs on for hundreds of tokens); the SDK then resets the
choice to ``auto`` after the first tool use (its default ``reset_tool_choice``), and the model's
next answer is text, the final output. So the test shows that the SDK's requests (tools,
tool_choice, its message history with assistant ``tool_calls`` and ``tool`` results, streaming)
are accepted, that the call the server returns parses and validates against the tool's schema so
the SDK can run the tool, and that the run ends with a final answer; not that the model reasons.
"""

from __future__ import annotations

import asyncio

import pytest

from arlm.api import LM
from arlm.engine import EngineConfig
from tests.conftest import make_model
from tests.serving import LiveServer
from tests.tool_template import with_template

agents = pytest.importorskip("agents")
pytest.importorskip("xgrammar")


@pytest.fixture(scope="module")
def live(tokenizer):
    engine = EngineConfig(kv_cache_memory_gib=0.25, max_num_seqs=4)
    # sampled, unseeded: a turn's tool call can take all 200 of its tokens, and the history of
    # four such turns outgrows a 1,024-token context (a 400 that ended the run now and then)
    lm = LM(make_model(block_size=2048), with_template(tokenizer), engine_config=engine)
    with LiveServer(lm) as s:
        yield s


def make_agent(live, calls: list, quote: int):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, function_tool
    from openai import AsyncOpenAI

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(("get_weather", city))
        return f"sunny in {city}"

    @function_tool
    def add(a: int, b: int) -> int:
        """The sum of two integers."""
        calls.append(("add", a, b))
        return a + b

    client = AsyncOpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
    return Agent(
        name="assistant",
        instructions="Use a tool, then answer.",
        model=OpenAIChatCompletionsModel(model="tiny", openai_client=client),
        model_settings=ModelSettings(
            tool_choice="required",
            max_tokens=200,
            temperature=1.0,
            parallel_tool_calls=False,
            extra_args={"logit_bias": {str(quote): 8}},
        ),
        tools=[get_weather, add],
    )


@pytest.mark.parametrize("streamed", [False, True])
def test_an_agent_with_two_tools_runs_to_a_final_answer(live, tokenizer, streamed):
    from agents import Runner, set_tracing_disabled

    set_tracing_disabled(True)
    calls: list = []
    (quote,) = tokenizer.encode('"')
    agent = make_agent(live, calls, quote)

    async def run():
        if not streamed:
            return await Runner.run(agent, "What is the weather in Paris, and 2 + 3?", max_turns=4)
        result = Runner.run_streamed(agent, "What is the weather in Paris, and 2 + 3?", max_turns=4)
        kinds = [event.type async for event in result.stream_events()]
        assert "raw_response_event" in kinds
        return result

    result = asyncio.run(run())
    # the required first turn called a tool with arguments that fit its schema: the SDK ran it
    assert len(calls) == 1
    name, *args = calls[0]
    assert name in ("get_weather", "add")
    assert all(isinstance(a, str if name == "get_weather" else int) for a in args)
    assert isinstance(result.final_output, str)
    items = [type(i).__name__ for i in result.new_items]
    assert items[:2] == ["ToolCallItem", "ToolCallOutputItem"] and items[-1] == "MessageOutputItem"
