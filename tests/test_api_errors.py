"""Hostile input to the Python API: every mistake a ValueError/TypeError or the project's own exception, naming the
argument; calls on a closed model; NaN/inf logits from damaged weights (issue 11, items 2 and 4)."""
import inspect
import re
import shutil

import numpy as np
import pytest

import edgeinfer
from conftest import model_path
from edgeinfer.api import Model
from edgeinfer.errors import EdgeInferError, InvalidArgument, ModelClosed, ModelError
from edgeinfer.gguf_reader import GGUFFile
from kernels_cpu import forward

SMOLLM2 = "smollm2-135m-instruct"
N_VOCAB = 49152  # SmolLM2's vocabulary
GREEDY = dict(temperature=0.0, max_tokens=4)


@pytest.fixture(scope="module")
def model():
    with Model(model_path(SMOLLM2), n_ctx=256, n_threads=1) as m:
        yield m


# ---------------------------------------------------------------- token ids

@pytest.mark.parametrize("call", ["generate", "stream", "logits", "detokenize"])
@pytest.mark.parametrize("bad", [-1, N_VOCAB, 10**12])
def test_token_ids_outside_the_vocabulary_are_refused_naming_the_index(model, call, bad):
    with pytest.raises(InvalidArgument, match=re.escape(f"token 3 is {bad}: token ids are in [0, {N_VOCAB})")):
        getattr(model, call)([1, 504, 3458, bad])  # stream refuses at the call, before the first piece


def test_token_ids_of_the_wrong_kind_are_type_errors(model):
    with pytest.raises(TypeError, match="prompt token 1 must be an int, not str"):
        model.generate([1, "2"])
    with pytest.raises(TypeError, match="tokens token 0 must be an int, not float"):
        model.detokenize([1.0])
    with pytest.raises(TypeError, match="prompt must be a sequence of token ids, not NoneType"):
        model.generate(None)
    # numpy ids are ids
    assert model.detokenize(np.array([504, 3458])) == model.detokenize([504, 3458])


def test_empty_and_too_long_prompts(model):
    with pytest.raises(InvalidArgument, match="the prompt is empty"):
        model.generate([])
    with pytest.raises(InvalidArgument, match="the tokens has 300 tokens: more than the context of 256"):
        model.logits([504] * 300)


# ---------------------------------------------------------------- counts and sampling

def test_max_tokens_is_checked(model):
    with pytest.raises(InvalidArgument, match="max_tokens must be >= 0, got -1"):
        model.stream("Hi", max_tokens=-1)
    with pytest.raises(TypeError, match="max_tokens must be an int, not float"):
        model.generate("Hi", max_tokens=2.0)
    assert model.generate("Hi", max_tokens=0) == ""


@pytest.mark.parametrize("name, value, error, message", [
    ("n_ctx", 1.5, TypeError, "n_ctx must be an int, not float"),
    ("n_ctx", "256", TypeError, "n_ctx must be an int, not str"),
    ("n_ctx", True, TypeError, "n_ctx must be an int, not bool"),
    ("n_ctx", 0, InvalidArgument, "n_ctx must be >= 1, got 0"),
    ("n_threads", 2.0, TypeError, "n_threads must be an int, not float"),
    ("n_threads", -1, InvalidArgument, "n_threads must be >= 1, got -1"),
    ("seed", -2, InvalidArgument, "seed must be >= -1, got -2"),
    ("power", "turbo", InvalidArgument, "power must be 'auto', 'saver', 'balanced', 'performance'; got 'turbo'"),
])
def test_load_options_are_checked_before_the_file_is_opened(name, value, error, message, tmp_path):
    with pytest.raises(error, match=re.escape(message)):
        edgeinfer.load(model_path(SMOLLM2), **{name: value})
    with pytest.raises(error, match=re.escape(message)):
        Model(tmp_path / "absent.gguf", **{name: value})  # not a FileNotFoundError: the options come first


@pytest.mark.parametrize("name, value, error", [
    ("temperature", float("nan"), InvalidArgument), ("temperature", float("inf"), InvalidArgument),
    ("top_p", 1.5, InvalidArgument), ("min_p", -0.1, InvalidArgument), ("repeat_penalty", 0.0, InvalidArgument),
    ("seed", -5, InvalidArgument), ("top_k", "40", TypeError),
])
def test_sampling_parameters_are_checked_naming_them(model, name, value, error):
    with pytest.raises(error, match=name):
        model.stream("Hi", **{name: value})


def test_seed_minus_one_is_random(model):
    seeds = {model.stream("Hi", seed=-1, max_tokens=1).seed for _ in range(3)}
    assert len(seeds) == 3


def test_chat_defaults_to_repeat_penalty_1_1_and_generation_to_1_0(model):
    messages = [{"role": "user", "content": "Hi"}]
    assert model.chat(messages, stream=True, max_tokens=1).params.repeat_penalty == 1.1
    assert model.chat(messages, stream=True, max_tokens=1, repeat_penalty=1.3).params.repeat_penalty == 1.3
    assert model.stream("Hi", max_tokens=1).params.repeat_penalty == 1.0
    assert model.session().settings()["repeat_penalty"] == 1.1


# ---------------------------------------------------------------- text and messages

def test_tokenize_wants_text(model):
    with pytest.raises(TypeError, match="text must be a str, not NoneType"):
        model.tokenize(None)
    with pytest.raises(TypeError, match="text must be a str, not bytes"):
        model.tokenize(b"Hi")


