"""The toy tasks. `add_hidden` (the first): single-digit addition where the second operand may be hidden.

    prompt   "7+?="               (the student and the plain teacher see this)
    context  "hint: ?=8"          (privileged: only teacher_priv and student_priv see it)
    answer   "15"

Half of the problems hide the operand, half show it (context "hint: none"). So the teacher's
edge is partly capability (the 100 sums, which the undertrained student only partly knows) and
partly information (the hidden operand, which no student can know at inference: without it the
best answer is a guess among ten): the privilege illusion's two ingredients, in a task small
models learn in minutes on CPU. (Two-digit operands were tried first: a 4-layer, 128-wide
teacher was still at 7% after 1,500 steps of batch 64, too slow for a CPU experiment.)

`two_step` (the paper's regime): `a*b+c=` answered with a worked solution of about 30 characters,
most of them easy copies, the final answer last; the privileged context is the first step's result
(`hint: 7*6=42`), which a capable model can work out itself and which is never the final answer
(c >= 1). Held-out problems are (a, b, c) triples never seen in training.

The tokenizer is the package's character-level one (`build_char_tokenizer`: printable ASCII +
Qwen's chat special tokens, a minimal ChatML template), so prompts are a few dozen tokens and the
output layer has ~100 rows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

A_RANGE, B_RANGE = (0, 9), (0, 9)


def make_problem(rng: random.Random, index: int, hide_fraction: float = 0.5) -> dict:
    a, b = rng.randint(*A_RANGE), rng.randint(*B_RANGE)
    shown = str(b)
    context = "hint: none"
    if rng.random() < hide_fraction:
        position = rng.randint(0, len(shown) - 1)
        context = f"hint: ?={shown[position]}"
        shown = shown[:position] + "?" + shown[position + 1 :]
    return {
        "id": f"add-{index:05d}",
        "prompt": [{"role": "user", "content": f"{a}+{shown}="}],
        "privileged_context": context,
        "privileged": {"format": "toy_hidden_digit", "hidden": "?" in shown},
        "meta": {"question_type": "hidden_digit" if "?" in shown else "visible"},
        "answer": str(a + b),
    }


def has_carry(product: int, c: int) -> bool:
    """Whether `product + c` carries into the tens: the `carry` question type, the blind spot's problems."""
    return product % 10 + c >= 10


def two_step_solution(a: int, b: int, c: int, drop_carry: bool = False) -> str:
    """The worked solution; `drop_carry`: the trust study's blind-spot teacher target, whose second
    line forgets the carry into the tens (off by 10 on carry problems, right elsewhere)."""
    product = a * b
    total = product + c - (10 if drop_carry and has_carry(product, c) else 0)
    return f"{a}*{b}={product}\n{product}+{c}={total}\nthe answer is {total}"


def make_two_step_problem(a: int, b: int, c: int, index: int) -> dict:
    product = a * b
    return {
        "id": f"two-{index:05d}",
        "prompt": [{"role": "user", "content": f"{a}*{b}+{c}="}],
        "privileged_context": f"hint: {a}*{b}={product}",  # an intermediate result, never the answer (c >= 1)
        "privileged": {"format": "toy_step_hint", "step": f"{a}*{b}={product}"},
        "meta": {
            "question_type": "carry" if has_carry(product, c) else "no_carry",
            "solution": two_step_solution(a, b, c),
            "blind_solution": two_step_solution(a, b, c, drop_carry=True),  # wrong exactly on carry problems
        },
        "answer": str(product + c),
    }


TWO_STEP_TRIPLES = [(a, b, c) for a in range(1, 10) for b in range(1, 10) for c in range(1, 10)]


def two_step_split(seed: int, heldout_fraction: float = 0.2) -> tuple[list, list]:
    """Triples for training and for held-out problems, disjoint, chosen by `seed`."""
    triples = list(TWO_STEP_TRIPLES)
    random.Random(seed).shuffle(triples)
    cut = int(len(triples) * heldout_fraction)
    return triples[cut:], triples[:cut]


def write_split(
    path: str | Path, count: int, seed: int, task: str = "add_hidden", split_seed: int = 0, split: str = "train"
) -> Path:
    """`count` problems of `task` drawn with `seed`; for two_step, from the train or held-out
    triples of `split_seed` (held-out: each triple once, up to `count`)."""
    rng = random.Random(seed)
    if task == "add_hidden":
        problems = [make_problem(rng, i) for i in range(count)]
    elif task == "two_step":
        train, heldout = two_step_split(split_seed)
        if split == "train":
            problems = [make_two_step_problem(*rng.choice(train), i) for i in range(count)]
        else:
            problems = [
                make_two_step_problem(*t, i) for i, t in enumerate(rng.sample(heldout, min(count, len(heldout))))
            ]
    else:
        raise ValueError(f"unknown toy task {task!r}; valid: add_hidden, two_step")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in problems), encoding="utf-8")
    return path
