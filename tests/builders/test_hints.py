"""Hint builder on all of GSM8K test (../shared, read in place) and on generic inputs."""

import json
import re

import pytest

from data_builders.hints import build_hints, make_hints, parse_solution
from dopd_vl.cli import main
from dopd_vl.data.sources import load_records

from conftest import GSM8K

TEST = GSM8K / "test.jsonl"
pytestmark = [
    pytest.mark.skipif(not TEST.is_file(), reason="../shared/data/gsm8k is not beside the clone"),
    pytest.mark.xdist_group("gsm8k_steps"),
]  # with --dist loadgroup: one worker builds its fixture


_WORD_VALUES = {
    w: i
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
        ]
    )
}
_WORD_VALUES.update(
    {
        w: 10 * i
        for i, w in enumerate(["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"], start=2)
    }
)


def _numbers(text):
    """The test's own widened reading: digit runs anywhere (glued to units, currency, %), with
    thousands separators and decimals by value, plus number words up to 99 (tens-units)."""
    values = set()
    for t in re.findall(r"\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d*\.\d+|\d+", text):
        values.add(float(t.replace(",", "")))
    for words in re.findall(r"[a-z]+(?:-[a-z]+)?", text.lower()):
        parts = words.split("-")
        if all(p in _WORD_VALUES for p in parts):
            values.add(float(sum(_WORD_VALUES[p] for p in parts)))
    return values


@pytest.fixture(scope="session")  # once per worker: xdist may interleave other modules between its tests
def steps_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("h") / "gsm8k_steps.jsonl"
    assert main(["build", "hints", "--input", str(TEST), "--out", str(out)]) == 0
    return load_records(out)


def test_all_gsm8k_test_records_build_with_clean_step_hints(steps_records):
    rows = [json.loads(line) for line in TEST.read_text().splitlines()]
    assert len(steps_records) == len(rows) == 1319
    for record, row in zip(steps_records, rows):
        hints = record["privileged"]["hints"]
        text = record["privileged_context"]
        assert "<<" not in text and ">>" not in text and "####" not in text
        step_lines = [line for line in row["answer"].split("####")[0].splitlines() if line.strip()]
        assert len(hints) == len(step_lines)
        assert record["answer"] == row["answer"].split("####")[1].strip()
        assert record["prompt"] == [{"role": "user", "content": row["question"]}]


def test_leak_report_matches_an_independent_check(tmp_path, capsys):
    for style in ("steps", "steps_exec", "final_answer"):
        out = tmp_path / f"{style}.jsonl"
        leaking = ["--allow-leaking-style"] if style == "final_answer" else []
        assert main(["build", "hints", "--input", str(TEST), "--out", str(out), "--style", style, *leaking]) == 0
        printed = capsys.readouterr().out
        reported = int(re.search(r"leaks (\d+)", printed).group(1))
        expected = 0
        for record in load_records(out):
            answer = float(record["answer"].replace(",", ""))
            in_question = answer in _numbers(record["prompt"][0]["content"])
            in_hints = any(answer in _numbers(h) for h in record["privileged"]["hints"])
            expected += in_hints and not in_question
        assert reported == expected, style
        if style == "steps":
            assert reported == 0
            assert (
                re.search(r"masked numbers glued to units (\d+)", printed)
                and int(re.search(r"masked numbers glued to units (\d+)", printed).group(1)) > 0
            )
        else:
            assert reported > 1000


