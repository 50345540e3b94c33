"""The widgets' logic, without a browser or a kernel: pure functions, and callbacks by their effect
on widget values (Button.click() fires callbacks with no kernel)."""

import matplotlib
import pandas as pd
import pytest
import yaml

from selfalign import widgets
from selfalign.generation import Engine
from selfalign.principles import PrincipleError, load_principle_set
from selfalign.ablation import ablate
from selfalign.stages import self_align
from selfalign.stages.self_align import SelfAlignConfig
from selfalign.triggers import trigger_stats
from test_self_align import SCRIPT, ScriptedBackend, run  # run: stage 2 with a scripted scorer

matplotlib.use("Agg")
PROMPTS = list(SCRIPT)[:3]  # good (its answer depends on principle 7's text), loop, nomarker


@pytest.fixture(scope="module")
def base():
    return load_principle_set()


@pytest.fixture
def records(tmp_path):
    """A stage-2 run directory from the scripted model: 3 kept responses and 5 drops."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"id": "{k}", "prompt": "{k}", "type": "{"t1" if i % 2 else "t2"}"}}\n'
                               for i, k in enumerate(SCRIPT)))
    run(SelfAlignConfig(run="r", runs_dir=str(tmp_path), prompts=str(prompts), min_responses=0),
        engine=Engine(ScriptedBackend(), progress=False))
    return self_align.records("r", tmp_path)


def scripted_editor(base, tmp_path):
    return widgets.PrincipleEditor(base, PROMPTS, Engine(ScriptedBackend(), progress=False),
                                   save_as=str(tmp_path / "mine.yaml"))


def test_edited_set_rewords_and_switches_off(base):
    edited = widgets.edited_set(base, {7: "  Be candid\n about   uncertainty. ", 3: ""}, {3: False})
    assert edited.principle(7).text == "Be candid about uncertainty."  # whitespace as the loader reads it
    assert 3 not in edited.numbers and all(3 not in e.cites for e in edited.exemplars)
    assert widgets.describe_edits(base, edited) == ["3 Helpful: off", "7 Candor: reworded"]
    unchanged = widgets.edited_set(base, {p.number: p.text + "\n" for p in base.principles}, {})
    assert unchanged.hash == base.hash and widgets.describe_edits(base, unchanged) == []
    with pytest.raises(PrincipleError, match="empty text"):
        widgets.edited_set(base, {7: "  "}, {})
    with pytest.raises(PrincipleError, match="every principle is off"):
        widgets.edited_set(base, {}, {p.number: False for p in base.principles})


def test_trigger_diff_marks_added_and_removed(base):
    assert widgets.trigger_diff([1, 2, 4], [2, 3]) == ([3], [1, 4], [2])
    shown = widgets.trigger_html([1, 2], [2, 3], {p.number: p.name for p in base.principles})
    assert '<span class="added"' in shown and "+3 Helpful</span>" in shown
    assert 'class="removed"' in shown and "line-through\">1 Ethical</span>" in shown
    assert "<span>2 Informative</span>" in shown
    assert widgets.trigger_html([], [], {}) == "<i>none</i>"


def test_comparison_html_puts_answers_side_by_side(base):
    edited = base.with_text(7, "Be candid about uncertainty.")
    table = ablate(PROMPTS, Engine(ScriptedBackend(), progress=False), base, edited)
    page = widgets.comparison_html(table, base, widgets.describe_edits(base, edited))
    assert 'class="selfalign-comparison"' in page and "edited: 7 Candor: reworded" in page
    assert page.count("<tr>") == 4  # header + one per prompt
    assert "It is 42." in page and "I am not sure; maybe 42." in page
    assert page.count("(the same)") == 2  # answers the edit did not change
    hostile = pd.DataFrame([{"prompt": "<script>x</script>", "answer_a": "a & b", "answer_b": "<b>",
                             "triggers_a": [1], "triggers_b": [], "answer_changed": True, "answer_overlap": 0.0}])
    page = widgets.comparison_html(hostile, base, [])
    assert "<script>" not in page and "&lt;script&gt;" in page and "a &amp; b" in page and "&lt;b&gt;" in page
    assert 'class="removed"' in page and "edited: nothing" in page
    assert "<i>(empty)</i>" in widgets.comparison_html(hostile.assign(answer_a=""), base, [])


def test_save_writes_a_file_the_loader_reads_back(base, tmp_path):
    reworded = base.with_text(7, "Be candid about uncertainty.")
    path = tmp_path / "mine.yaml"
    assert widgets.save_principles(reworded, path) == [path]
    assert load_principle_set(path).hash == reworded.hash
    assert list(yaml.safe_load(path.read_text())["principles"][0]) == ["number", "name", "text"]
    with pytest.raises(FileExistsError, match="overwrite"):
        widgets.save_principles(base, path)
    assert load_principle_set(path).hash == reworded.hash  # untouched by the refusal
    widgets.save_principles(base, path, overwrite=True)
    assert load_principle_set(path).hash == base.hash
    # The replaced file is kept one version back; no drafts are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.previous.yaml", "mine.yaml"]
    assert load_principle_set(tmp_path / "mine.previous.yaml").hash == reworded.hash


def test_save_without_a_cited_principle_writes_exemplars_too(base, tmp_path):
    without = base.without(7)  # cited by the harmful_request exemplar
    path, exemplars = tmp_path / "no7.yaml", tmp_path / "no7_exemplars.yaml"
    assert widgets.save_principles(without, path) == [path, exemplars]
    with pytest.raises(PrincipleError, match="not in"):
        load_principle_set(path)  # the original exemplars cite 7
    assert load_principle_set(path, exemplars).hash == without.hash
    # Principles 5, 11, 13, 15 and 16 are all that step_by_step_numerical cites: it would cite none.
    with pytest.raises(PrincipleError, match="step_by_step_numerical would cite no principle"):
        widgets.save_principles(base.without(5, 11, 13, 15, 16), tmp_path / "bare.yaml")
    assert not (tmp_path / "bare.yaml").exists()


def test_load_records_marks_status_and_raw_output(records):
    by_id = {r["id"]: r for r in records}
    assert [r["status"] for r in records].count("kept") == 3 and len(records) == len(SCRIPT)
    assert by_id["good"]["raw"] == SCRIPT["good"][0]  # from calls.jsonl
    assert by_id["nomarker"]["raw"] == SCRIPT["nomarker"][0]  # a drop keeps its own


def test_load_records_of_a_missing_stage_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="selfalign stage self-align --run nothing"):
        self_align.records("nothing", tmp_path)
    assert not (tmp_path / "nothing").exists()  # looking did not create a run


def ids(rows):
    return sorted(r["id"] for r in rows)


def test_filter_records(records):
    assert ids(widgets.filter_records(records, type="t2")) == ["copy", "good", "nomarker", "short"]
    assert ids(widgets.filter_records(records, principle=7)) == ["good"]
    assert ids(widgets.filter_records(records, type="t1", principle=3)) == ["unknown"]
    assert ids(widgets.filter_records(records, drop_reason="copies exemplar step_by_step_numerical")) == ["copy"]
    assert ids(widgets.filter_records(records, drop_reason="")) == ["good", "loop", "unknown"]
    assert widgets.filter_records(records) == records
    untyped = [{"id": "x", "type": None, "triggers": []}]
    assert widgets.filter_records(untyped, type=widgets.SELF_INSTRUCT) == untyped


def test_record_html_shows_the_rendered_prompt_and_raw_output(records, base):
    good = next(r for r in records if r["id"] == "good")
    page = widgets.record_html(good, base)
    assert base.principle(16).text in page and "User: good\n\nWatson (internal thoughts):" in page
    assert "Watson: It is 42." in page and "Note:" not in page
    assert "Note:" in widgets.record_html(good, base.without(7))  # another set than the record's
    assert "<pre" in widgets.record_html({"id": "q", "prompt": "<hi>"}, None) and "&lt;hi&gt;" in widgets.record_html(
        {"id": "q", "prompt": "<hi>"}, None)


def test_editor_prompts_prefers_kept_responses(records):
    assert sorted(widgets.editor_prompts(records, 4)[:3]) == ["good", "loop", "unknown"]
    assert len(widgets.editor_prompts(records, 4)) == 4


def test_examples_for_and_heatmap_cells(records, base):
    assert [r["id"] for r in widgets.examples_for(records, "t2", 7)] == ["good"]
    assert [r["id"] for r in widgets.examples_for(records, "t2", 3)] == []  # "short" cites 3 but was dropped
    assert widgets.examples_for(records, "t2", 7, limit=0) == []
    kept = pd.DataFrame([r for r in records if r["status"] == "kept"])
    _, per_type = trigger_stats(kept, base)
    cells = widgets.heatmap_cells(per_type)
    assert [value for _, value in cells] == [("t2", 2), ("t2", 7), ("t1", 3), ("t1", 13)]  # largest share first
    assert cells[2][0] == "t1 / 3 Helpful (50%)"


def test_self_instruct_label_is_trigger_stats_column(base):
    responses = pd.DataFrame([{"id": "a", "type": None, "triggers": [1], "answer": "x"}])
    assert list(trigger_stats(responses, base)[1].columns) == [widgets.SELF_INSTRUCT]


def test_editor_regenerate_shows_the_comparison(base, tmp_path):
    editor = scripted_editor(base, tmp_path)
    editor.regenerate_button.click()
    assert "edited: nothing" in editor.comparison.value and "0 of 3 answers changed" in editor.status.value
    editor.texts[7].value = "Be candid about uncertainty."
    editor.toggles[15].value = False
    editor.regenerate_button.click()
    assert "I am not sure; maybe 42." in editor.comparison.value
    assert "edited: 7 Candor: reworded; 15 Creative: off" in editor.comparison.value
    assert "1 of 3 answers changed" in editor.status.value and not editor.regenerate_button.disabled
    editor.texts[7].value = ""
    editor.regenerate_button.click()
    assert "empty text" in editor.status.value and "maybe 42" in editor.comparison.value  # last table kept


def test_editor_save_refuses_to_overwrite_unless_ticked(base, tmp_path):
    editor = scripted_editor(base, tmp_path)
    editor.texts[7].value = "Be candid about uncertainty."
    editor.save_button.click()
    assert "saved" in editor.status.value
    assert load_principle_set(tmp_path / "mine.yaml").principle(7).text == "Be candid about uncertainty."
    editor.texts[7].value = "Be frank."
    editor.save_button.click()
    assert "exists" in editor.status.value
    editor.overwrite.value = True
    editor.save_button.click()
    assert load_principle_set(tmp_path / "mine.yaml").principle(7).text == "Be frank."
    # Saying what an overwrite replaced, and where the old text still is.
    assert "the previous mine.yaml is kept as mine.previous.yaml" in editor.status.value
    assert load_principle_set(tmp_path / "mine.previous.yaml").principle(7).text == "Be candid about uncertainty."


def test_editor_shows_a_failing_engine_instead_of_raising(base, tmp_path):
    class Broken:
        def generate_groups(self, *args, **kwargs):
            raise RuntimeError("out of memory")

    editor = widgets.PrincipleEditor(base, PROMPTS, Broken())
    editor.texts[7].value = "Be frank."
    editor.regenerate_button.click()
    assert "RuntimeError: out of memory" in editor.status.value and not editor.regenerate_button.disabled


def test_inspector_filters_and_shows_one_record(records, base):
    inspector = widgets.ResponseInspector(records, base)
    assert inspector.count.value == "8 of 8 records"
    inspector.reason.value = "blanket refusal"
    assert inspector.count.value == "1 of 8 records" and "refuse (dropped: blanket refusal" in inspector.detail.value
    assert "I&#x27;m sorry, but I cannot do that." in inspector.detail.value  # the raw output
    inspector.reason.value = widgets.EVERY
    inspector.principle.value = 7
    assert inspector.count.value == "1 of 8 records" and "good (kept)" in inspector.detail.value
    inspector.type.value = "t1"
    assert inspector.count.value == "0 of 8 records" and inspector.detail.value == ""
    assert inspector.type.options == (widgets.EVERY, "t1", "t2") and ("7 Candor", 7) in inspector.principle.options
    assert inspector.reason.options[:2] == ((widgets.EVERY, widgets.EVERY), ("(kept)", ""))


def test_explorer_lists_the_examples_of_a_cell(records, base):
    explorer = widgets.TriggerExplorer(records, base)
    assert bytes(explorer.heatmap.value).startswith(b"\x89PNG")
    explorer.cell.value = ("t2", 7)
    assert "selfalign-examples" in explorer.examples.value and "It is 42." in explorer.examples.value
    nothing = widgets.TriggerExplorer([r for r in records if r["status"] == "dropped"], base)
    assert nothing.cell.label == "(no principle fired)" and "nothing to click" in nothing.examples.value
    # Beside the written triggers: the likelihood heatmap and where the two disagree.
    assert bytes(explorer.likely_heatmap.value).startswith(b"\x89PNG")
    kept = [r for r in records if r["status"] == "kept"]
    scored = [r for r in kept if r.get("principle_scores")]
    assert len(explorer.disagreements) == len(scored)
    if scored:
        assert "most_likely" in explorer.disagreement_table.value
    assert "No kept response has principle_scores" in nothing.disagreement_table.value
