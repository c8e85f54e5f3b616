"""The KV-cache type from the API and the CLI to the cache the engine allocates: kv_type= / --kv-type, the budget's
default, the plan's bytes and reasons. Only f32 runs a model until the attention kernels read f16 and q8_0; the
other types are checked as far as their allocation."""
import json

import pytest
from cli_helpers import run_edgeinfer
from conftest import model_path

from edgeinfer.api import Model, load
from edgeinfer.budget import DEFAULT_KV_TYPE_WHY
from edgeinfer.kv_cache import DEFAULT_KV_TYPE, KV_TYPES

SMOLLM2 = "smollm2-135m-instruct"


@pytest.mark.parametrize("kv_type", list(KV_TYPES))
def test_the_engine_allocates_the_planned_cache_of_each_type(kv_type):
    with Model(model_path(SMOLLM2), n_ctx=64, n_threads=1, kv_type=kv_type) as m:
        assert m.kv_type == m.plan.kv_type == m.engine.cache.kv_type == kv_type
        assert m.engine.cache.nbytes == m.plan.memory["kv_cache"] == 64 * m.plan.kv_bytes_per_position
        assert m.plan.reasons["kv_type"].startswith("asked for")
        assert f"kv_type={kv_type}" in repr(m)


def test_without_kv_type_the_budget_chooses_the_default():
    with load(model_path(SMOLLM2), n_ctx=64, n_threads=1) as m:
        assert m.kv_type == m.engine.cache.kv_type == DEFAULT_KV_TYPE
        assert m.plan.reasons["kv_type"].startswith(f"the default ({DEFAULT_KV_TYPE_WHY[DEFAULT_KV_TYPE]})")


def test_an_f32_cache_runs_end_to_end():
    with load(model_path(SMOLLM2), n_ctx=64, n_threads=1, kv_type="f32") as m:
        assert "Paris" in m.generate("The capital of France is", max_tokens=4, temperature=0)


def test_plan_command_shows_the_type_its_bytes_and_the_fraction_of_f32():
    path = str(model_path(SMOLLM2))
    data = json.loads(run_edgeinfer("plan", path, "--ctx", "4096", "--kv-type", "q8_0", "--json").stdout)
    f32 = json.loads(run_edgeinfer("plan", path, "--ctx", "4096", "--kv-type", "f32", "--json").stdout)
    assert (data["kv_type"], data["kv_fraction_of_f32"]) == ("q8_0", 0.28125)
    assert data["memory"]["kv_cache"] == 4096 * data["kv_bytes_per_position"] == 0.28125 * f32["memory"]["kv_cache"]
    assert data["reasons"]["kv_type"].startswith("asked for; 28% of f32's bytes")
    text = run_edgeinfer("plan", path, "--ctx", "4096", "--kv-type", "q8_0").stdout
    assert "kv cache   q8_0" in text and "28% of f32's bytes" in text
