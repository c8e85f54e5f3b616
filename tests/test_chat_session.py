"""ChatSession on SmolLM2: KV reuse across turns (exact counts), the context window, save/load, power adaptation.

Greedy sampling with one thread keeps the answers deterministic; expectations are computed from token lists here,
independently of the session's own bookkeeping.
"""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import model_path
from edgeinfer.api import Model
from edgeinfer.budget import SystemState
from edgeinfer.session import ChatSession, MessageTooLong, PowerWatch

pytestmark = pytest.mark.slow
GREEDY = dict(temperature=0.0, seed=1)


@pytest.fixture(scope="module")
def model():
    with Model(model_path("smollm2-135m-instruct"), n_ctx=512, n_threads=1) as m:
        yield m


@pytest.fixture(scope="module")
def small_model():
    with Model(model_path("smollm2-135m-instruct"), n_ctx=256, n_threads=1) as m:
        yield m


def in_cache_after(model, session) -> list[int]:
    """What the KV cache must hold after the last answer: its prompt and the generated tokens, less the last one
    when generation stopped at max_tokens (a sampled token is only evaluated when another one follows)."""
    *history, reply = session.context_messages()
    cached = model.chat_tokens(history) + model.tokenize(reply["content"], add_special=False)
    return cached[:-1] if session.last_stats.stop_reason == "length" else cached


def test_turn3_evaluates_only_the_new_tokens(model):
    session = model.session(system="You are a concise assistant.", max_tokens=48, **GREEDY)
    session.send("Hi, my name is Ana.")
    session.send("What is the capital of France?")
    expected_cached = in_cache_after(model, session)
    text = "And the capital of Spain?"
    prompt3 = model.chat_tokens(session.context_messages() + [{"role": "user", "content": text}])
    assert prompt3[:len(expected_cached)] == expected_cached  # the re-rendered answer tokenizes as generated

    session.send(text)

    stats = session.last_stats
    assert stats.prompt_tokens == len(prompt3)
    new = prompt3[len(expected_cached):]
    assert stats.prompt_tokens_evaluated == len(new)
    # the new part: the template's end of the last answer, the new message, the start of the next answer
    assert model.detokenize(new, special=True).endswith(
        f"<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")
    assert len(new) < 20 < len(prompt3)


def test_interrupted_answer_is_kept_and_reused(model):
    session = model.session(max_tokens=200, **GREEDY)
    pieces = session.send("Tell me a long story about a dragon.", stream=True)
    shown = [next(pieces) for _ in range(3)]
    pieces.close()  # what Ctrl-C does in the chat
    assert session.last_interrupted
    assert session.messages[-1] == {"role": "assistant", "content": "".join(shown)}
    assert [m["role"] for m in session.messages] == ["user", "assistant"]

    session.send("Stop there.", max_tokens=8)
    assert session.last_stats.prompt_tokens_evaluated < 20
    assert not session.last_interrupted


def test_context_full_drops_the_oldest_turns(small_model):
    session = small_model.session(system="Be brief.", max_tokens=32, **GREEDY)
    long_message = "Here is a list of fruits: " + ", ".join(["apple", "banana", "cherry", "grape"] * 8) + "."
    dropped_at = None
    for turn in range(5):
        session.send(f"{turn}. {long_message} Which one is red?")
        stats = session.last_stats
        assert stats.prompt_tokens + session.answer_reserve <= small_model.n_ctx
        if any("dropped the oldest" in n for n in session.notices):
            dropped_at = turn
            break
    assert dropped_at is not None, "the context never filled"
    assert len(session.messages) == 1 + 2 * (dropped_at + 1)  # nothing lost from the conversation
    in_view = session.context_messages()
    assert in_view[0] == {"role": "system", "content": "Be brief."}
    assert in_view[1]["role"] == "user" and not in_view[1]["content"].startswith("0.")  # the oldest turn left
    assert session.first_in_context > 1
    assert in_view[-2]["content"].startswith(f"{dropped_at}.")


def test_a_message_longer_than_the_context_is_refused(small_model):
    session = small_model.session(max_tokens=16, **GREEDY)
    session.send("Hi!")
    before = [dict(m) for m in session.messages]
    with pytest.raises(MessageTooLong, match="it was not added"):
        session.send("word " * 400)
    assert session.messages == before


def test_answer_stopped_by_a_full_context_says_so(small_model):
    session = small_model.session(max_tokens=64, **GREEDY)  # reserve: 256 // 4 = 64 positions
    filler = "Please remember these numbers: " + " ".join(str(n) for n in range(40)) + "."
    session.send(filler + " Now count from one to one hundred in words.", max_tokens=500)
    assert session.last_stats.stop_reason == "context"
    assert any("the context is full" in n for n in session.notices)
    assert small_model.engine.n_past == small_model.n_ctx
    session.send("Thanks.", max_tokens=4)  # the next turn makes room instead of failing
    assert any("dropped the oldest" in n for n in session.notices)


