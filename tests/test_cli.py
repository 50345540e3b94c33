import json

import pytest

from selfalign.cli import main


def test_generate_prints_completions(capsys):
    assert main(["generate", "hello there", "the fox", "--model", "tiny-random", "--max-new-tokens", "5",
                 "--temperature", "0", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["hello there", "the fox"]
    assert all(line["completion_tokens"] == 5 and line["finish_reason"] == "length" for line in lines)


def test_unknown_model_lists_the_known_ones(capsys):
    assert main(["generate", "hi", "--model", "llama-7b-typo"]) == 1
    error = capsys.readouterr().err
    assert "smollm2-135m-instruct" in error and "tiny-random" in error


def test_run_runs_stages_then_skips_finished_ones(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "one"}\n{"id": "b", "prompt": "two"}\n')
    argv = ["run", "--direct", "--run", "r", "--runs-dir", str(tmp_path), "--model", "tiny-random",
            "-p", "prompts", str(prompts), "-p", "max_new_tokens", "4", "-p", "types_limit", "2",
            # stage 1 must keep a prompt (a random model's list items fill out 128 tokens, not 16)
            "-p", "n_self_instruct", "2", "-p", "max_rounds", "1", "-p", "min_responses", "0",
            # a random model's stage 2 keeps nothing for stages 3-5 to train on or evaluate
            "--only", "prompts", "self-align", "baseline"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "r" / "baseline" / "answers.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["a", "b"]  # written in completion order
    assert rows[0]["provenance"]["model"] == "tiny-random"
    assert rows[0]["provenance"]["generation"]["max_new_tokens"] == 4
    assert json.loads((tmp_path / "r" / "prompts" / "manifest.json").read_text())["status"] == "finished"
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[prompts] finished earlier, skipped" in out and "[baseline] finished earlier, skipped" in out
    assert main(["status", "--run", "r", "--runs-dir", str(tmp_path)]) == 0
    assert "finished" in capsys.readouterr().out
    assert main([*argv, "engrave", "nonsense"]) == 1
    assert "unknown stages ['nonsense']" in capsys.readouterr().err


def test_bad_prompt_file_is_a_clear_error(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "one"}\nnot json\n')
    assert main(["stage", "baseline", "--run", "r", "--runs-dir", str(tmp_path), "--model", "tiny-random",
                 "--prompts", str(prompts)]) == 1
    assert "p.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_leave_one_out_flags_are_its_settings_fields(capsys):
    import dataclasses

    import pytest

    from selfalign.ablation import LeaveOneOutConfig

    with pytest.raises(SystemExit) as exit:
        main(["leave-one-out", "--help"])
    assert exit.value.code == 0
    shown = capsys.readouterr().out
    for field in dataclasses.fields(LeaveOneOutConfig):
        assert "--" + field.name.replace("_", "-") in shown
    assert "--no-loo-scores" in shown and "default: 96" in shown


def test_status_of_a_run_that_does_not_exist_says_so_and_creates_nothing(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["status", "--run", "typo", "--runs-dir", str(runs)]) == 1
    error = capsys.readouterr().err.strip()
    assert error == f"selfalign: error: no run 'typo' in {runs} ({runs / 'typo'} does not exist)"
    assert not runs.exists()


def test_chat_with_a_run_that_does_not_exist_creates_nothing(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["chat", "--run", "typo", "--runs-dir", str(runs)]) == 1
    assert "no verbose adapter made by selfalign" in capsys.readouterr().err
    assert not runs.exists()


def test_a_bug_is_one_line_and_its_traceback_is_there_on_request(tmp_path, capsys, monkeypatch):
    import selfalign.cli as cli

    def broken(args):
        raise KeyError("base_shape")

    monkeypatch.setattr(cli, "_status", broken)
    argv = ["status", "--run", "r", "--runs-dir", str(tmp_path)]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert error == ("selfalign: error: internal error, KeyError: 'base_shape' (a bug in selfalign: please report "
                     "it; SELFALIGN_TRACEBACK=1 shows where it happened)\n")
    monkeypatch.setenv("SELFALIGN_TRACEBACK", "1")
    with pytest.raises(KeyError):
        main(argv)