@pytest.mark.parametrize("messages, error, message", [
    ([], InvalidArgument, "messages is empty"),
    ({"role": "user", "content": "Hi"}, TypeError, "messages must be a list of {'role', 'content'} dicts, not dict"),
    (["Hi"], TypeError, "messages[0] must be a dict with 'role' and 'content', not str"),
    ([{"content": "Hi"}], InvalidArgument, "messages[0] has no 'role'"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant"}], InvalidArgument, "messages[1] has no 'content'"),
    ([{"role": "user", "content": "Hi"}, {"role": "user", "content": 3}], TypeError,
     "messages[1]: 'content' must be a string, not int"),
    ([{"role": None, "content": "Hi"}], TypeError, "messages[0]: 'role' must be a string, not NoneType"),
])
def test_messages_are_checked_before_the_template_runs(model, messages, error, message, monkeypatch):
    def render(*args, **kwargs):
        raise AssertionError("the template ran")

    monkeypatch.setattr(model.chat_template, "render", render)
    with pytest.raises(error, match=re.escape(message)):
        model.chat(messages)
    with pytest.raises(error, match=re.escape(message)):
        model.chat_tokens(messages)


def test_session_send_wants_text(model):
    with pytest.raises(TypeError, match="text must be a str, not int"):
        model.session().send(42)


# ---------------------------------------------------------------- closed model

def test_every_call_on_a_closed_model_raises_model_closed():
    m = edgeinfer.load(model_path(SMOLLM2), n_ctx=64, n_threads=1)
    m.close()
    m.close()  # twice is fine
    closed = re.escape("model SmolLM2-135M-Instruct.Q4_1.gguf is closed")
    calls = [lambda: m.tokenize("Hi"), lambda: m.detokenize([1]), lambda: m.logits([1]),
             lambda: m.generate("Hi"), lambda: m.stream("Hi"), lambda: m.chat([{"role": "user", "content": "Hi"}]),
             lambda: m.chat("Hi"), lambda: m.chat_tokens([{"role": "user", "content": "Hi"}]), lambda: m.session(),
             lambda: m.chat_template]
    for call in calls:
        with pytest.raises(ModelClosed, match=closed):
            call()
    assert isinstance(ModelClosed("x"), (EdgeInferError, ValueError))
    assert m.closed and repr(m) == "Model('SmolLM2-135M-Instruct.Q4_1.gguf', closed)" and m.n_ctx == 64


def test_a_stream_stops_with_model_closed_when_its_model_closes():
    m = edgeinfer.load(model_path(SMOLLM2), n_ctx=64, n_threads=1)
    pieces = m.stream("Once upon a time", temperature=0.0, max_tokens=30)
    next(pieces)
    m.close()
    with pytest.raises(ModelClosed, match="is closed"):
        list(pieces)


@pytest.mark.parametrize("value, message", [
    ("q4_0", "kv_type='q4_0': expected one of f32, f16, q8_0"), ("F16", "kv_type='F16': expected one of"),
    (8, "kv_type=8: expected one of"),
])
def test_kv_type_is_checked_before_the_file_is_opened(value, message, tmp_path):
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        edgeinfer.api.load(model_path(SMOLLM2), kv_type=value)
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        Model(tmp_path / "absent.gguf", kv_type=value)


def test_load_takes_every_keyword_of_api_load():
    names = inspect.signature(edgeinfer.load).parameters.keys()
    assert names == inspect.signature(edgeinfer.api.load).parameters.keys()
    with edgeinfer.load(model_path(SMOLLM2), n_ctx=64, n_threads=1, seed=3, power="saver") as m:
        assert m.plan.power_mode == "saver" and m.seed == 3


# ---------------------------------------------------------------- NaN / inf logits

@pytest.fixture(scope="module")
def damaged_copy(tmp_path_factory):
    """A copy of SmolLM2 whose output norm is NaN (as damaged weights would be), with its own EDGEINFER_HOME."""
    root = tmp_path_factory.mktemp("damaged")
    path = root / "damaged.gguf"
    shutil.copyfile(model_path(SMOLLM2), path)
    with GGUFFile(path) as g:
        info = g.tensor("output_norm.weight")
        offset, nbytes = info.offset, info.nbytes
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.full(nbytes // 4, np.nan, dtype=np.float32).tobytes())
    return path


def test_nan_weights_give_model_error_naming_the_file_and_position(damaged_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEINFER_HOME", str(tmp_path))  # its repacked weights go there
    with Model(damaged_copy, n_ctx=64, n_threads=1) as m:
        prompt = m.tokenize("Once upon a time")
        where = re.escape(f"{damaged_copy}: logits are not finite at position")
        with pytest.raises(ModelError, match=f"{where} {len(prompt) - 1} "):
            m.generate(prompt, **GREEDY)
        assert m._cached.tokens == [] and m.engine.n_past == 0  # nothing NaN is kept for reuse
        with pytest.raises(ModelError, match=f"{where} 0 "):
            m.logits(prompt)  # NaN logits are never an answer
        with pytest.raises(ModelError, match=where):
            m.chat([{"role": "user", "content": "Hi"}], **GREEDY)


def test_nan_after_the_prompt_names_the_position(model):
    """The prompt is sound; a norm turns NaN before the first generated token is evaluated: the error names that
    position, and the prompt's positions stay cached."""
    vecs = model.engine.runner.tables.vecs
    saved = vecs.copy()
    prompt = model.tokenize("Once upon a time")
    pieces = model.stream(prompt, **GREEDY)
    try:
        assert next(pieces)  # the prompt evaluated, the first token sampled
        vecs[0, forward.V_ATTN_NORM] = np.nan
        with pytest.raises(ModelError, match=f"logits are not finite at position {len(prompt)} "):
            next(pieces)
        assert model._cached.tokens == prompt  # the prompt's positions stay: they were sound
    finally:
        vecs[:] = saved
    assert model.generate(prompt, **GREEDY)  # sound again
