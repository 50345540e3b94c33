"""`selfalign export`: a run's files as Hugging Face datasets in TRL's formats, with a dataset card."""

import json
import os

import datasets
import pyarrow.parquet as pq
import pytest
import yaml

from selfalign.chat_format import ChatFormat
from selfalign.cli import main
from selfalign.export import export_run, identity_records, open_run, preference_rows, sft_rows, verbose_rows
from selfalign.inputs import PRINCIPLES_DIR
from selfalign.links import LinkError
from selfalign.principles import load_principle_set
from selfalign.records import Run, RunError, provenance

PRINCIPLES = load_principle_set()
CHAT = ChatFormat.load()
THOUGHTS = "The user asks for a sum. I should follow rules 2 (Informative) and 11 (Numerical Sensitivity)."
ORIGIN = provenance("tiny-random", {"temperature": 0.5}, 3, PRINCIPLES.hash)


def response(key, prompt, answer, **extra):
    return {"id": key, "prompt": prompt, "thoughts": THOUGHTS, "answer": answer, "triggers": [2, 11],
            "provenance": ORIGIN, "source": "red_team", "type": None, "topic": None, **extra}


RESPONSES = [
    response("rt-math-0", "What is 2 plus 2?", "Watson says 2 plus 2 is 4."),
    response("rt-math-1", "What is 3 plus 3?", "It is 6."),  # the baseline says the same
    response("rt-math-2", "What is 4 plus 4?", "It is 8."),  # no baseline answer
    response("si-0", "Name a colour.", "Blue is a colour.", source="self_instruct", type=None),
]
BASELINE = {"rt-math-0": "I think it is 5.", "rt-math-1": " It is 6. "}


def make_run(root, responses=RESPONSES, baseline=BASELINE, engrave="data", verbose=True, name="r"):
    """A run directory as the stages write it: stage 1's prompts, stage 2, the baseline, 3 and 4."""
    run = Run(name, root)
    prompts = run.stage("prompts")
    prompts.start({"model": "tiny-random"})
    with prompts.writer("prompts.jsonl", "prompt/1") as out:
        for r in responses:
            out.write({"id": r["id"], "prompt": r["prompt"], "source": r["source"], "seeds": [],
                       "provenance": ORIGIN, "type": "math" if r["source"] == "red_team" else None,
                       "topic": "arithmetic" if r["source"] == "red_team" else None})
    prompts.finish({})
    stage_two = run.stage("self_align")
    stage_two.start({"model": "tiny-random", "seed": 3, "assistant": "Watson", "principles_hash": PRINCIPLES.hash,
                     "principles": str(PRINCIPLES_DIR / "principles.yaml")})
    with stage_two.writer("responses.jsonl", "response/1") as out:
        out.write_all(responses)
    with stage_two.writer("drops.jsonl", "drop/1") as out:
        out.write({"id": "rt-math-9", "reason": "no answer marker"})
    stage_two.finish({"responses": len(responses), "drop_reasons": {"no answer marker": 1}})
    if baseline is not None:
        stage = run.stage("baseline")
        stage.start({"model": "tiny-random"})
        with stage.writer("answers.jsonl", "generation/1") as out:
            for key, text in baseline.items():
                prompt = next(r["prompt"] for r in responses if r["id"] == key)
                out.write({"id": key, "prompt": prompt, "completion": text, "finish_reason": "stop",
                           "prompt_tokens": 5, "completion_tokens": 5,
                           "provenance": provenance("tiny-random", {}, 0)})
        stage.finish({})
    identity = [{"id": "identity-1", "prompt": "Who are you?", "answer": "I am Dromedary.", "source": "identity"}]
    if engrave:
        stage = run.stage("engrave")
        stage.start({"model": "tiny-random", "chat_format": CHAT.to_dict(), "identity": str(PRINCIPLES_DIR / "identity.yaml"),
                     **({"identity_records": identity} if engrave == "manifest" else {})})
        with stage.writer("data.jsonl", "sft_example/1") as out:
            for i, r in enumerate(responses + (identity if engrave == "data" else [])):
                out.write({"id": r["id"], "prompt": r["prompt"], "answer": r["answer"].replace("Watson", "Dromedary"),
                           "source": r.get("source"), "split": "holdout" if i == 1 else "train"})
        stage.finish({})
    if verbose:
        stage = run.stage("verbose")
        stage.start({"model": "tiny-random"})
        with stage.writer("answers.jsonl", "answer/1") as out:
            for r in responses[:2] + identity:
                out.write({"id": r["id"], "prompt": r["prompt"], "answer": f"At length: {r['id']}.",
                           "source": "identity" if r["id"].startswith("identity") else "self_align",
                           "cut_at_length": r["id"] == "rt-math-1",
                           "provenance": provenance("tiny-random+engrave", {}, 0)})
        stage.finish({})
    return run


