"""The default model answers: `edgeinfer chat` without MODEL is Qwen2.5-Coder 0.5B Instruct, and it knows Paris.

SmolLM2-135M Q4_1 (the former default) answers such questions with nonsense, in llama.cpp too: it is the file."""
import pytest

from cli_helpers import run_edgeinfer
from conftest import model_path
from models.catalogue import BUILTIN_CATALOGUE, default_model_name, load_catalogue

slow = pytest.mark.slow
DEFAULT = "qwen2.5-coder-0.5b-instruct"
QUESTION = "What is the capital of France?\n"
# small and fixed: one thread on a shared machine, a context the question fits in many times
CHAT = ["chat", "--threads", "1", "--ctx", "512", "--max-tokens", "24"]


def test_the_default_model_is_qwen_and_a_chat_model():
    assert default_model_name(BUILTIN_CATALOGUE) == DEFAULT
    entries = load_catalogue(BUILTIN_CATALOGUE)
    assert entries[DEFAULT].kind == "chat"
    assert entries["smollm2-135m-instruct"].kind == "chat" and entries["gemma3-270m"].kind == "base"


@pytest.fixture(scope="module")
def fetched():
    model_path(DEFAULT)  # pull outside the timed runs


def ask(*options):
    done = run_edgeinfer(*CHAT, *options, input=QUESTION, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


@slow
def test_the_default_model_answers_paris_greedy(fetched):
    assert "Paris" in ask("--temp", "0")


@slow
def test_the_default_model_answers_paris_with_the_default_sampling(fetched):
    # the chat defaults: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, repeat penalty (1.1); a fixed seed
    assert "Paris" in ask("--seed", "1")


@slow
def test_repeat_penalty_1_1_leaves_the_greedy_answer_as_it_is(fetched):
    assert ask("--temp", "0", "--repeat-penalty", "1.1") == ask("--temp", "0", "--repeat-penalty", "1")