def test_a_final_answer_glued_to_a_unit_is_masked_and_would_be_reported(tmp_path, capsys):
    # GSM8K test line 627: "... speed is 1.2*60 = <<1.2*60=72>>72Mb per hour. #### 72"
    row = json.loads(TEST.read_text().splitlines()[626])
    assert "72Mb per hour" in row["answer"]
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps(row) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["build", "hints", "--input", str(data), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    hints = load_records(out)[0]["privileged"]["hints"]
    assert hints[-1] == "So, Ashley\u2019s internet connection speed is ?*60 = ?Mb per hour."
    assert "leaks 0" in printed and "masked numbers glued to units 2" in printed  # 1.2Mb, 72Mb
    assert (
        main(["build", "hints", "--input", str(data), "--out", str(tmp_path / "exec.jsonl"), "--style", "steps_exec"])
        == 0
    )
    assert "leaks 1" in capsys.readouterr().out  # the unmasked steps keep "72Mb": now a reported leak


def test_steps_hide_every_computed_result_and_exec_keeps_them():
    steps, final, results = parse_solution("It takes 2/2=<<2/2=1>>1 bolt\nSo the total is 2+1=<<2+1=3>>3 bolts\n#### 3")
    assert (steps, final, results) == (
        ["It takes 2/2=<<2/2=1>>1 bolt", "So the total is 2+1=<<2+1=3>>3 bolts"],
        "3",
        ["1", "3"],
    )
    assert make_hints(steps, final, results, "steps") == ["It takes 2/2=? bolt", "So the total is 2+?=? bolts"]
    assert make_hints(steps, final, results, "steps_exec") == ["It takes 2/2=1 bolt", "So the total is 2+1=3 bolts"]
    assert make_hints(steps, final, results, "summary") == ["Compute 2/2, then 2+?."]
    assert make_hints(steps, final, results, "final_answer") == ["The final answer is 3."]


def test_generic_records_and_a_hint_generator(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text(
        json.dumps(
            {
                "id": "g1",
                "question": "A box holds 6 eggs. How many eggs in 7 boxes?",
                "solution": ["Multiply eggs per box by boxes: 6 * 7 = 42.", "So 42 eggs."],
                "answer": "42",
            }
        )
        + "\n"
        + json.dumps(
            {
                "id": "g2",
                "question": "What is the capital of France?",
                "hints": ["It is on the Seine.", "It is Paris."],
                "answer": "Paris",
            }
        )
        + "\n"
    )
    report = build_hints(data, tmp_path / "out.jsonl")
    r1, r2 = report.records
    assert r1["privileged"]["hints"] == ["Multiply eggs per box by boxes: 6 * 7 = ?.", "So ? eggs."]
    assert r2["privileged"]["hints"] == ["It is on the Seine.", "It is Paris."]
    assert report.leaks == [{"id": "g2", "hints": [1], "answer": "Paris"}]

    class Echo:
        def generate(self, question, solution):
            return [f"Think about: {question}", "The answer is 42."]

    report = build_hints(data, tmp_path / "gen.jsonl", generator=Echo())
    assert report.records[0]["privileged"]["style"] == "generated"
    assert [leak["id"] for leak in report.leaks] == ["g1"]


@pytest.mark.parametrize(
    "line,field",
    [
        ('{"question": "q", "answer": "no final line"}', "field answer"),
        ('{"question": "", "answer": "a\\n#### 1"}', "field question"),
        ('{"question": "q", "answer": "#### 1"}', "field answer"),
        ('{"question": "q", "solution": 5}', "field solution"),
        (
            "{not json",
            "record line 2: invalid JSON: Expecting property name enclosed in double quotes: line 2 column 2",
        ),
    ],
)
def test_malformed_hint_inputs_fail_cleanly(tmp_path, capsys, line, field):
    data = tmp_path / "in.jsonl"
    data.write_text('{"question": "ok?", "answer": "x=<<1+1=2>>2\\n#### 2"}\n' + line + "\n")
    out = tmp_path / "out.jsonl"
    out.write_text("KEEP\n")
    assert main(["build", "hints", "--input", str(data), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "in.jsonl:2" in err and field in err
    assert out.read_text() == "KEEP\n" and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
    assert main(["build", "hints", "--input", str(data), "--out", str(out), "--on-error", "skip"]) == 0
    assert len(load_records(out)) == 1 and json.loads((tmp_path / "out.skipped.jsonl").read_text())["file"].endswith(
        ":2"
    )


def test_the_leaking_style_is_refused_unless_asked_for_and_every_style_is_explained(tmp_path, capsys):
    from data_builders.hints import STYLE_HELP, STYLES

    out = tmp_path / "leaky.jsonl"
    assert main(["build", "hints", "--input", str(TEST), "--out", str(out), "--style", "final_answer"]) == 1
    assert "leaks by design" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        main(["build", "hints", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert all(f"{name}: {' '.join(STYLE_HELP[name].split())}" in shown for name in STYLES)
    assert "LEAKS the answer" in STYLE_HELP["final_answer"]


def test_the_readme_explains_every_hint_style_in_the_words_of_the_help():
    from data_builders.hints import STYLE_HELP

    from conftest import REPO

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert all(f"| `{name}` | {text} |" in readme for name, text in STYLE_HELP.items())
