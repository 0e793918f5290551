"""A Hermes/Qwen-style chat template that renders tools, assistant tool calls and tool results,
for tests: tools as JSON lines in a system block, calls as ``<tool_call>`` JSON, results as
``<tool_response>`` blocks."""

from __future__ import annotations

from tokenizers import Tokenizer as HFTokenizer

from arlm.tokenizer import Tokenizer

HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call a function with <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def with_template(tokenizer: Tokenizer, template: str = HERMES_TEMPLATE) -> Tokenizer:
    """``tokenizer`` with ``template`` as its chat template."""
    return Tokenizer(
        HFTokenizer.from_str(tokenizer.to_json()),
        eos_token_ids=tokenizer.eos_token_ids,
        chat_template=template,
        bos_token_id=tokenizer.bos_token_id,
    )
