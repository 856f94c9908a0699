"""Named chat templates for a merge's ``chat_template:`` key (mergekit's names), written for the formats
their model families define:

- ``chatml``: OpenAI's Chat Markup Language (``<|im_start|>ROLE\\n...<|im_end|>\\n``).
- ``llama3``: Meta Llama 3's header/``<|eot_id|>`` turns after the BOS token.
- ``mistral``: Mistral's ``[INST] ... [/INST]`` turns, an optional system message folded into the first
  user turn, roles alternating.
- ``alpaca``: Stanford Alpaca's ``### Instruction:`` / ``### Input:`` / ``### Response:`` blocks.
- ``exaone``: LG EXAONE 3's ``[|ROLE|]`` turns with ``[|endofturn|]``.
"""

from __future__ import annotations

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

MISTRAL = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('mistral chat template: after an optional system message, roles must alternate "
    "user/assistant') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system is defined %}"
    "{{ ' [INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('mistral chat template: roles are user and assistant (and a first "
    "system message)') }}"
    "{% endif %}"
    "{% endfor %}"
)

ALPACA = (
    "{% set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
    "{% if systems %}{{ systems[-1]['content'] | trim + '\\n\\n' }}{% endif %}"
    "{% set heads = {'user': '### Instruction:', 'assistant': '### Response:',"
    " 'user_context': '### Input:'} %}"
    "{% set ns = namespace(first=true) %}"
    "{% for message in messages if message['role'] in heads %}"
    "{% if not ns.first %}{{ '\\n\\n' }}{% endif %}{% set ns.first = false %}"
    "{{ heads[message['role']] + '\\n' + message['content'] | trim }}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages and messages[-1]['role'] != 'assistant' %}"
    "{{ '\\n\\n### Response:\\n' }}"
    "{% endif %}"
)

EXAONE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
    "{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)

TEMPLATES = {"alpaca": ALPACA, "chatml": CHATML, "exaone": EXAONE, "llama3": LLAMA3, "mistral": MISTRAL}