def all_contents(rows):
    return [m["content"] for row in rows for key in ("messages", "prompt", "chosen", "rejected")
            for m in row.get(key) or []]


def test_sft_rows_are_the_prompt_and_answer_only_and_identity_is_marked(tmp_path):
    rows = {r["id"]: r for r in sft_rows(open_run("r", make_run(tmp_path).root.parent))}
    assert list(rows) == ["rt-math-0", "rt-math-1", "rt-math-2", "si-0", "identity-1"]
    first = rows["rt-math-0"]
    # The answer under stage 3's name, as stage 3 trained on it; nothing but the two turns.
    assert first["messages"] == [{"role": "user", "content": "What is 2 plus 2?"},
                                 {"role": "assistant", "content": "Dromedary says 2 plus 2 is 4."}]
    assert (first["type"], first["topic"], first["triggers"]) == ("math", "arithmetic", [2, 11])
    assert (first["model"], first["principles_hash"], first["seed"], first["split"]) == \
        ("tiny-random", PRINCIPLES.hash, 3, "train")
    assert rows["rt-math-1"]["split"] == "holdout" and rows["si-0"]["type"] is None
    assert rows["identity-1"]["identity"] and not first["identity"] and rows["identity-1"]["source"] == "identity"
    texts = " ".join(all_contents(rows.values()))
    assert "rules 2" not in texts and THOUGHTS not in texts
    assert not any(p.text[:40] in texts for p in PRINCIPLES.principles)
    assert not any(e.thoughts[:40] in texts or e.user in texts for e in PRINCIPLES.exemplars)


def test_identity_comes_from_the_manifest_or_the_identity_file_when_data_lacks_it(tmp_path):
    run = open_run("r", make_run(tmp_path, engrave="manifest").root.parent)
    assert identity_records(run) == ([{"id": "identity-1", "prompt": "Who are you?", "answer": "I am Dromedary.",
                                       "source": "identity"}], "stage 3's manifest")
    params = json.loads((run.root / "engrave" / "manifest.json").read_text())
    del params["params"]["identity_records"]
    (run.root / "engrave" / "manifest.json").write_text(json.dumps(params))
    records, where = identity_records(run)
    assert len(records) > 3 and where.endswith("read again") and records[0]["id"] == "identity-1"
    assert "Dromedary" in records[0]["answer"] and "{assistant}" not in records[0]["answer"]
    assert [r["id"] for r in sft_rows(run) if r["identity"]] == [r["id"] for r in records]


def test_verbose_rows_are_stage_fours_answers(tmp_path):
    rows = verbose_rows(open_run("r", make_run(tmp_path).root.parent))
    assert [r["id"] for r in rows] == ["rt-math-0", "rt-math-1", "identity-1"]
    assert rows[0]["messages"][1] == {"role": "assistant", "content": "At length: rt-math-0."}
    assert rows[0]["type"] == "math" and rows[0]["model"] == "tiny-random+engrave" and rows[2]["identity"]
    assert [r["source"] for r in rows] == ["red_team", "red_team", "identity"]  # stage 2's, not "self_align"
    assert [r["cut_at_length"] for r in rows] == [False, True, False]


def test_preferences_only_where_both_answers_exist_and_differ(tmp_path):
    from collections import Counter

    skipped = Counter()
    rows = preference_rows(open_run("r", make_run(tmp_path).root.parent), skipped)
    assert [r["id"] for r in rows] == ["rt-math-0"]
    assert rows[0]["prompt"] == [{"role": "user", "content": "What is 2 plus 2?"}]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "Dromedary says 2 plus 2 is 4."}]
    assert rows[0]["rejected"] == [{"role": "assistant", "content": "I think it is 5."}]
    assert (rows[0]["chosen_model"], rows[0]["rejected_model"], rows[0]["type"]) == ("tiny-random",) * 2 + ("math",)
    assert skipped == {"identical answers": 1, "no baseline answer": 2}


