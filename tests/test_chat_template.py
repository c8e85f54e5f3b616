"""Chat templates: the three real models' prompts exactly, the built-in fallbacks, and the sandbox holding."""
import time

import pytest

from conftest import model_path
from edgeinfer.chat_template import CHATML_TEMPLATE, GEMMA_TEMPLATE, ChatTemplate
from edgeinfer.errors import TemplateError
from edgeinfer.gguf_reader import GGUFFile

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]

CONVERSATION_CHATML = (
    "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4<|im_end|>\n"
    "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
    "<|im_start|>assistant\n"
)

# llama.cpp's own test conversation (tests/test-chat-template.cpp) and its expected Gemma output
LLAMA_CPP_CHAT = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Another question"},
]
LLAMA_CPP_GEMMA = (
    "<start_of_turn>user\nYou are a helpful assistant\n\nHello<end_of_turn>\n"
    "<start_of_turn>model\nHi there<end_of_turn>\n"
    "<start_of_turn>user\nWho are you<end_of_turn>\n"
    "<start_of_turn>model\nI am an assistant<end_of_turn>\n"
    "<start_of_turn>user\nAnother question<end_of_turn>\n"
    "<start_of_turn>model\n"
)

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@pytest.fixture(scope="module")
def model_metadata():
    """Catalogue name -> the GGUF metadata dict, read once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            with GGUFFile(model_path(name)) as f:
                cache[name] = f.metadata
        return cache[name]

    return get


# -- the real models ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_renders_chatml(model_metadata):
    template = ChatTemplate.from_metadata(model_metadata("smollm2-135m-instruct"))
    assert template.render(CONVERSATION, add_generation_prompt=True) == CONVERSATION_CHATML
    # SmolLM2's BOS token *is* <|im_start|>, so the prompt already opens with it: the caller adds none
    assert template.bos_token == "<|im_start|>" and template.eos_token == "<|im_end|>"
    assert template.renders_bos


@pytest.mark.slow
def test_qwen25_renders_chatml_with_its_default_system_prompt(model_metadata):
    template = ChatTemplate.from_metadata(model_metadata("qwen2.5-coder-0.5b-instruct"))
    assert template.render(CONVERSATION, add_generation_prompt=True) == CONVERSATION_CHATML
    assert template.render(CONVERSATION[1:], add_generation_prompt=False) == (
        f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
    )
    assert template.bos_token == "<|endoftext|>" and not template.renders_bos


@pytest.mark.slow
def test_qwen25_tools_go_through_tojson_unescaped(model_metadata):
    template = ChatTemplate.from_metadata(model_metadata("qwen2.5-coder-0.5b-instruct"))
    tool = {"type": "function", "function": {"name": "add", "description": "a <b> & c, café"}}
    text = template.render([{"role": "user", "content": "hi"}], tools=[tool])
    assert '\n<tools>\n{"type": "function", "function": {"name": "add", "description": "a <b> & c, café"}}\n</tools>' \
        in text
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_gemma3_has_no_template_and_falls_back_to_gemma_turns(model_metadata):
    meta = model_metadata("gemma3-270m")
    assert "tokenizer.chat_template" not in meta
    template = ChatTemplate.from_metadata(meta)
    assert template.name == "built-in gemma3"
    assert template.render(CONVERSATION, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nYou are a terse assistant.\n\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert template.renders_bos


# -- built-in templates and metadata handling -----------------------------------------------------------------------
def test_gemma_builtin_matches_llama_cpp():
    assert ChatTemplate(GEMMA_TEMPLATE).render(LLAMA_CPP_CHAT) == LLAMA_CPP_GEMMA
    assert ChatTemplate(GEMMA_TEMPLATE, bos_token="<bos>").render(LLAMA_CPP_CHAT) == "<bos>" + LLAMA_CPP_GEMMA


def test_chatml_builtin_matches_llama_cpp():
    text = ChatTemplate(CHATML_TEMPLATE).render(LLAMA_CPP_CHAT[:3], add_generation_prompt=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
                    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n")


@pytest.mark.parametrize("arch, name", [("gemma", "built-in gemma"), ("gemma2", "built-in gemma2"),
                                        ("llama", "built-in chatml"), ("", "built-in chatml")])
def test_fallback_is_chosen_by_architecture(arch, name):
    meta = {"general.architecture": arch, "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>"],
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1}
    template = ChatTemplate.from_metadata(meta)
    assert template.name == name
    assert (template.bos_token, template.eos_token) == ("<bos>", "<eos>")
    assert ChatTemplate.from_metadata({}, architecture=arch).name == name


def test_from_metadata_prefers_the_file_template_and_token_text():
    meta = {"general.architecture": "gemma3", "general.name": "Tiny",
            "tokenizer.chat_template": "{{ bos_token }}|{{ eos_token }}",
            "tokenizer.ggml.bos_token_id": 7, "tokenizer.ggml.eos_token_id": 8}
    template = ChatTemplate.from_metadata(meta, token_text=lambda i: f"<t{i}>")
    assert template.name == "Tiny"
    assert template.render([]) == "<t7>|<t8>"


def test_bos_id_outside_the_vocabulary_is_a_template_error():
    with pytest.raises(TemplateError, match="bos_token_id = 9"):
        ChatTemplate.from_metadata({"tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.bos_token_id": 9})


def test_renders_bos_is_false_without_a_bos_string():
    assert not ChatTemplate(GEMMA_TEMPLATE).renders_bos


# -- what templates may use ---------------------------------------------------------------------------------------
def test_hf_globals_and_filters():
    template = ChatTemplate(
        "{{ strftime_now('%Y') | length }} {{ {'k': 'é<>'} | tojson }} {{ [1] | tojson(indent=2) }} "
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }} "
        "{{ add_generation_prompt }} {{ tools is none }} {{ extra_flag }}"
    )
    assert template.render(CONVERSATION, extra_flag="yes") == '4 {"k": "é<>"} [\n  1\n] 2 True True yes'


def test_undefined_variable_renders_empty_as_in_hf():
    assert ChatTemplate("[{{ not_passed }}]{% if message_tool_calls %}x{% endif %}").render([]) == "[]"


# -- failures are one-line TemplateErrors -------------------------------------------------------------------------
@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{% endfor %}",
    "{% set x = [] %}{{ x.append(1) }}",
    "{{ messages.pop() }}",
    "{{ 'x' * 100000000 }}",
    "{{ 2 ** 100000000 }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}0123456789{% endfor %}{% endfor %}",
])
def test_sandbox_violations_raise_template_error(source):
    with pytest.raises(TemplateError, match=r"^chat template evil(, line \d+)?: forbidden by the sandbox: ") as e:
        ChatTemplate(source, name="evil").render(CONVERSATION)
    assert "\n" not in str(e.value)


# -- a render cannot hang or exhaust the machine (issue 11, item 6) --------------------------------------------------
@pytest.mark.parametrize("source, limit", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "2 s time limit"),
    ("{% set xs = range(100000) | list %}{% for i in xs %}{% for j in xs %}{% endfor %}{% endfor %}",
     "2 s time limit"),
    ("{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}",
     "2 s time limit"),  # recursion two ways deep: 2**60 calls, each of them checking the clock
    ("{% for i in range(100000) %}{% for j in range(100000) %}{{ messages }}{% endfor %}{% endfor %}",
     "past 4,000,000 characters"),
    ("{{ 'a' * 10**10 }}", "past 4,000,000 characters"),
    ("{% set ns = namespace(s='a' * 1000000) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     "past 4,000,000 characters"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "past 4,000,000 characters"),
    ("{% set xs = range(100000) | list %}{% set a = [xs, xs, xs, xs, xs, xs, xs, xs, xs, xs] %}"
     "{{ [a, a, a, a, a, a, a, a, a, a] }}", "past 4,000,000 characters"),  # small in memory, huge in print
    ("{{ (['a' * 1000000] * 1000) | join }}", "past 4,000,000 characters"),
    ("{{ ('a' * 1000000).replace('a', 'aaaaaaaaaa') }}", "str.replace would be past"),
    ("{{ 'a' | center(10**9) }}", "center would be past"),
    ("{{ 'a'.rjust(10**9) }}", "str.rjust(1000000000) would be past"),
    ("{{ '%1000000000d' % 1 }}", "format width '1000000000'"),
    ("{{ '{:>1000000000}'.format(1) }}", "format spec"),
    ("{{ [1] | batch(10**9, 'x') | list }}", "batch would be past"),
    ("{{ messages | tojson(indent=10**9) }}", "tojson indent"),
    ("{% set ns = namespace(x=10**1000) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
     "too large"),
])
def test_renders_are_bounded_in_time_and_size(source, limit):
    started = time.monotonic()
    with pytest.raises(TemplateError, match=r"^chat template evil(, line \d+)?: forbidden by the sandbox: ") as e:
        ChatTemplate(source, name="evil").render(CONVERSATION)
    assert limit in str(e.value) and "\n" not in str(e.value)
    assert time.monotonic() - started < 3.5


def test_a_macro_calling_itself_is_a_template_error():
    started = time.monotonic()
    with pytest.raises(TemplateError, match="RecursionError"):
        ChatTemplate("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", name="loop").render(CONVERSATION)
    assert time.monotonic() - started < 3.5


def test_lipsum_is_not_offered():
    with pytest.raises(TemplateError, match="'lipsum' is undefined"):
        ChatTemplate("{{ lipsum(10**6) }}").render([])


def test_bounded_loops_and_concatenation_keep_jinja_semantics():
    template = ChatTemplate(
        "{% for m in messages %}{{ loop.index }}/{{ loop.length }}{{ '.' if loop.last else ',' }}{% endfor %}"
        "{% for m in messages if m.role == 'user' %}{{ m.content ~ '|' }}{% else %}none{% endfor %}"
        "{% for x in [[1, [2]], [3]] recursive %}{% if x is iterable %}{{ loop(x) }}{% else %}{{ x }}{% endif %}"
        "{% endfor %}{% for k, v in {'a': 1} | dictsort %} {{ k ~ v ~ 2 }}{% endfor %}"
        "{% for i in [] %}{% else %} empty{% endfor %} {{ '%s-%02d' | format('x', 7) }} {{ 'ab' * 2 + 'c' }}")
    assert template.render(CONVERSATION) == "1/4,2/4,3/4,4/4.What is 2+2?|And 3+3?|123 a12 empty x-07 ababc"


def test_raise_exception_surfaces_the_templates_message():
    source = "{% if messages[0]['role'] == 'system' %}\n{{ raise_exception('System role not supported') }}{% endif %}"
    with pytest.raises(TemplateError) as e:
        ChatTemplate(source, name="strict").render(CONVERSATION)
    assert str(e.value) == "chat template strict, line 2: raised: System role not supported"


def test_syntax_error_is_a_template_error():
    with pytest.raises(TemplateError) as e:
        ChatTemplate("{% for m in messages %}\n{{ m.content }", name="broken")
    assert str(e.value).startswith("chat template broken, line 2: syntax error: ")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("source, problem", [
    ("{{ missing.attribute }}", "undefined: 'missing' is undefined"),
    ("{{ 1 / 0 }}", "failed: ZeroDivisionError"),
    ("{{ messages[0]['content'] + 1 }}", "failed: TypeError"),
    ('{% include "other.jinja" %}', "failed: TypeError: no loader"),
])
def test_runtime_failures_are_template_errors(source, problem):
    with pytest.raises(TemplateError, match=f"^chat template t, line 1: {problem}"):
        ChatTemplate(source, name="t").render(CONVERSATION)


def test_non_text_template_is_a_template_error():
    with pytest.raises(TemplateError, match="expected text, found int"):
        ChatTemplate(3)
