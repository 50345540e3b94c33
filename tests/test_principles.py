
import pytest

from selfalign.principles import (PrincipleError, load_principle_set, parse_response, render_prefix,
                                  render_prompt)
from selfalign.inputs import PRINCIPLES_DIR

TINY_PRINCIPLES = """
principles:
  - {number: 1, name: Ethical, text: Refuse harmful requests.}
  - {number: 2, name: Candor, text: Say when you do not know.}
  - {number: 3, name: Step-by-Step, text: Explain in steps.}
"""
TINY_EXEMPLARS = """
exemplars:
  - id: harm
    user: How do I pick a lock?
    thoughts: Lock picking can break in. I should follow rules 1 (Ethical) and 2 (Candor).
    answer: I can't help with breaking in, {name} says.
    markers: [breaking in]
"""
TEMPLATE = (PRINCIPLES_DIR / "self_align_template.yaml").read_text()


@pytest.fixture
def files(tmp_path):
    (tmp_path / "p.yaml").write_text(TINY_PRINCIPLES)
    (tmp_path / "e.yaml").write_text(TINY_EXEMPLARS)
    (tmp_path / "t.yaml").write_text(TEMPLATE)
    return tmp_path


def load(files):
    return load_principle_set(files / "p.yaml", files / "e.yaml", files / "t.yaml")


def test_shipped_set_loads_with_a_stable_hash():
    first, second = load_principle_set(), load_principle_set()
    assert len(first.principles) == 16 and len(first.exemplars) == 5
    assert [p.number for p in first.principles] == list(range(1, 17))
    assert first.hash == second.hash
    assert first.with_text(7, "Be candid.").hash != first.hash
    cited = {n for e in first.exemplars for n in e.cites}
    assert cited == set(range(1, 17))  # every principle is shown in use at least once
    # 16 (Operational) means doing what a computer can do with text (Dromedary's meaning), so the
    # exemplar that writes a program and works out its result cites it, with 15 (Creative).
    assert {15, 16} <= set(next(e for e in first.exemplars if e.id == "step_by_step_numerical").cites)
    assert "carry it out yourself" in first.principle(16).text


def test_rendered_layout(files):
    ps = load(files)
    prompt = render_prompt(ps, "  What is 2+2? ", assistant="Watson")
    expected_tail = """## Rules

1 (Ethical). Refuse harmful requests.
2 (Candor). Say when you do not know.
3 (Step-by-Step). Explain in steps.

## Example conversations

User: How do I pick a lock?

Watson (internal thoughts): Lock picking can break in. I should follow rules 1 (Ethical) and 2 (Candor).

Watson: I can't help with breaking in, Watson says.

User: Thanks, that helps.

Watson (auto reply): You are welcome.

User: What is 2+2?

Watson (internal thoughts):"""
    assert prompt.startswith("# Watson: a conversation with an AI assistant\n")
    assert prompt.endswith(expected_tail)
    assert prompt.startswith(render_prefix(ps, "Watson"))
    assert "Dromedary (internal thoughts):" in render_prompt(ps, "hi", assistant="Dromedary")


def test_ablation_variants(files):
    ps = load(files)
    without = render_prompt(ps.without(2), "q")
    assert "2 (Candor)" not in without and "I should follow rules 1 (Ethical)." in without
    assert "Be brief." in render_prompt(ps.with_text(3, "Be brief."), "q")
    assert "pick a lock" not in render_prompt(ps.with_exemplars([]), "q")
    with pytest.raises(PrincipleError, match="no principle numbered"):
        ps.without(9)


@pytest.mark.parametrize("edit, message", [
    (("p.yaml", "number: 3, name: Step", "number: 2, name: Step"), r"p\.yaml: principle #3 \(Step-by-Step\): number 2 is used twice"),
    (("p.yaml", "text: Explain in steps.", "text: ''"), r"p\.yaml: principle #3 \(Step-by-Step\): empty name or text"),
    (("e.yaml", "2 (Candor)", "9 (Candor)"), r"e\.yaml: exemplar #1 \(harm\): cites \[9\]"),
    (("e.yaml", "I should follow rules 1 (Ethical) and 2 (Candor).", "Fine."), r"exemplar #1 \(harm\): thoughts must end"),
    (("t.yaml", 'answer_turn: "{assistant}: {text}"', 'answer_turn: "{text}"'), r"t\.yaml: template 'answer_turn' lacks {assistant}"),
])
def test_bad_files_name_the_file_and_entry(files, edit, message):
    name, old, new = edit
    text = (files / name).read_text()
    assert old in text
    (files / name).write_text(text.replace(old, new))
    with pytest.raises(PrincipleError, match=message):
        load(files)


@pytest.fixture(scope="module")
def shipped():
    return load_principle_set()


@pytest.mark.parametrize("completion, triggers, unknown, answer", [
    (" The user asks a fact. I should follow rules 2 (Informative) and 7 (Candor).\n\nWatson: Paris.\n",
     [2, 7], [], "Paris."),
    # a marker in the middle of a line is text, not a turn
    (" Quote it. I should follow rule 3.\n\nWatson: Type 'Watson: hello' to greet me.\n\nUser: ok",
     [3], [], "Type 'Watson: hello' to greet me."),
    # numbers in parentheses that are not principle names are not citations
    (" 3 (three) apples and 12 (twelve) pears. I should follow rules 5 (Reasoning) and 11 (Numerical Sensitivity).\n"
     "Watson: 15 fruits.", [5, 11], [], "15 fruits."),
    # unknown numbers, and a number whose name belongs to another principle
    (" I should follow rules 19 (Imaginary), 2 and 5 (Creative).\nWatson: Hm.", [2], ["19", "5 (Creative)"], "Hm."),
    # unicode and odd separators
    (" Ça dépend 🙂. I should follow rules 1 (Ethical) — and 14 (Balanced & Informative Perspectives).\n"
     "Watson: Ça dépend de vous 🙂.", [1, 14], [], "Ça dépend de vous 🙂."),
    # later assistant turns end the answer
    (" I should follow rules 4 (Question Assessment).\nWatson: Which one?\n\nWatson (auto reply): You're welcome!",
     [4], [], "Which one?"),
])
def test_parse_response(shipped, completion, triggers, unknown, answer):
    parsed = parse_response(shipped, completion, "Watson")
    assert parsed.has_answer_marker
    assert (parsed.triggers, parsed.unknown_citations, parsed.answer) == (triggers, unknown, answer)


def test_parse_without_marker_and_with_repeats(shipped):
    parsed = parse_response(shipped, " I keep thinking and thinking", "Watson")
    assert not parsed.has_answer_marker and parsed.answer == ""
    looping = " Fine.\nWatson: The sky is blue today. The sky is blue today. The sky is blue today."
    parsed = parse_response(shipped, looping, "Watson")
    assert parsed.answer == "The sky is blue today." and parsed.cut_at_repeat
    assert parse_response(shipped, " x\nDromedary: Hello there.", "Dromedary").answer == "Hello there."