def test_export_writes_parquet_disk_copies_and_a_card_the_hub_reads(tmp_path, capsys):
    run = make_run(tmp_path / "runs")
    out = tmp_path / "export"
    assert main(["export", "--run", "r", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert "sft 5 rows, verbose_sft 3 rows, preferences 1 rows" in capsys.readouterr().out
    expected = {"sft": sft_rows(run), "verbose_sft": verbose_rows(run), "preferences": preference_rows(run)}
    text = (out / "README.md").read_text()
    header = yaml.safe_load(text.split("---\n")[1])
    assert [c["config_name"] for c in header["configs"]] == ["sft", "verbose_sft", "preferences"]
    for config in header["configs"]:
        name, [files] = config["config_name"], config["data_files"]
        assert files == {"split": "train", "path": f"data/{name}.parquet"} and (out / files["path"]).is_file()
        # Loaded as the Hub loads it (the card's configs), and as saved to disk: the same rows.
        hub = datasets.load_dataset(str(out), name, split="train", cache_dir=str(tmp_path / "cache"))
        disk = datasets.load_from_disk(str(out / name))
        assert hub.to_list() == disk.to_list() == expected[name]
        assert hub.features == disk.features
    assert "license" not in header  # no LICENSE file: the card says why instead
    assert "| no answer marker | 1 |" in text and PRINCIPLES.principles[0].text[:50] in " ".join(text.split())
    assert '"assistant": "Watson"' in text and "### baseline (finished)" in text
    assert "1 identity conversations" in text and "2 no baseline answer" in text


def test_an_empty_stage_gives_empty_datasets_with_their_columns(tmp_path):
    make_run(tmp_path, responses=[], baseline=None, engrave=None, verbose=False)
    out = tmp_path / "export"
    assert export_run("r", tmp_path, out) == {"sft": 0, "verbose_sft": 0, "preferences": 0}
    for name, column in [("sft", "messages"), ("verbose_sft", "cut_at_length"), ("preferences", "rejected")]:
        assert pq.read_table(out / "data" / f"{name}.parquet").num_rows == 0
        assert column in pq.read_schema(out / "data" / f"{name}.parquet").names
        disk = datasets.load_from_disk(str(out / name))
        assert len(disk) == 0 and column in disk.features
    text = (out / "README.md").read_text()
    assert yaml.safe_load(text.split("---\n")[1])["configs"] == []
    assert "`sft`: it is empty" in text and "no stage 4" in text and "no baseline stage" in text
    assert "0 stage-2 answers and 0 identity conversations (from none: stage 3 has not run)" in text


def test_a_run_without_stage_two_is_a_clear_error(tmp_path, capsys):
    Run("r", tmp_path).stage("prompts")
    assert main(["export", "--run", "r", "--runs-dir", str(tmp_path), "--out", str(tmp_path / "x")]) == 1
    error = capsys.readouterr().err
    assert "has no stage-2 answers" in error and "selfalign stage self-align --run r" in error
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    assert main(["export", "--run", "nope", "--runs-dir", str(tmp_path), "--out", str(tmp_path / "x")]) == 1
    assert "no run 'nope'" in capsys.readouterr().err and not (tmp_path / "nope").exists()


def test_an_existing_out_is_refused_unless_overwrite(tmp_path):
    make_run(tmp_path / "runs")
    out = tmp_path / "export"
    out.mkdir()
    (out / "README.md").write_text("old")
    with pytest.raises(RunError, match="exists; pass --overwrite"):
        export_run("r", tmp_path / "runs", out)
    assert (out / "README.md").read_text() == "old"
    export_run("r", tmp_path / "runs", out, overwrite=True)
    assert (out / "README.md").read_text().startswith("---\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "runs"]  # no building folder left


def test_overwrite_removes_only_what_an_export_wrote(tmp_path):
    make_run(tmp_path / "runs")
    out = tmp_path / "export"
    export_run("r", tmp_path / "runs", out)
    listed = json.loads((out / ".selfalign-export.json").read_text())["files"]
    assert "data/sft.parquet" in listed and "README.md" in listed
    mine = {"notes.txt": "mine", "data/mine.csv": "a,b\n", "sft/keep.txt": "keep", "old/mine.txt": "also mine"}
    for name, text in mine.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(text)
    # What an earlier export wrote and this one does not: removed, with the folder it leaves empty.
    (out / "stale").mkdir()
    (out / "stale" / "old.parquet").write_text("old")
    (out / "old" / "old.parquet").write_text("old")
    (out / ".selfalign-export.json").write_text(json.dumps({"files": listed + ["stale/old.parquet",
                                                                              "old/old.parquet"]}))
    export_run("r", tmp_path / "runs", out, overwrite=True)
    assert {name: (out / name).read_text() for name in mine} == mine
    assert not (out / "stale").exists() and not (out / "old" / "old.parquet").exists()
    assert len(datasets.load_from_disk(str(out / "sft"))) == 5
    assert json.loads((out / ".selfalign-export.json").read_text())["files"] == listed


def test_an_export_folder_has_the_usual_permissions(tmp_path):
    make_run(tmp_path / "runs")
    umask = os.umask(0o022)
    try:
        export_run("r", tmp_path / "runs", tmp_path / "export")
    finally:
        os.umask(umask)
    for folder in (tmp_path / "export", tmp_path / "export" / "data", tmp_path / "export" / "sft"):
        assert folder.stat().st_mode & 0o777 == 0o755, folder  # not mkdtemp's 0700


@pytest.mark.parametrize("listed", [["../victim.txt"], ["/tmp/victim.txt"], ["data/../../victim.txt"], [3]])
def test_a_hand_edited_list_never_leads_a_deletion_outside(tmp_path, listed):
    make_run(tmp_path / "runs")
    out = tmp_path / "export"
    out.mkdir()
    (out / ".selfalign-export.json").write_text(json.dumps({"files": listed}))
    (tmp_path / "victim.txt").write_text("mine")
    with pytest.raises(RunError, match=r"\.selfalign-export\.json lists .* which is no file inside"):
        export_run("r", tmp_path / "runs", out, overwrite=True)
    assert (tmp_path / "victim.txt").read_text() == "mine"


def test_a_link_inside_out_is_refused_before_anything_is_written(tmp_path):
    make_run(tmp_path / "runs")
    out = tmp_path / "export"
    export_run("r", tmp_path / "runs", out)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "sft.parquet").write_text("mine")
    for path in (out / "data").iterdir():
        path.unlink()
    (out / "data").rmdir()
    (out / "data").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LinkError, match=r"export/data is a symbolic link"):
        export_run("r", tmp_path / "runs", out, overwrite=True)
    assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == ["sft.parquet"]
    assert (tmp_path / "elsewhere" / "sft.parquet").read_text() == "mine"
    assert (out / "README.md").read_text().startswith("---\n")  # the earlier export is as it was


def test_responses_that_repeat_an_id_are_refused_naming_the_file_and_the_id(tmp_path, capsys):
    run = make_run(tmp_path / "runs")
    responses = run.root / "self_align" / "responses.jsonl"
    with responses.open("a") as handle:  # what two processes on one stage wrote, before the lock held
        handle.write(json.dumps({"schema": "response/1", **RESPONSES[1], "answer": "Another text."}) + "\n")
    assert main(["export", "--run", "r", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "x")]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert f"{responses} repeats the id 'rt-math-1'" in error
    assert not (tmp_path / "x").exists()


def test_a_message_with_a_principle_in_it_is_refused_by_id(tmp_path):
    leaked = response("rt-leak", "Rules: " + PRINCIPLES.principles[6].text + " Now, who won?", "I do not know.")
    make_run(tmp_path, responses=RESPONSES + [leaked])
    with pytest.raises(RunError, match=r"sft record rt-leak: its user message holds the text of principle 7 \(Candor\)"):
        export_run("r", tmp_path, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_an_unreachable_hub_is_one_line_after_the_local_export(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    make_run(tmp_path / "runs")
    out = tmp_path / "export"
    assert main(["export", "--run", "r", "--runs-dir", str(tmp_path / "runs"), "--out", str(out),
                 "--push-to-hub", "someone/selfalign-r"]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "export in" in error and "pushing it to someone/selfalign-r failed" in error
    assert len(datasets.load_from_disk(str(out / "sft"))) == 5
