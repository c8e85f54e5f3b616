"""`edgeinfer bench --spec MODES`: what speculative decoding gives on real tasks, against plain decoding.

Random tokens (the pp/tg tests) give a prompt lookup nothing to find, so this measures tasks: three grounded in
their input (rewrite a function renaming a variable, quote a paragraph, summarize a text) where the answer repeats
the prompt, and a free-form story where it does not, greedy and sampled with a seed. Either way the text is the
same in every mode, so the modes are compared on the same tokens. Each runs once as a warm-up and `reps` times
measured, in each mode and thread count, the modes taking turns. Reported: decode tokens/s (after the first token),
the share of guesses accepted, and the speed-up over mode "off" in the same run.

`record_tasks` and `replay_lookup` measure prompt lookup without the model: the greedy output of each task is
recorded once, then the lookup is replayed over it (the tokens it would guess, the passes it would take), so a change
to the lookup is judged in tokens per verify pass in a second, and on the same tokens every time.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

from edgeinfer.errors import TemplateError

_FUNCTION = "\n".join(
    [
        "def summarize_orders(orders, x):",
        '    """Totals of the orders above x, by customer."""',
        "    totals = {}",
        "    for order in orders:",
        "        if order.amount <= x:",
        "            continue",
        "        customer = order.customer",
        "        totals.setdefault(customer, 0)",
        "        totals[customer] += order.amount - x * order.discount",
    ]
    + [f"    step_{i} = len(totals) * x + {i}" for i in range(40)]
    + ["    return {k: v for k, v in totals.items() if v > x}"]
)
_TEXT = (
    "The river town of Halden grew up around a ferry crossing. For two centuries the ferry was the only way across "
    "the water, and the families who ran it became the richest in the valley.\n\n"
    "In 1871 the railway reached the east bank. The company built a wooden bridge beside the ferry landing, and "
    "within a year the ferry carried only market carts and the occasional wedding party.\n\n"
    "The bridge burned in the dry summer of 1902. While a stone bridge was being built, the old ferry was pulled "
    "out of the boathouse and ran day and night for three years, the last time it was needed.\n\n"
    "Today the ferry sits in the town museum, and the stone bridge carries the main road south to the coast."
)
TASKS = {  # name -> the user's message; the first three are grounded in their input
    "rewrite": f"Rewrite this Python function, renaming the parameter x to threshold. Output only the code.\n\n"
               f"{_FUNCTION}",
    "quote": f"{_TEXT}\n\nQuote, word for word, the paragraph that mentions the railway and the one about the fire.",
    "summarize": f"{_TEXT}\n\nSummarize this text in a few sentences, reusing its wording.",
    "story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "story-sampled": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}
# tasks run sampled (with a seed: speculation keeps a seeded text, so every mode decodes the same tokens); the others
# greedy. Greedy stories of small models repeat themselves, which flatters speculation: the sampled one is free text.
SAMPLED = {"story-sampled": {"temperature": 0.8, "seed": 1}}
GREEDY_TASKS = tuple(task for task in TASKS if task not in SAMPLED)


@dataclass
class SpecRow:
    task: str
    mode: str
    n_threads: int
    tokens: int = 0
    samples: list[float] = field(default_factory=list)  # decode tokens/s per repetition
    acceptance: float = 0.0  # share of the guesses accepted (last repetition)
    speedup: float = 0.0  # mean over the mean of mode "off" for the same task and threads

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else 0.0


def task_prompt(model, task: str) -> list[int]:
    """The task as the model is prompted: its chat template where it has one, else the plain text."""
    message = TASKS[task]
    try:
        return model.chat_tokens([{"role": "user", "content": message}])
    except TemplateError:  # a model without a usable chat template: the text and a cue
        return model.tokenize(message + "\n\n")


def run_spec_bench(model, modes, threads, reps: int = 2, max_tokens: int = 192, tasks=tuple(TASKS)) -> list[dict]:
    """Rows for every task x thread count x mode on a loaded model (greedy; see the module docstring); mode "off"
    runs first whether asked for or not (the speed-ups are over it). The modes take turns within each repetition,
    so a machine that drifts (a VM's neighbours, heat) moves every mode's figure alike."""
    modes = ["off"] + [m for m in dict.fromkeys(modes) if m != "off"]
    rows = []
    for n_threads in threads:
        for m in (model, model.draft):
            if m is not None:
                m.engine.n_threads = n_threads
        for task in tasks:
            prompt = task_prompt(model, task)
            here = {mode: SpecRow(task, mode, n_threads) for mode in modes}
            for rep in range(reps + 1):  # the first: warm-up
                for mode, row in here.items():
                    model.generate(prompt, max_tokens=max_tokens, speculative=mode,
                                   **SAMPLED.get(task, {"temperature": 0}))
                    stats = model.last_stats
                    if rep:
                        row.samples.append(stats.decode_tokens_per_second)
                    row.tokens, row.acceptance = stats.generated_tokens, stats.speculation.acceptance_rate
            base = here["off"].mean
            for row in here.values():
                row.speedup = row.mean / base if base else 0.0
                rows.append(row)
    return [dict(asdict(r), mean=r.mean) for r in rows]


def record_tasks(model, max_tokens: int = 192, tasks=GREEDY_TASKS) -> dict[str, dict]:
    """{task: {"prompt": token ids, "output": greedy output token ids}} of a loaded model, by plain decoding."""
    from edgeinfer.generation import GenerationStats, generate_tokens
    from edgeinfer.sampling import Sampler, SamplingParams

    out = {}
    for task in tasks:
        prompt = task_prompt(model, task)
        sampler = Sampler(SamplingParams(temperature=0), model.n_vocab)
        output = generate_tokens(model._use, sampler, prompt, max_tokens, model.tokenizer.eog_ids, GenerationStats())
        out[task] = {"prompt": [int(t) for t in prompt], "output": [int(t) for t in output]}
    return out


def replay_lookup(prompt, output, mode: str = "ngram", pass_ms: dict[int, float] | None = None,
                  max_tokens: int = 192, tokenizer=None) -> dict:
    """Prompt lookup in `mode` ("ngram" or "auto") replayed over a greedy `output` of `prompt`, as the decode loop
    (edgeinfer.generation.generate_tokens) runs it: {passes, tokens_per_pass, drafted, accepted, speedup}. An output
    shorter than max_tokens ended at an end-of-generation token, which the last pass yields after its rejected
    guesses, as the real one does.

    pass_ms: a verify pass's milliseconds by rows (measured: DraftLength's per-size costs; other sizes read off the
    line between them), which auto mode chooses its draft lengths by and the speed-up (plain decoding's passes over
    the replay's, in time) is reckoned with; None: every pass costs the same, and speedup is tokens per pass."""
    from edgeinfer.speculative import DraftLength, draft_or_free_guess, drafting_for

    costs = DraftLength()
    for rows, ms in (pass_ms or {1: 1.0, 2: 1.0}).items():
        costs.observe_pass(rows, ms / 1000)
    drafter, length = drafting_for(mode, tokenizer=tokenizer)
    output = list(output) + ([-1] if len(output) < max_tokens else [])  # -1: the end token, which nothing guesses
    history, i = list(prompt) + output[:1], 1
    passes, drafted, accepted, seconds = 0, 0, 0, 0.0
    while i < len(output):
        k = min(length.choose(), max_tokens - i - 1)
        draft, guess = draft_or_free_guess(drafter, history, k)
        cost = costs.pass_cost(1 + len(draft))
        length.observe_pass(1 + len(draft), cost)
        right = 0
        while right < len(draft) and i + right < len(output) and draft[right] == output[i + right]:
            right += 1
        ready = output[i:i + right + 1]
        if draft:
            length.observe_guesses(min(right + 1, len(draft)), right)
            drafted, accepted = drafted + len(draft), accepted + right
        elif guess is not None:
            length.observe_guesses(1, int(ready[0] == guess))
        history += ready
        i += len(ready)
        passes, seconds = passes + 1, seconds + cost
    plain = (len(output) - 1) * costs.pass_cost(1)
    return {"passes": passes, "tokens_per_pass": (len(output) - 1) / passes if passes else 0.0,
            "drafted": drafted, "accepted": accepted, "speedup": plain / seconds if seconds else 0.0}


def format_spec_bench(rows: list[dict]) -> str:
    lines = ["| task          | spec  | threads | tokens | decode tok/s | accepted | vs off |",
             "|---------------|-------|---------|--------|--------------|----------|--------|"]
    for r in rows:
        accepted = f"{100 * r['acceptance']:.0f}%" if r["mode"] != "off" else ""
        lines.append(f"| {r['task']:13} | {r['mode']:5} | {r['n_threads']:7} | {r['tokens']:6} | {r['mean']:12.1f} | "
                     f"{accepted:>8} | {r['speedup']:5.2f}x |")
    return "\n".join(lines)