def test_save_and_load_resume_without_prefill(model, tmp_path):
    session = model.session(system="You are a concise assistant.", max_tokens=32, **GREEDY)
    session.send("Name a colour.")
    session.send("Name another one.")
    path, kv_path = session.save(tmp_path / "conv.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.json", "conv.json.kv.npz"]  # no temp files left
    doc = json.loads(path.read_text())
    assert doc["messages"] == session.messages
    expected_cached = in_cache_after(model, session)

    model._cached.reset()  # as a new process would start
    resumed = model.session(max_tokens=32, **GREEDY)
    line = resumed.load(path)
    assert "KV cache restored" in line
    assert resumed.messages == session.messages and resumed.system == "You are a concise assistant."
    text = "And a third?"
    prompt = model.chat_tokens(resumed.context_messages() + [{"role": "user", "content": text}])
    resumed.send(text)
    assert resumed.last_stats.prompt_tokens_evaluated == len(prompt) - len(expected_cached)

    # a KV file of another model file is ignored: the conversation loads and is evaluated again
    with np.load(kv_path) as z:
        arrays = dict(z)
    identity = json.loads(str(arrays["identity"]))
    arrays["identity"] = np.array(json.dumps({**identity, "model_size": identity["model_size"] + 1}))
    np.savez(kv_path, **arrays)
    model._cached.reset()
    assert "saved for another model file" in model.session().load(path)


def test_load_rejects_a_file_that_is_not_a_conversation(model, tmp_path):
    from edgeinfer.session import SessionFileError

    (tmp_path / "x.json").write_text('{"messages": 3}')
    with pytest.raises(SessionFileError, match="not an edgeinfer conversation"):
        model.session().load(tmp_path / "x.json")


def test_settings_are_validated(model):
    session = model.session()
    with pytest.raises(ValueError, match="top_p"):
        session.set(top_p=2.0)
    with pytest.raises(ValueError, match="unknown setting"):
        session.set(colour=1)
    with pytest.raises(ValueError, match="max_tokens"):
        session.set(max_tokens=0)
    session.set(temperature=0.5, max_tokens=7)
    assert session.settings()["temperature"] == 0.5 and session.max_tokens == 7


def test_model_chat_keeps_one_session(model):
    import edgeinfer

    kept = model.chat()
    assert isinstance(kept, edgeinfer.ChatSession) and model.chat() is kept
    kept.reset()
    reply = model.chat("Hi!", max_tokens=8, **GREEDY)
    assert kept.messages == [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": reply}]
    # a whole message list is still answered one-off, outside the kept session
    assert isinstance(model.chat([{"role": "user", "content": "Hi!"}], max_tokens=4, **GREEDY), str)
    assert len(kept.messages) == 2


# ---------------------------------------------------------------- power adaptation (a simulated machine)

def machine(plugged: bool | None, percent: float | None) -> SystemState:
    return SystemState(total_memory=8 << 30, available_memory=4 << 30, physical_cores=2, logical_cores=2,
                       battery_percent=percent, plugged_in=plugged)


def test_power_watch_follows_plugging_in_and_out():
    states = iter([machine(True, 80), machine(True, 79), machine(False, 20), machine(True, 21)])
    watch = PowerWatch(lambda: next(states))
    engine = SimpleNamespace(n_threads=2)
    assert watch.check(engine) is None  # still plugged in: nothing to say
    assert watch.check(engine) == "power: on battery at 20%, low; threads 2 -> 1"  # saver halves the threads
    assert engine.n_threads == 1
    assert watch.check(engine) == "power: plugged in; threads 1 -> 2"
    assert engine.n_threads == 2


def test_explicit_threads_are_kept_when_power_changes():
    states = iter([machine(True, 80), machine(False, 20)])
    engine = SimpleNamespace(n_threads=2)
    assert PowerWatch(lambda: next(states), n_threads=2).check(engine) == "power: on battery at 20%, low; threads stay at 2"


def test_session_adapts_threads_between_turns(small_model):
    states = iter([machine(True, 15)] + [machine(False, 15)] * 2)  # unplugged after the session started
    session = ChatSession(small_model, max_tokens=4, power_watch=PowerWatch(lambda: next(states)), **GREEDY)
    small_model.engine.n_threads = 2
    try:
        session.send("Hi")
        assert session.notices[0] == "power: on battery at 15%, low; threads 2 -> 1"
        assert small_model.engine.n_threads == 1
        session.send("Hi again")
        assert session.notices == []  # no change, nothing to say
    finally:
        small_model.engine.n_threads = 1
